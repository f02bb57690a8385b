"""docs/reference/ is generated from the verbs' --help (honelm.reference): a page that differs from what the code
generates now fails here, with the command that regenerates it."""

from __future__ import annotations

from pathlib import Path

from honelm import config as C
from honelm import reference, registry

ROOT = Path(__file__).resolve().parents[2]


def test_the_reference_pages_are_up_to_date():
    differ = reference.stale(ROOT / "docs" / "reference")
    assert not differ, (f"docs/reference is stale ({', '.join(differ)}): regenerate it with "
                        f"`{reference.COMMAND}` from the repository root and commit the pages")


def test_a_page_lists_every_field_and_a_changed_docstring_makes_it_stale(tmp_path):
    pages = reference.pages()
    assert set(pages) == {"README.md", *(f"{v}.md" for v in registry.VERBS)}
    classify = pages["classify.md"]
    for key, _tp, _default, _doc in C.describe(registry.config_class("classify")):
        assert f"| `{key}` |" in classify
    assert "| `train.lr` | `float` | `5e-05` | Peak learning rate (AdamW). Allowed: a number > 0. |" in classify
    assert "--n-trials N_TRIALS" in pages["search.md"] and "space.<key>.low" in pages["search.md"]
    reference.write(tmp_path, pages)
    assert reference.stale(tmp_path, pages) == []
    (tmp_path / "classify.md").write_text(classify.replace("Peak learning rate", "Peak rate"))
    (tmp_path / "gone.md").write_text("a verb that no longer exists")
    assert reference.stale(tmp_path, pages) == ["classify.md", "gone.md"]

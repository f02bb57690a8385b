"""Checkpoints that prove themselves, attacked file by file: garbled, truncated, emptied, edited, a full disk.

Every attack must end in a one-line `CheckpointError` naming the damaged file (never a library
traceback, never a silent load), and `restore_newest` must fall back to the newest checkpoint
that is intact. Tiny models, no CLI: the process-level attacks are in tests/stages/test_reliability.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification

import honelm.checkpoint as ck
from honelm.checkpoint import (CheckpointError, clean_stale, list_checkpoints, load_training_checkpoint,
                               newest_good_checkpoint, restore_newest, save_training_checkpoint, verify_checkpoint)
from honelm.errors import HonelmError
from honelm.models import load_checkpoint
from honelm.runtime import rng_state
from honelm.teacher import TeacherConfig, load_teacher


def _model(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 16)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, keep: int = 5) -> Path:
    return save_training_checkpoint(root, step, model, optimizer, {"step": step, "position": step * 4}, rng_state(),
                                    keep)


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, nn.Module, torch.optim.Optimizer]:
    """checkpoints/step-1 and step-2 of a tiny model (the model's weights differ between them)."""
    (tmp_path / "run").mkdir()
    root = tmp_path / "run" / "checkpoints"
    model, optimizer = _model()
    _save(root, 1, model, optimizer)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    _save(root, 2, model, optimizer)
    return root, model, optimizer


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text and "weights_only=False" not in text, text
    return text


def test_every_checkpoint_carries_a_manifest_that_verifies(two) -> None:
    root, _, _ = two
    for path in list_checkpoints(root):
        manifest = json.loads((path / ck.MANIFEST).read_text())["files"]
        assert set(manifest) == set(ck.CHECKPOINT_FILES)
        assert manifest["model.safetensors"]["size"] == (path / "model.safetensors").stat().st_size
        assert verify_checkpoint(path) is True


def test_garbled_tensor_bytes_are_refused_and_resume_falls_back(two) -> None:
    """The issue's attack: 64 bytes XORed inside the tensor data, the safetensors header intact (it loads fine)."""
    root, _, _ = two
    target = root / "step-00000002" / "model.safetensors"
    data = bytearray(target.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(header + 16, header + 80):
        data[i] ^= 0xA5
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 .* does not match the manifest") as err:
        verify_checkpoint(root / "step-00000002")
    _one_line(err.value)
    fresh, optimizer = _model(seed=1)
    restored = restore_newest(root, fresh, optimizer)
    assert restored.path.name == "step-00000001" and restored.verified and restored.state["step"] == 1
    assert [p.name for p, _ in restored.refused] == ["step-00000002"]
    reference, _ = _model()  # step 1 holds the weights before the +1.0
    assert torch.equal(fresh[0].weight, reference[0].weight)
    # the NaN guard's "newest checkpoint that verifies" is not the corrupted one
    assert newest_good_checkpoint(root) == root / "step-00000001"


def test_an_edited_trainer_state_is_refused(two) -> None:
    root, model, optimizer = two
    state = root / "step-00000002" / "trainer_state.json"
    state.write_text(state.read_text().replace('"position": 8', '"position": 9'))
    with pytest.raises(CheckpointError, match="trainer_state.json: sha256"):
        load_training_checkpoint(root / "step-00000002", model, optimizer)
    assert restore_newest(root, model, optimizer).path.name == "step-00000001"


@pytest.mark.parametrize("name", ck.CHECKPOINT_FILES)
@pytest.mark.parametrize("damage,manifest", [("truncated", True), ("garbage", True), ("empty", False),
                                             ("truncated", False), ("garbage", False)],
                         ids=["size", "hash", "legacy-empty", "legacy-truncated", "legacy-garbage"])
def test_damaged_files_are_one_line_errors(two, name: str, damage: str, manifest: bool) -> None:
    """With a manifest the size or hash check names the file; without one (a checkpoint written before manifests)
    the read itself fails, and that too is a one-line error naming the file, never the library's traceback."""
    root, model, optimizer = two
    path = root / "step-00000002"
    if not manifest:
        (path / ck.MANIFEST).unlink()
    f = path / name
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                   "garbage": random.Random(0).randbytes(len(data))}[damage])
    with pytest.raises(CheckpointError) as err:
        load_training_checkpoint(path, model, optimizer)
    text = _one_line(err.value)
    assert str(f) in text
    restored = restore_newest(root, model, optimizer)
    assert restored.path.name == "step-00000001" and restored.refused[0][0] == path


def test_a_legacy_checkpoint_still_loads_unverified(two) -> None:
    root, model, optimizer = two
    for path in list_checkpoints(root):
        (path / ck.MANIFEST).unlink()
    restored = restore_newest(root, model, optimizer)
    assert restored.path.name == "step-00000002" and restored.verified is False and not restored.refused


def test_no_good_checkpoint_is_one_error(two) -> None:
    root, model, optimizer = two
    for path in list_checkpoints(root):
        (path / "optimizer.pt").write_bytes(b"")
    with pytest.raises(HonelmError, match=r"no checkpoint under .* can be resumed \(2 tried\)") as err:
        restore_newest(root, model, optimizer)
    _one_line(err.value)


def test_stale_temporary_directories_are_tidied(two) -> None:
    root, _, _ = two
    (root / ".tmp-step-00000003-4242").mkdir()
    (root / ".tmp-step-00000003-4242" / "model.safetensors").write_bytes(b"half")
    os.replace(root / "step-00000002", root / ".old-step-00000002-4242")  # killed between the two renames
    done = clean_stale(root)
    assert len(done) == 2 and not (root / ".tmp-step-00000003-4242").exists()
    assert verify_checkpoint(root / "step-00000002") and not (root / ".old-step-00000002-4242").exists()


def _tmpfs(where: Path, size: str) -> bool:
    """Mount a tmpfs of `size` at `where` when this process may (root in a container that allows it)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_and_leaves_earlier_checkpoints_intact(tmp_path: Path, monkeypatch) -> None:
    """A real full disk (a small tmpfs) when the test may mount one, else the error safetensors raises on ENOSPC."""
    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, "96k")
    try:
        if not mounted:
            disk.mkdir()
        (disk / "run").mkdir()
        root = disk / "run" / "checkpoints"
        model, optimizer = _model()
        _save(root, 1, model, optimizer)
        if not mounted:
            def full(*args, **kwargs) -> None:
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            monkeypatch.setattr(ck, "save_model", full)
        with pytest.raises(CheckpointError, match="no space left on the device") as err:
            for step in range(2, 6):  # the tmpfs fills up on one of these
                _save(root, step, model, optimizer)
        _one_line(err.value)
        assert "--resume" in str(err.value)
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
        for path in list_checkpoints(root):
            assert verify_checkpoint(path)
        assert list_checkpoints(root)[0].name == "step-00000001"
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(disk)], check=False)  # a failed write may still hold a descriptor


def test_a_deleted_run_directory_is_not_made_again(tmp_path: Path) -> None:
    model, optimizer = _model()
    with pytest.raises(HonelmError, match="the run directory is gone"):
        _save(tmp_path / "gone" / "checkpoints", 1, model, optimizer)
    assert not (tmp_path / "gone").exists()


def test_a_pickle_only_checkpoint_is_refused_unless_allowed(tiny_llama, tmp_path: Path) -> None:
    model = tiny_llama()
    where = tmp_path / "pickled"
    model.save_pretrained(where)  # then the weights as a pickle, as older tools wrote them
    torch.save(load_file(where / "model.safetensors"), where / "pytorch_model.bin")
    (where / "model.safetensors").unlink()
    with pytest.raises(HonelmError, match="pickle files only .*pytorch_model.bin.*model.allow_pickle=true") as err:
        load_checkpoint(tmp_path / "pickled", "lm")
    assert "save_pretrained" in _one_line(err.value)
    loaded = load_checkpoint(tmp_path / "pickled", "lm", allow_pickle=True).model
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_pickle_only_adapter_is_refused_unless_allowed(tiny_llama, tmp_path: Path) -> None:
    """adapter_model.bin is a pickle like pytorch_model.bin: the same refusal, the same opt-in."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    lora = get_peft_model(load_checkpoint(base, "lm").model, LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    adapter = tmp_path / "adapter"
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(HonelmError, match="adapter's weights are pickle files only .*adapter_model.bin"
                                          ".*model.allow_pickle=true") as err:
        load_checkpoint(adapter, "lm")
    assert "safetensors.torch" in _one_line(err.value)
    assert load_checkpoint(adapter, "lm", allow_pickle=True).model is not None


def test_a_pickle_only_teacher_is_refused_unless_teacher_allow_pickle(tmp_path: Path) -> None:
    """A distillation teacher is loaded by honelm.teacher, not model.*: it has its own opt-in."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=2,
                         id2label={0: "neg", 1: "pos"})
    where = tmp_path / "teacher"
    LlamaForSequenceClassification(config).save_pretrained(where)
    torch.save(load_file(where / "model.safetensors"), where / "pytorch_model.bin")
    (where / "model.safetensors").unlink()
    with pytest.raises(HonelmError, match="pickle files only .*teacher.allow_pickle"):
        load_teacher(str(where), TeacherConfig(model=str(where)))
    teacher = load_teacher(str(where), TeacherConfig(model=str(where), allow_pickle=True))
    assert teacher.config.id2label == {0: "neg", 1: "pos"}

"""`honelm serve`'s web page in a real headless browser: Debian's chromium driven by Playwright (the system
browser; `playwright install` is never run). Chat: type, send, watch the answer stream in, screenshot;
classify: texts in, labels and probabilities out; the run's report one click away.

Skipped, with the reason shown, when Playwright or /usr/bin/chromium is missing (`.ci/run` installs
chromium from Debian's packages where it can). Slow (a server process and a browser start): run with
-m slow. Screenshots go to the test's tmp directory, and the chat's also to $HONELM_SCREENSHOTS when
set (the docs' image: HONELM_SCREENSHOTS=docs/img pytest -m slow tests/stages/test_serve_browser.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.serve_models import CHATS, causal_lm, classifier

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
serve_test = pytest.importorskip("tests.stages.test_serve")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium (apt-get install -y chromium)")]


def keep(shot: Path) -> None:
    """Copy a screenshot to $HONELM_SCREENSHOTS when set (how docs/img/serve.png is made)."""
    target = os.environ.get("HONELM_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)


def chat(page, text: str) -> str:
    """Send one message; returns the answer once streamed, after checking it arrived in several pieces."""
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver((changes) => { window.updates += changes.length; })
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#prompt", text)
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    page.wait_for_function("() => [...document.querySelectorAll('.msg.assistant')].pop().dataset.done", timeout=30000)
    assert answer.get_attribute("data-done") == "true", answer.inner_text()
    assert page.evaluate("window.updates") > 6  # two bubbles, then one change per streamed piece
    return answer.inner_text()


def test_the_page_chats_classifies_and_shows_the_report(tmp_path):
    run = causal_lm(tmp_path / "chat-run")
    proc, url = serve_test.start_server([run, classifier(tmp_path / "sentiment")], "--api-key", "sk-page")
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 960, "height": 620})
            page.goto(url + "/?model=chat-run")
            page.wait_for_selector("body[data-ready=true]")
            page.fill("#api-key", "sk-page")
            page.dispatch_event("#api-key", "change")
            page.fill("#temperature", "0")
            assert chat(page, CHATS[0][0]) == CHATS[0][1]
            assert chat(page, CHATS[1][0]) == CHATS[1][1]
            shot = tmp_path / "serve.png"
            page.screenshot(path=str(shot))
            keep(shot)
            page.click("#report-link")
            page.wait_for_selector("#report-md:not(.hidden)")
            assert "run report" in page.inner_text("#report-md")
            page.select_option("#model", "sentiment")
            page.fill("#texts", "the music was beautiful\nthe story was dull and far too long")
            page.click("#classify")
            page.wait_for_selector("#results:not(.hidden) tbody tr")
            rows = page.locator("#results tbody tr")
            assert rows.count() == 2 and "%" in rows.first.inner_text()
            assert page.locator("#report-link").is_hidden()  # the classifier came from no run: nothing to link
            page.screenshot(path=str(tmp_path / "serve-classify.png"))  # the classifier's head is untrained: not kept
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)

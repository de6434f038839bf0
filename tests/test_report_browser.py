"""The HTML report rendered in a real headless browser (Debian's chromium via Playwright)."""

import os
import shutil
from pathlib import Path

import pytest

from rnnscope.report import write_report
from rnnscope.studies import compare_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI sets RNNSCOPE_REQUIRE_BROWSER=1 so that a missing browser fails instead of skipping.
REQUIRED = os.environ.get("RNNSCOPE_REQUIRE_BROWSER") == "1"
if not REQUIRED:
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not "
                                     "installed (pip install -e '.[test]')")
else:
    import playwright.sync_api as playwright
pytestmark = pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason="no chromium on "
                                "this machine (apt-get install chromium); .ci/run installs it")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _experiment_results():
    from rnnscope.experiments import ExperimentConfig, run_experiment

    from rnnscope.study_results import experiment_result

    return experiment_result(run_experiment(ExperimentConfig(
        task="adding", T=8, steps=20, batch_size=8, hidden_size=8, variants=("rnn", "lstm"),
        eval_every=10)))


@pytest.mark.parametrize("make", [
    lambda: compare_study(seq_len=20, hidden_size=16, input_size=6, samples=5),
    _experiment_results], ids=["compare", "experiment"])
def test_report_renders_every_figure_without_console_errors(tmp_path, make):
    results = make()
    paths = write_report(results, tmp_path / "rep")
    html_path = Path(paths["html"])
    assert "http://" not in html_path.read_text() and "https://" not in html_path.read_text()
    messages, errors, requests = [], [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: messages.append((m.type, m.text)))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html_path.as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("""() => Array.from(document.images).map(i => (
                {id: i.id, ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}))""")
            shot = Path(os.environ.get("RNNSCOPE_SCREENSHOT_DIR", tmp_path)) / \
                f"report-{results.command}.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    figures = {name for name in paths if name not in ("results", "html")}
    assert {img["id"] for img in images} == {f"fig-{n}" for n in figures}
    assert all(img["ok"] and img["w"] > 400 for img in images), images
    assert not errors, errors
    assert not [m for m in messages if m[0] == "error"], messages
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # self-contained
    assert shot.stat().st_size > 50_000

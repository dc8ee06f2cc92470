"""report.html in a real headless browser (Chromium via playwright): a trained-and-evaluated run
and a pipeline page load with every plot decoded, no console or page errors, no failed request,
and a non-blank screenshot. `make test-slow` installs the browser first (`make browser`); a
missing browser is a failure here, never a skip."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from posttrain import EvalConfig, SFTConfig, evaluate, sft
from posttrain.demo.tasks import generate
from posttrain.report.html_report import build_pipeline_report
from tests.conftest import make_tiny_llama
from tests.report.synthetic_run import write_run

CHROMIUM = os.environ.get("POSTTRAIN_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _browse(pages: list[Path], shots: Path) -> list[dict]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run `make browser` (pip install playwright into .venv)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium) "
                    "or set POSTTRAIN_CHROMIUM")
    results = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            for i, path in enumerate(pages):
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                problems: list[str] = []
                page.on("console", lambda m, p=problems: p.append(f"console {m.type}: {m.text}")
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e, p=problems: p.append(f"page error: {e}"))
                page.on("requestfailed", lambda r, p=problems: p.append(f"request failed: {r.url}"))
                page.goto(path.resolve().as_uri(), wait_until="load")
                images = page.evaluate("Array.from(document.images).map(i => "
                                       "({alt: i.alt, complete: i.complete, width: i.naturalWidth}))")
                shot = shots / f"report-{i}.png"
                page.screenshot(path=str(shot), full_page=True)
                results.append({"title": page.title(), "h1": page.inner_text("h1"), "images": images,
                                "problems": problems, "screenshot": shot})
                page.close()
        finally:
            browser.close()
    return results


def _assert_not_blank(png: Path) -> None:
    from PIL import Image

    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.width >= 1000 and image.height >= 900
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the screenshot is (nearly) one colour"


@pytest.mark.slow
def test_report_opens_in_headless_chromium_with_its_plots(tmp_path, tokenizer, tiny_model_dir):
    train, held = generate(seed=11, n_train=32, n_eval=6)
    run_dir = tmp_path / "sft-run"
    result = sft(SFTConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(run_dir), max_steps=6,
                           per_device_train_batch_size=8, logging_steps=1, save_steps=0, learning_rate=1e-3,
                           disable_tqdm=True), tokenizer=tokenizer, dataset=train)
    # the evaluation goes into the run directory: one page shows the curves and the before/after
    evaluate(EvalConfig(output_dir=str(run_dir), max_completion_length=12, num_samples=2,
                        reward_funcs=["accuracy", "format"]),
             model=result.model, tokenizer=tokenizer, dataset=held, baseline_model=make_tiny_llama())
    pipe = tmp_path / "pipeline"
    stages = {"sft": write_run(pipe / "sft", steps=5, with_eval=False), "grpo": write_run(pipe / "grpo", steps=8)}
    build_pipeline_report(pipe, stages)

    shots = tmp_path / "screenshots"
    shots.mkdir()
    run_page, pipeline_page = _browse([run_dir / "report.html", pipe / "report.html"], shots)

    for page in (run_page, pipeline_page):
        assert page["problems"] == []
        assert page["images"], "no plots on the page"
        for img in page["images"]:
            assert img["complete"] and img["width"] > 0, img["alt"]
        _assert_not_blank(page["screenshot"])
    assert run_page["h1"] == "posttrain sft report"
    alts = [img["alt"].split(":")[0] for img in run_page["images"]]
    assert alts[0] == "Loss" and "Accuracy" in alts and alts[-1] == "Evaluation"
    assert pipeline_page["h1"] == "posttrain pipeline report" and len(pipeline_page["images"]) >= 10

"""Take screenshots of the web UI's main views into docs/screenshots/ (headless Chromium + Playwright).

    .venv/bin/python docs/screenshots.py                      # SmolLM2 when installed, else a tiny model
    .venv/bin/python docs/screenshots.py --model tiny-gpt2    # a tiny random model (fast, meaningless)

Starts the UI on a free loopback port with a throwaway $KNOWMRI_HOME, runs two diagnoses and
captures: the input + matching view, a run's live progress, a report, the runs list and a comparison.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "screenshots"
FACTS = ("The Eiffel Tower is located in the city of Paris", "The Colosseum is located in the city of Rome")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="smollm2-135m (default when installed) or tiny-gpt2")
    parser.add_argument("--methods", default="logit_lens,integrated_gradients")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)

    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    from knowmri.models.presets import preset_available
    from knowmri.server.app import create_app
    from knowmri.server.background import BackgroundServer, launch_chromium

    model = args.model or ("smollm2-135m" if preset_available("smollm2-135m") else "tiny-gpt2")
    models = {}
    if model == "tiny-gpt2":
        from knowmri.testing import tiny_model

        models["tiny-gpt2"] = tiny_model("gpt2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as home, BackgroundServer(create_app(home=home, models=models)) as server, \
            sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
        run_ids = []
        for i, fact in enumerate(FACTS):
            page.goto(server.url)
            page.wait_for_selector("body[data-ready=true]")
            page.select_option("#model-select", model)
            page.fill("#free-text", fact)
            page.wait_for_selector("#key-ground_truth")
            page.wait_for_selector("#method-logit_lens:not([disabled])")
            page.wait_for_function("document.querySelector('#match-status').textContent.includes('apply')")
            for box in page.query_selector_all("#method-groups .method-head input[type=checkbox]:not([disabled])"):
                if box.get_attribute("value") in methods:
                    box.check()
                else:
                    box.uncheck()
            page.wait_for_timeout(300)
            if i == 0:
                page.screenshot(path=str(out / "diagnose.png"), full_page=True)
            page.click("#run-btn")
            if i == 0:
                try:
                    page.wait_for_selector("#progress-card:not([hidden]) #progress-methods li", timeout=5_000)
                    page.screenshot(path=str(out / "progress.png"), full_page=False)
                except PlaywrightTimeout:  # the run was too quick to show its progress
                    pass
            page.wait_for_selector("#run-report .consensus", timeout=180_000)
            page.wait_for_selector("#run-report .js-plotly-plot")
            page.wait_for_timeout(800)
            run_ids.append(page.url.rsplit("/", 1)[-1])
            if i == 0:
                page.screenshot(path=str(out / "report.png"), full_page=False)
                page.screenshot(path=str(out / "report-full.png"), full_page=True)
        page.goto(server.url)
        page.wait_for_selector("body[data-ready=true]")
        page.select_option("#model-select", model)
        page.click("#tab-dataset")
        page.wait_for_selector("#record-0:checked")
        page.select_option("#dataset-select", "gsm8k")
        page.wait_for_selector("#method-causal_tracing[disabled]")
        page.wait_for_timeout(300)
        page.screenshot(path=str(out / "diagnose-dataset.png"), full_page=True)
        page.goto(server.url + "#/runs")
        page.wait_for_selector("#runs-table tbody tr")
        page.screenshot(path=str(out / "runs.png"), full_page=False)
        page.goto(server.url + f"#/compare/{run_ids[0]}/{run_ids[1]}")
        page.wait_for_selector("#compare-right .js-plotly-plot")
        page.wait_for_timeout(800)
        page.screenshot(path=str(out / "compare.png"), full_page=False)
        browser.close()
    for path in sorted(out.glob("*.png")):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

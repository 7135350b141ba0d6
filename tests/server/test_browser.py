"""End to end in headless Chromium: type a fact, run two methods, read the figures, reopen after a restart,
see why methods do not apply, pick a dataset record, compare two runs."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from knowmri.server.app import create_app
from knowmri.server.background import CHROMIUM, BackgroundServer, launch_chromium
from tests.server.conftest import FACT, MODEL, wait_done

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Chromium at {CHROMIUM} (apt-get install chromium)"),
]
TIMEOUT = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        chromium = launch_chromium(pw)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda err: errors.append(str(err)))
    yield p
    context.close()
    assert not errors, errors


def open_page(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")


def choose_methods(page: Any, wanted: list[str]) -> None:
    page.wait_for_selector("#method-logit_lens:not([disabled])")
    for box in page.query_selector_all("#method-groups .method-head input[type=checkbox]:not([disabled])"):
        box.set_checked(box.get_attribute("value") in wanted)


def second_method() -> str:
    import knowmri as km

    names = {m["name"] for m in km.methods()}
    return "integrated_gradients" if "integrated_gradients" in names else "attention_weights"


def test_diagnose_a_fact_and_reopen_it_after_a_restart(page: Any, tmp_path: Path, tiny_gpt2: Any) -> None:
    other = second_method()
    with BackgroundServer(create_app(home=tmp_path, models={MODEL: tiny_gpt2})) as server:
        open_page(page, server.url)
        assert page.input_value("#model-select") == MODEL
        page.fill("#free-text", FACT)
        page.wait_for_selector("#key-triple_subject")
        assert page.input_value("#key-prompt") == "The Eiffel Tower is located in the city of"
        assert page.input_value("#key-triple_subject") == "Eiffel Tower"
        page.wait_for_selector(".method .estimate")
        groups = page.locator(".method-group h3").all_inner_texts()
        assert {"external", "internal"} <= {g.strip().lower() for g in groups}
        choose_methods(page, ["logit_lens", other])
        page.click("#run-btn")
        page.wait_for_url(re.compile(r"#/run/[0-9a-f]{16}$"))
        run_id = page.url.rsplit("/", 1)[-1]
        for name in ("logit_lens", other):
            page.wait_for_selector(f'#run-report [data-method="{name}"] .js-plotly-plot')
            assert page.inner_text(f'#run-report [data-method="{name}"] .badge') == "ok"
        assert page.locator("#run-report .consensus .verdict").inner_text()
        assert page.locator("#run-report table.data").count() >= 2
        assert page.inner_text("#run-status") == "done"
        assert page.get_attribute("#export-json", "href").endswith(f"/api/runs/{run_id}/report.json?download=1")
    with BackgroundServer(create_app(home=tmp_path, models={MODEL: tiny_gpt2})) as restarted:
        open_page(page, restarted.url + "#/runs")
        page.wait_for_selector(f'#runs-table tr[data-run="{run_id}"]')
        page.click(f'#runs-table tr[data-run="{run_id}"] a:text("Open")')
        page.wait_for_selector('#run-report [data-method="logit_lens"] .js-plotly-plot')
        assert page.url.endswith(f"#/run/{run_id}")


def test_reasons_records_and_compare_with_a_token(page: Any, tmp_path: Path, tiny_gpt2: Any) -> None:
    import httpx

    token = "let-me-in"
    with BackgroundServer(create_app(home=tmp_path, models={MODEL: tiny_gpt2}, token=token)) as server:
        open_page(page, server.url + "?token=" + token)
        page.fill("#free-text", FACT)
        page.wait_for_selector("#key-triple_subject")
        page.click('button[aria-label="Remove triple_subject"]')
        page.wait_for_selector("#method-causal_tracing[disabled]")
        reasons = page.inner_text('.method[data-method="causal_tracing"] .reasons')
        assert "triple_subject" in reasons

        page.click("#tab-dataset")
        page.wait_for_selector("#record-0:checked")
        page.select_option("#dataset-select", "counterfact")
        page.wait_for_selector("#records-page:text('of')")
        page.check("#record-2")
        page.wait_for_selector("#method-causal_tracing:not([disabled])")
        assert page.is_checked("#record-2")

        with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as api:
            ids = [api.post("/api/runs", json={"model": MODEL, "text": text, "methods": ["logit_lens"]}).json()["id"]
                   for text in (FACT, "The Colosseum is located in the city of Rome")]
            for run_id in ids:
                assert wait_done(api, run_id)["status"] == "done"
        open_page(page, server.url + "#/runs")  # the token stays in the session
        for run_id in ids:
            page.check(f"#pick-{run_id}")
        page.click("#compare-btn")
        page.wait_for_selector("#compare-left .js-plotly-plot")
        page.wait_for_selector("#compare-right .js-plotly-plot")
        assert sorted([page.input_value("#compare-a"), page.input_value("#compare-b")]) == sorted(ids)
        assert "Colosseum" in page.inner_text("#compare-diff") and "Eiffel" in page.inner_text("#compare-diff")


def test_the_saved_report_draws_every_figure_offline(page: Any, tmp_path: Path, tiny_gpt2: Any) -> None:
    """index.html from file:// (no server, no network): every figure drawn, whatever the strings in the report."""
    import knowmri as km

    hostile = " <!--<script>"
    other = second_method()
    report = km.diagnose({"prompt": "The Eiffel Tower is located in the city of", "triple_subject": "Eiffel Tower",
                          "ground_truth": hostile}, tiny_gpt2, methods=["logit_lens", other],
                         params={other: {"steps": 4}} if other == "integrated_gradients" else None, progress=False)
    report.save(tmp_path)
    n_figures = sum(len(r.figures) for r in report.results.values())
    assert n_figures >= 2
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_())
    page.goto((tmp_path / "index.html").as_uri())
    page.wait_for_function(f"document.querySelectorAll('#report .js-plotly-plot').length === {n_figures}")
    for name in ("logit_lens", other):
        assert page.inner_text(f'#report [data-method="{name}"] .badge') == "ok"
    assert hostile.strip() in page.inner_text("#report .report-head")
    assert page.locator("#report .consensus .verdict").inner_text()
    assert page.locator("#report table.data").count() >= 2


def test_cancel_a_queued_run(page: Any, tmp_path: Path, tiny_gpt2: Any) -> None:
    import httpx

    with BackgroundServer(create_app(home=tmp_path, models={MODEL: tiny_gpt2}, worker=False)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as api:
            if "/api/runs/{run_id}/cancel" not in api.get("/api/openapi.json").json()["paths"]:
                pytest.skip("this server has no POST /api/runs/{id}/cancel")
            run_id = api.post("/api/runs", json={"model": MODEL, "text": FACT, "methods": ["logit_lens"]}).json()["id"]
        open_page(page, server.url + f"#/run/{run_id}")
        page.wait_for_selector("#run-status .badge:text('queued')")
        page.click("#cancel-run")
        page.wait_for_selector("#run-status .badge:text('cancelled')")
        assert page.is_hidden("#cancel-run") and page.is_hidden("#progress-card")
        assert "cancelled" in page.inner_text("#run-note")
        open_page(page, server.url + "#/runs")
        page.wait_for_selector(f'#runs-table tr[data-run="{run_id}"] .badge:text("cancelled")')
        assert page.locator(f'#runs-table tr[data-run="{run_id}"] button:text("Delete")').count() == 1


def test_a_dataset_run_shows_its_estimate_progress_and_a_sortable_table_of_records(page: Any, tmp_path: Path,
                                                                                     tiny_gpt2: Any) -> None:
    with BackgroundServer(create_app(home=tmp_path, models={MODEL: tiny_gpt2})) as server:
        open_page(page, server.url)
        page.click("#tab-dataset")
        page.wait_for_selector("#record-0:checked")
        page.check("#scope-samples")
        page.fill("#samples-input", "3")
        choose_methods(page, ["logit_lens"])
        page.wait_for_selector("#run-estimate:has-text('3 records')")
        assert "≈" in page.inner_text("#run-estimate") and page.inner_text("#run-btn") == "Run on 3 records"
        page.click("#run-btn")
        page.wait_for_url(re.compile(r"#/run/[0-9a-f]{16}$"))
        run_id = page.url.rsplit("/", 1)[-1]
        page.wait_for_selector("#run-report .samples-table tbody tr >> nth=2")
        assert page.inner_text("#run-status") == "done"
        assert page.locator("#run-report .samples-table tbody tr").count() == 3
        probs = page.locator("#run-report .samples-table th[data-column=answer_prob] button")
        probs.click()
        assert page.get_attribute("#run-report .samples-table th[data-column=answer_prob]", "aria-sort") == "ascending"
        column = [page.locator("#run-report .samples-table th").all_inner_texts().index("P(answer)")]

        def shown() -> list[float]:
            rows = page.locator("#run-report .samples-table tbody tr")
            return [float(rows.nth(i).locator("td").nth(column[0]).inner_text()) for i in range(rows.count())]

        assert shown() == sorted(shown())
        probs.click()
        assert page.get_attribute("#run-report .samples-table th[data-column=answer_prob]", "aria-sort") == "descending"
        assert shown() == sorted(shown(), reverse=True)
        page.click('#run-report .samples-table tr[data-index="1"] td:first-child a')
        page.wait_for_url(re.compile(rf"#/run/{run_id}/sample/1$"))
        page.wait_for_selector('#run-report [data-method="logit_lens"] .js-plotly-plot')
        assert "record 1" in page.inner_text("#run-title")
        page.click("#run-status a")
        page.wait_for_selector("#run-report .samples-table")
        open_page(page, server.url + "#/runs")
        assert "known_1000, first 3 records" in page.inner_text(f'#runs-table tr[data-run="{run_id}"]')
        with httpx_client(server.url) as api:
            progress = api.get(f"/api/runs/{run_id}").json()["progress"]
        assert progress["samples_done"] == 3 and progress["estimate_seconds"] > 0


def test_the_saved_dataset_report_links_each_record(page: Any, tmp_path: Path, tiny_gpt2: Any) -> None:
    """A dataset run's index.html (file://): the samples table sorts, and each row links its saved file."""
    import knowmri as km

    km.diagnose(km.load_dataset("known_1000"), tiny_gpt2, methods=["logit_lens"], samples=3, out=tmp_path,
                progress=False)
    page.goto((tmp_path / "index.html").as_uri())
    page.wait_for_selector("#report .samples-table tbody tr >> nth=2")
    assert page.get_attribute('#report .samples-table tr[data-index="2"] td:first-child a', "href") == "samples/000002.json"
    page.click("#report .samples-table th[data-column=index] button")
    assert page.locator("#report .samples-table tbody tr").first.get_attribute("data-index") == "2"


def httpx_client(url: str) -> Any:
    import httpx

    return httpx.Client(base_url=url, timeout=30)

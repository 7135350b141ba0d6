"""Reports inline in notebooks (the page's renderer, Plotly once per session, styles scoped to the output)
and the tidy DataFrames of a report's findings."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from knowmri.report import figures, notebook
from knowmri.report.report import Report
from knowmri.report.result import MethodResult
from tests.report.test_html import HOSTILE


def result(name: str, findings: dict[str, Any], *, status: str = "ok", figure: bool = True) -> MethodResult:
    r = MethodResult(method=name, path=["Test"], status=status, summary=f"{name} found something", findings=findings)
    if figure:
        r.add_figure(f"{name} figure", figures.bars(["a", "b"], [1.0, 2.0], title=name, x_title="x", y_title="y"))
    r.add_table(f"{name} table", ["a", "b"], [[1, 2.5]])
    return r


def report() -> Report:
    tokens = ["The", " Eiffel", " Tower", " is", " in"]
    return Report(model={"name": "m", "n_layers": 2}, sample={"prompt": "The Eiffel Tower is in", "ground_truth": " Paris"},
                  results={
                      "tracer": result("tracer", {
                          "tokens": tokens, "roles": ["before_subject", "subject_first", "subject_last", "subsequent_first", "last"],
                          "token_scores": [{"index": i, "token": t, "score": 0.1 * i} for i, t in enumerate(tokens)],
                          "layer_scores": [{"layer": 0, "score": 0.2}, {"layer": 1, "score": 0.7}], "layer_scores_kind": "mlp"}),
                      "attr": result("attr", {
                          "token_scores": [{"index": 1, "token": " Eiffel", "score": 2.0, "special": False, "role": "subject"}],
                          "neurons": [{"layer": 1, "unit": 7, "score": 3.0, "top_tokens": ["Paris"]},
                                      {"layer": 0, "unit": 2, "score": 1.0, "generic": True}]}),
                      "moe": result("moe", {"neurons": [{"layer": 1, "unit": 3, "expert": 5, "score": 0.5}]}, figure=False),
                      "broken": result("broken", {"token_scores": [{"index": 0, "token": "x", "score": 9.0}]}, status="error"),
                  }, consensus={"verdict": "they agree"})


def test_output_carries_the_renderer_the_data_and_plotly_once_per_session() -> None:
    notebook.forget_plotly()
    r = report()
    first, second = r._repr_html_(), r._repr_html_()
    assert notebook.inline_asset("plotly.js")[:2000] in first and notebook.inline_asset("plotly.js")[:2000] not in second
    for html in (first, second):
        assert notebook.inline_asset("render.js") in html and "renderReport(" in html
        assert len(re.findall(r'<script type="module">', html)) == 1
    ids = [re.search(r'id="(knowmri-nb-\d+)"', h).group(1) for h in (first, second)]
    assert ids[0] != ids[1]
    notebook.forget_plotly()
    assert notebook.inline_asset("plotly.js")[:2000] in r._repr_html_()
    bundle = r._repr_mimebundle_()
    assert bundle["text/plain"] == r.summary() and "renderReport(" in bundle["text/html"]


def test_hostile_strings_stay_inside_the_data() -> None:
    text = " ".join(HOSTILE)
    r = Report(model={"name": text}, sample={"prompt": text}, results={"m": result("m", {"token_scores": [
        {"index": 0, "token": text, "score": 1.0}]})})
    html = notebook.notebook_html(r.to_dict(), include_plotly=False)
    module = html.split('<script type="module">', 1)[1]
    assert module.lower().count("</script") == 1 and "<!--" not in html
    assert text not in html  # every string went through the escaped JSON


def test_styles_are_scoped_to_the_output() -> None:
    css = notebook.scoped_css()
    selectors = [s.strip() for rule in re.findall(r"([^{}]+)\{[^{}]*\}", css) for s in rule.split(",")]
    assert selectors and all(s.startswith(".knowmri-nb") for s in selectors), [s for s in selectors if not s.startswith(".knowmri-nb")]
    assert "@media" in css and ".knowmri-nb table.data th" in css and ".knowmri-nb *:focus-visible" in css


def test_a_result_and_a_part_of_the_report_render_alone() -> None:
    r = report()
    html = r["attr"]._repr_html_()
    data = json.loads(re.search(r"renderReport\([^,]+, (\{.*\}), \{plotly", html).group(1))
    assert list(data["results"]) == ["attr"] and data["results"]["attr"]["summary"] == "attr found something"
    part = notebook.select(r.to_dict(), "tracer")
    assert list(part["results"]) == ["tracer"] and part["consensus"] == {}
    with pytest.raises(ValueError, match="no result for 'nope'.*tracer, attr"):
        r.show("nope")


def test_show_displays_through_ipython(monkeypatch: pytest.MonkeyPatch) -> None:
    display = pytest.importorskip("IPython.display")
    shown = []
    monkeypatch.setattr(display, "display", lambda obj, raw=False: shown.append(obj))
    report().show(["attr", "moe"])
    assert "renderReport(" in shown[0]["text/html"]
    assert "- attr [ok]" in shown[0]["text/plain"] and "tracer" not in shown[0]["text/plain"].split("\n", 1)[1]


def test_token_scores_frame_is_tidy_with_roles() -> None:
    pytest.importorskip("pandas")
    df = report().token_scores()
    assert list(df.columns[:5]) == ["method", "index", "token", "role", "score"]
    assert set(df["method"]) == {"tracer", "attr"}  # the failed result is left out
    tracer = df[df["method"] == "tracer"]
    assert tracer["role"].tolist() == ["before_subject", "subject_first", "subject_last", "subsequent_first", "last"]
    assert df[df["method"] == "attr"].iloc[0][["role", "special"]].tolist() == ["subject", False]


def test_layer_and_neuron_frames() -> None:
    pytest.importorskip("pandas")
    r = report()
    layers = r.layer_scores()
    assert list(layers.columns) == ["method", "layer", "score", "basis"] and layers["score"].tolist() == [0.2, 0.7]
    neurons = r.neurons()
    assert list(neurons.columns[:6]) == ["method", "layer", "unit", "expert", "score", "generic"]
    assert neurons[["method", "unit", "generic", "rank"]].values.tolist() == [
        ["attr", 7, False, 1], ["attr", 2, True, 2], ["moe", 3, False, 1]]
    assert neurons["top_tokens"].iloc[0] == ["Paris"] and neurons["expert"].iloc[2] == 5


def test_dataset_token_scores_come_from_each_sample(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    one = report()
    per_sample = {"results": {n: x.to_dict() for n, x in one.results.items()}}
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "1.json").write_text(json.dumps(per_sample))
    ds = Report(model={"name": "m"}, sample={"dataset": "known_1000", "samples": 2}, results={},
                meta={"samples": [{"index": 0, **per_sample}, {"index": 1, "file": "samples/1.json"}]})
    df = ds.token_scores(tmp_path)
    assert list(df.columns[:6]) == ["method", "sample", "index", "token", "role", "score"]
    assert df.groupby("sample").size().tolist() == [6, 6]
    assert len(ds.token_scores()) == 6  # without the directory, only the results the report holds
    empty = Report(model={}, sample={"dataset": "d", "samples": 0}).token_scores()
    assert empty.empty and "sample" in empty.columns


def test_frames_say_how_to_get_pandas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        report().neurons()


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Chromium at {CHROMIUM}")
def test_outputs_draw_their_figures_in_a_browser_with_requirejs_on_the_page(tmp_path: Path) -> None:
    """Two outputs as a notebook front end inserts them (the first carries Plotly), on a page where an AMD
    `define` is present (classic Notebook): both draw every figure, and the notebook's own styles stay."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from knowmri.server.background import launch_chromium

    notebook.forget_plotly()
    r = report()
    outputs = [r._repr_html_(), r["attr"]._repr_html_()]
    page_html = ("<!doctype html><html><head><script>function define() {} define.amd = {};</script></head>"
                 "<body><h2 id='own'>notebook</h2><div id='cells'></div><script>const outputs = "
                 + json.dumps(outputs).replace("</", "<\\/") + """;
for (const html of outputs) {   // as JupyterLab does: insert the HTML, then re-create its scripts to run them
  const cell = document.createElement("div");
  cell.innerHTML = html;
  document.getElementById("cells").append(cell);
  for (const old of cell.querySelectorAll("script")) {
    const s = document.createElement("script");
    for (const a of old.attributes) s.setAttribute(a.name, a.value);
    s.textContent = old.textContent;
    old.replaceWith(s);
  }
}
</script></body></html>""")
    (tmp_path / "nb.html").write_text(page_html, encoding="utf-8")
    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto((tmp_path / "nb.html").as_uri())
            page.wait_for_function("document.querySelectorAll('.knowmri-nb .figure.js-plotly-plot').length === 4",
                                   timeout=30_000)
            assert page.locator(".knowmri-nb section.card").count() >= 5
            assert page.evaluate("getComputedStyle(document.getElementById('own')).fontSize") == "24px"
            assert page.evaluate("typeof define") == "function"
            assert not errors, errors
        finally:
            browser.close()

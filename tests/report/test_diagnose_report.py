"""diagnose -> Report: error isolation, report.json shape, save/load, self-contained HTML."""

import json
from dataclasses import dataclass

import pytest

import knowmri as km
from knowmri.methods.base import Method, Params, register_method, unregister_method
from knowmri.testing import tiny_model

FACT = {"prompt": "The Eiffel Tower is located in the city of", "ground_truth": " Paris", "triple_subject": "Eiffel Tower"}


@pytest.fixture
def failing_method():
    @dataclass
    class P(Params):
        pass

    @register_method
    class Boom(Method):
        name = "boom_test"
        title = "Always fails"
        path = ("External", "Test")
        Params = P

        def run(self, model, sample, params, ctx):
            raise RuntimeError("deliberate failure")

    yield "boom_test"
    unregister_method("boom_test")


def test_failing_method_does_not_sink_the_report(failing_method):
    model = tiny_model("gpt2")
    report = km.diagnose(km.Sample(FACT), model, methods=["boom_test", "logit_lens"], progress=False)
    assert report["boom_test"].status == "error" and "deliberate failure" in report["boom_test"].error
    assert report["logit_lens"].status == "ok"
    assert report["logit_lens"].seconds >= 0


def test_report_json_shape_and_roundtrip(tmp_path):
    model = tiny_model("llama")
    report = km.diagnose(FACT, model, methods=["logit_lens"], params={"logit_lens": {"top_k": 3}}, progress=False)
    data = report.to_dict()
    assert {"knowmri_version", "model", "sample", "results", "consensus"} <= set(data)
    assert {"name", "architecture", "n_layers", "d_model", "d_mlp", "kind"} <= set(data["model"])
    r = data["results"]["logit_lens"]
    assert {"method", "path", "status", "error", "seconds", "params", "summary", "findings", "tables", "figures"} <= set(r)
    assert r["params"]["top_k"] == 3
    assert len(r["findings"]["target_prob"]) == model.n_layers
    assert all(t["name"] and t["columns"] for t in r["tables"])
    assert all("data" in f["plotly"] for f in r["figures"])
    out = report.save(tmp_path / "rep")
    saved = json.loads((out / "report.json").read_text())
    assert saved["results"]["logit_lens"]["findings"]["target_rank"] == r["findings"]["target_rank"]
    html = (out / "index.html").read_text()
    assert "Plotly.newPlot" in html and "<script src=" not in html and '<link href="http' not in html
    again = km.Report.load(out)
    assert again.to_dict()["results"] == data["results"]


def test_bad_params_give_an_error_result():
    report = km.diagnose(FACT, tiny_model("gpt2"), methods=["logit_lens"], params={"logit_lens": {"top_k": 0}}, progress=False)
    assert report["logit_lens"].status == "error" and "top_k" in report["logit_lens"].error


def test_ineligible_method_is_skipped_with_reason():
    report = km.diagnose({"prompt": "Hello there"}, tiny_model("gpt2"), methods=["logit_lens"], progress=False)
    assert report["logit_lens"].status == "ok"
    assert report["logit_lens"].findings["answer_source"] == "model prediction"


def test_unknown_method_and_params_fail_fast():
    with pytest.raises(ValueError, match="unknown method"):
        km.diagnose(FACT, tiny_model("gpt2"), methods=["nope"], progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        km.diagnose(FACT, tiny_model("gpt2"), methods=["logit_lens"], params={"nope": {}}, progress=False)


def test_load_rejects_garbage(tmp_path):
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        km.Report.load(tmp_path)
    with pytest.raises(ValueError, match="no report.json"):
        km.Report.load(tmp_path / "missing")


def test_html_escapes_script_breaking_tokens(tmp_path):
    from knowmri.report.html import render_html

    data = {"model": {}, "sample": {"prompt": "</script><b>x</b>"}, "consensus": {},
            "results": {"m": {"status": "ok", "path": ["X"], "seconds": 0, "params": {}, "summary": "<i>s</i>",
                              "figures": [{"name": "f", "plotly": {"data": [{"x": ["</script>"]}], "layout": {}}}],
                              "tables": []}}}
    html = render_html(data, include_js=False)
    assert "</script><b>" not in html and "\\u003ci\\u003es\\u003c/i\\u003e" in html

"""The saved page: the report travels as escaped JSON, so no string in it changes the page's structure,
and the renderer it inlines is the web UI's own."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from knowmri.report.html import ASSETS, DATA_ID, inline_asset, render_html, script_json

HOSTILE = ["</script>", "<!--", "<script>", "<!--<script>", "</SCRIPT >", "-->", "</style>", "a & b", "\u2028\u2029",
           "<img src=x onerror=alert(1)>", "]]>"]


def hostile_report() -> dict:
    text = " ".join(HOSTILE)
    return {
        "knowmri_version": "0", "model": {"name": text, "n_layers": 2},
        "sample": {"prompt": "The Eiffel Tower is in" + text, "ground_truth": " <!--<script>"},
        "consensus": {"verdict": text, "tables": [{"name": text, "columns": [text], "rows": [[text], [1.5]]}]},
        "results": {"m</script>": {
            "method": "m</script>", "path": [text], "status": "ok", "error": None, "seconds": 0.1,
            "params": {"p": text}, "summary": text, "findings": {"token_scores": [{"index": 0, "token": text, "score": 1.0}]},
            "tables": [{"name": text, "columns": ["token", "score"], "rows": [[t, 0.5] for t in HOSTILE]}],
            "figures": [{"name": text, "plotly": {"data": [{"type": "bar", "x": HOSTILE, "y": list(range(len(HOSTILE)))}],
                                                 "layout": {"title": {"text": text}}}}]}},
    }


def script_blocks(html: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>", html, flags=re.IGNORECASE)


def embedded(html: str) -> dict:
    match = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', html, flags=re.DOTALL)
    assert match, "no data block"
    return json.loads(match.group(1))


@pytest.mark.parametrize("include_js", [False, True])
def test_hostile_strings_leave_the_page_structure_alone(include_js: bool) -> None:
    data = hostile_report()
    html = render_html(data, include_js=include_js)
    expected = ['<script type="application/json" id="knowmri-report-data">', '<script type="module">']
    assert script_blocks(html) == (["<script>"] if include_js else []) + expected
    assert len(re.findall(r"</script", html, flags=re.IGNORECASE)) == len(expected) + include_js
    assert "<!--" not in html and "</style" not in html.split("</style>", 1)[1]
    assert embedded(html) == data  # the data round-trips exactly
    block = html.split(expected[0], 1)[1].split("</script>", 1)[0]
    assert not set(block) & {"<", ">", "&", "\u2028", "\u2029"}


def test_script_json_escapes_and_round_trips() -> None:
    text = script_json({"s": "<a>&</a>\u2028", "n": [1, 2.5, None]})
    assert text == '{"s":"\\u003ca\\u003e\\u0026\\u003c/a\\u003e\\u2028","n":[1,2.5,null]}'
    assert json.loads(text) == {"s": "<a>&</a>\u2028", "n": [1, 2.5, None]}


def test_non_finite_and_numpy_values_become_plain_json() -> None:
    got = json.loads(script_json({"a": [math.nan, 1.0, math.inf], "b": np.float32(0.5), "c": np.arange(3)}))
    assert got == {"a": [None, 1.0, None], "b": 0.5, "c": [0, 1, 2]}


def test_the_page_inlines_the_uis_renderer_and_styles() -> None:
    html = render_html({"model": {}, "sample": {"prompt": "p"}, "results": {}}, include_js=False)
    assert (ASSETS / "render.js").read_text(encoding="utf-8") in html
    assert (ASSETS / "report.css").read_text(encoding="utf-8") in html
    assert "http://" not in html and "https://" not in html and " src=" not in html  # nothing fetched
    for name in ("render.js", "report.css", "plotly.js"):
        assert inline_asset(name)  # safe to inline (no script end or comment opener)


def test_title_is_escaped() -> None:
    html = render_html({"model": {}, "sample": {"prompt": "</title><script>x</script>"}, "results": {}}, include_js=False)
    assert "<title>knowmri report: &lt;/title&gt;&lt;script&gt;x&lt;/script&gt;</title>" in html

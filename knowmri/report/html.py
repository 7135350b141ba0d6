"""Render report.json as one self-contained, offline HTML page.

The page is drawn by the web UI's own report renderer (`static/render.js`, styled by
`static/report.css`), inlined with Plotly's bundle, so it opens from file:// with no network and no
build step. The report travels as data, never as markup: a `<script type="application/json">` block
with `<`, `>`, `&`, U+2028 and U+2029 escaped, which the page reads with JSON.parse, so no string in a
report (a prompt, a token, a table cell) can change the page's structure.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "static"
DATA_ID = "knowmri-report-data"
_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026", 0x2028: "\\u2028", 0x2029: "\\u2029"}
_NOT_INLINABLE = ("</script", "<!--", "</style")


@cache
def plotly_js() -> str:
    """Plotly's JavaScript bundle, from the installed `plotly` package (no CDN)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


@cache
def inline_asset(name: str) -> str:
    """A file of the renderer (`render.js`, `report.css`), or Plotly's bundle (`plotly.js`), checked to be
    safe inside an inline <script> or <style> element."""
    text = plotly_js() if name == "plotly.js" else (ASSETS / name).read_text(encoding="utf-8")
    lowered = text.lower()
    for marker in _NOT_INLINABLE:
        if marker in lowered:
            raise RuntimeError(f"{name} contains {marker!r}, which would end or comment out its inline element")
    return text


def script_json(data: Any) -> str:
    """`data` as JSON that cannot end or comment out the <script type="application/json"> it is put in."""
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_plain)
    except ValueError:  # NaN or infinity somewhere: JSON.parse reads neither
        text = json.dumps(_finite(data), ensure_ascii=False, separators=(",", ":"), default=_plain)
    return text.translate(_ESCAPES)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python values; anything else as its text."""
    if hasattr(value, "tolist"):
        return _finite(value.tolist())
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _env() -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("knowmri.report", "templates"),
                              autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)


def render_html(data: dict[str, Any], *, include_js: bool = True) -> str:
    """The page for one report dict (as `Report.to_dict()` returns); `include_js=False` leaves Plotly out."""
    sample = data.get("sample") or {}
    title = sample.get("prompt") or sample.get("dataset") or "dataset"
    return _env().get_template("report.html.j2").render(
        title=title, data_id=DATA_ID, data_json=script_json(data), report_css=inline_asset("report.css"),
        render_js=inline_asset("render.js"), plotly_js=inline_asset("plotly.js") if include_js else "")

"""Render report.json as one self-contained, offline HTML page (Plotly inlined, every table)."""

from __future__ import annotations

import json
from functools import cache
from typing import Any


@cache
def plotly_js() -> str:
    """Plotly's JavaScript bundle, from the installed `plotly` package (no CDN)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _env() -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("knowmri.report", "templates"),
                              autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_html(data: dict[str, Any], *, include_js: bool = True) -> str:
    """The page for one report dict (as `Report.to_dict()` returns)."""
    env = _env()
    env.filters["fmt"] = _fmt
    figures = []
    for name, result in data.get("results", {}).items():
        for i, fig in enumerate(result.get("figures") or []):
            text = json.dumps(fig.get("plotly", {}), allow_nan=False).replace("</", "<\\/")
            figures.append({"id": f"fig-{name}-{i}", "json": text})
    template = env.get_template("report.html.j2")
    return template.render(data=data, figures=figures, plotly_js=plotly_js() if include_js else "",
                           sample_json=json.dumps(data.get("sample", {}), indent=2))

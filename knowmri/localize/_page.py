"""The HTML page of a dataset-level result, in the report's style (one card, interactive figures, tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_page(path: Path, title: str, data: dict[str, Any], figures: list[tuple[str, Any]],
               tables: list[dict[str, Any]]) -> None:
    """Render `data` (a result's to_dict()) with its figures and tables through the report template."""
    from knowmri.report.html import render_html

    path.write_text(render_html(page_data(title, data, figures, tables)), encoding="utf-8")


def notebook_output(title: str, data: dict[str, Any], figures: list[tuple[str, Any]],
                    tables: list[dict[str, Any]]) -> str:
    """The same page's content as a notebook output (drawn inline in Jupyter and VS Code)."""
    from knowmri.report.notebook import notebook_html

    return notebook_html(page_data(title, data, figures, tables))


def page_data(title: str, data: dict[str, Any], figures: list[tuple[str, Any]],
              tables: list[dict[str, Any]]) -> dict[str, Any]:
    """A dataset-level result as a report dict with one result (what the report renderer draws)."""
    from knowmri.report.result import jsonable

    name = data.get("kind", "result")
    dataset = data.get("dataset") or {}
    page = {
        "knowmri_version": data.get("knowmri_version"),
        "model": data.get("model", {}),
        "sample": {"dataset": dataset.get("name"), "samples": dataset.get("samples"),
                   "description": dataset.get("description")},
        "results": {name: {
            "method": name, "path": ["Dataset", title], "status": "ok", "error": None,
            "seconds": data.get("seconds", 0.0), "params": data.get("params", {}), "summary": data.get("summary", ""),
            "figures": [{"name": n, "plotly": jsonable(f.to_plotly_json() if hasattr(f, "to_plotly_json") else f)}
                        for n, f in figures],
            "tables": tables,
        }},
    }
    page["sample"] = {k: v for k, v in page["sample"].items() if v is not None}
    return page

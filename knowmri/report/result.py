"""`MethodResult`, one method's outcome on one sample, and `jsonable`: the report's data types.

They sit below the methods (which fill them) and the cross-method analysis (which reads them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MethodResult:
    """One method's outcome on one sample: the `results.<name>` block of report.json."""

    method: str
    path: list[str]
    status: str = "ok"
    error: str | None = None
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    findings: dict[str, Any] = field(default_factory=dict)
    tables: list[dict[str, Any]] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)
    arrays: dict[str, Any] = field(default_factory=dict)

    def add_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.tables.append({"name": name, "columns": list(columns), "rows": [list(r) for r in rows]})

    def add_figure(self, name: str, figure: Any) -> None:
        """Add a Plotly figure (its JSON dict, as `knowmri.report.figures` builds it, or a `go.Figure`).

        The figure is stored as plain JSON; the shared template of `knowmri.report.figures` (plain
        JSON already) is kept by reference, not copied into every figure."""
        from knowmri.report.figures import is_shared_template

        plotly = figure if isinstance(figure, dict) else figure.to_plotly_json() if hasattr(figure, "to_plotly_json") else figure
        layout = plotly.get("layout") if isinstance(plotly, dict) else None
        template = layout.get("template") if isinstance(layout, dict) else None
        if template is not None and is_shared_template(template):
            plotly = jsonable({**plotly, "layout": {k: v for k, v in layout.items() if k != "template"}})
            plotly["layout"]["template"] = template
        else:
            plotly = jsonable(plotly)
        self.figures.append({"name": name, "plotly": plotly})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("arrays")
        return jsonable(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def _repr_html_(self) -> str:
        """This result drawn inline in a notebook, as the report's page draws it."""
        from knowmri.report.notebook import notebook_html, result_page

        return notebook_html(result_page(self.to_dict()))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/html": self._repr_html_(), "text/plain": f"{self.method} [{self.status}]: {self.summary or self.error or ''}"}


def jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy/torch values, recursively (NaN becomes None)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "dim"):
        return obj.detach().cpu().tolist()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj

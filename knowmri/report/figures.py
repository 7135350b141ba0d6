"""Plotly figure builders shared by methods (heatmaps, bars, lines) with consistent styling.

Figures are built as plain Plotly JSON (`{"data": [...], "layout": {...}}`), the same JSON that
`go.Figure(...).to_plotly_json()` gives, without going through `plotly.graph_objects` (whose
validation, deep copies and template expansion cost tens of milliseconds per figure). The
"plotly_white" template's JSON and named colour scales are expanded once per process.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

TEMPLATE = "plotly_white"
MARGIN = {"l": 60, "r": 20, "t": 50, "b": 60}
_CONTAINERS = frozenset({"title", "xaxis", "yaxis", "legend", "margin", "font", "coloraxis", "scene"})


_SHARED: dict[int, dict[str, Any]] = {}


@cache
def template_json(name: str = TEMPLATE) -> dict[str, Any]:
    """A Plotly template as JSON (what `go.Figure(layout={"template": name})` stores); shared, do not mutate."""
    import plotly.io as pio

    value = pio.templates[name].to_plotly_json()
    _SHARED[id(value)] = value
    return value


def is_shared_template(obj: Any) -> bool:
    """Whether `obj` is a template JSON this module shares between figures (plain JSON; never copied)."""
    return _SHARED.get(id(obj)) is obj


@cache
def _colorscale(name: str) -> tuple[tuple[float, str], ...]:
    from _plotly_utils.basevalidators import ColorscaleValidator

    return tuple(tuple(pair) for pair in ColorscaleValidator("colorscale", "heatmap").validate_coerce(name))


def expand_colorscale(name: str | Sequence[Any]) -> list[list[Any]]:
    """A named colour scale ("Blues", "RdBu_r", ...) as Plotly.py expands it: [[position, colour], ...]."""
    if isinstance(name, str):
        return [list(pair) for pair in _colorscale(name)]
    return [list(pair) for pair in name]


class Figure(dict):
    """Plotly figure JSON (a dict with "data" and "layout"), with the two `go.Figure` calls methods use."""

    def to_plotly_json(self) -> dict[str, Any]:
        return dict(self)

    def update_layout(self, layout: dict[str, Any] | None = None, **kwargs: Any) -> Figure:
        """Merge layout properties (nested dicts merge; `xaxis_title="t"` sets xaxis.title.text)."""
        target = self.setdefault("layout", {})
        for key, value in {**(layout or {}), **kwargs}.items():
            parts = key.split("_")
            _set(target, parts if len(parts) > 1 and parts[0] in _CONTAINERS else [key], value)
        return self


def _set(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    key = path[-1]
    if key == "title" and isinstance(value, str):
        value = {"text": value}
    if isinstance(value, dict) and isinstance(target.get(key), dict):
        for k, v in value.items():
            _set(target[key], [k], v)
    else:
        target[key] = copy.deepcopy(value)


def figure(data: Iterable[dict[str, Any]], *, title: str, x_title: str | None = None, y_title: str | None = None,
           margin: dict[str, int] | None = None, **layout: Any) -> Figure:
    """A figure from trace dicts (each with its "type"), with the standard title, axes and template."""
    out: dict[str, Any] = {"title": {"text": title}}
    if margin is not None:
        out["margin"] = dict(margin)
    if x_title is not None:
        out["xaxis"] = {"title": {"text": x_title}}
    if y_title is not None:
        out["yaxis"] = {"title": {"text": y_title}}
    out.update(layout)
    out["template"] = template_json()
    return Figure(data=list(data), layout=out)


def heatmap(z: Sequence[Sequence[float]], x: Sequence[Any], y: Sequence[Any], *, title: str, x_title: str,
            y_title: str, text: Sequence[Sequence[str]] | None = None, colorscale: str = "Blues",
            zmin: float | None = None, zmax: float | None = None, colorbar: str = "",
            reverse_y: bool = False) -> Figure:
    """A labelled heatmap; `text` annotates each cell (e.g. a decoded token); `reverse_y` puts y[0] on top."""
    trace: dict[str, Any] = {
        "colorbar": {"title": {"text": colorbar}},
        "colorscale": expand_colorscale(colorscale),
        "hovertemplate": f"{x_title}: %{{x}}<br>{y_title}: %{{y}}<br>value: %{{z:.4g}}<extra></extra>",
        "x": [str(v) for v in x],
        "y": [str(v) for v in y],
        "z": [list(map(float, row)) for row in z],
    }
    if zmin is not None:
        trace["zmin"] = zmin
    if zmax is not None:
        trace["zmax"] = zmax
    if text is not None:
        trace["text"] = [list(map(str, row)) for row in text]
        trace["texttemplate"] = "%{text}"
        trace["hovertemplate"] = f"{x_title}: %{{x}}<br>{y_title}: %{{y}}<br>%{{text}}: %{{z:.4g}}<extra></extra>"
    trace["type"] = "heatmap"
    fig = figure([trace], title=title, x_title=x_title, y_title=y_title, margin=MARGIN)
    if reverse_y:
        fig["layout"]["yaxis"]["autorange"] = "reversed"
    return fig


def bars(labels: Sequence[Any], values: Sequence[float], *, title: str, x_title: str, y_title: str,
         horizontal: bool = False) -> Figure:
    """A bar chart (one bar per label)."""
    labels = [str(v) for v in labels]
    values = [float(v) for v in values]
    trace = ({"orientation": "h", "x": values, "y": labels, "type": "bar"} if horizontal
             else {"x": labels, "y": values, "type": "bar"})
    return figure([trace], title=title, x_title=x_title, y_title=y_title, margin=MARGIN)


def lines(x: Sequence[Any], series: dict[str, Sequence[float]], *, title: str, x_title: str, y_title: str) -> Figure:
    """Several named lines over a shared x axis."""
    xs = list(x)
    traces = [{"mode": "lines+markers", "name": name, "x": list(xs), "y": [float(v) for v in ys], "type": "scatter"}
              for name, ys in series.items()]
    return figure(traces, title=title, x_title=x_title, y_title=y_title, margin=MARGIN)

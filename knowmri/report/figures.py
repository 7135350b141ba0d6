"""Plotly figure builders shared by methods (heatmaps, bars, lines) with consistent styling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _go() -> Any:
    import plotly.graph_objects as go

    return go


def heatmap(z: Sequence[Sequence[float]], x: Sequence[Any], y: Sequence[Any], *, title: str, x_title: str,
            y_title: str, text: Sequence[Sequence[str]] | None = None, colorscale: str = "Blues",
            zmin: float | None = None, zmax: float | None = None, colorbar: str = "") -> Any:
    """A labelled heatmap; `text` annotates each cell (e.g. a decoded token)."""
    go = _go()
    trace = go.Heatmap(z=[list(map(float, row)) for row in z], x=[str(v) for v in x], y=[str(v) for v in y],
                       colorscale=colorscale, zmin=zmin, zmax=zmax, colorbar={"title": {"text": colorbar}},
                       hovertemplate=f"{x_title}: %{{x}}<br>{y_title}: %{{y}}<br>value: %{{z:.4g}}<extra></extra>")
    if text is not None:
        trace.text = [list(map(str, row)) for row in text]
        trace.texttemplate = "%{text}"
        trace.hovertemplate = f"{x_title}: %{{x}}<br>{y_title}: %{{y}}<br>%{{text}}: %{{z:.4g}}<extra></extra>"
    fig = go.Figure(trace)
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white",
                      margin={"l": 60, "r": 20, "t": 50, "b": 60})
    return fig


def bars(labels: Sequence[Any], values: Sequence[float], *, title: str, x_title: str, y_title: str,
         horizontal: bool = False) -> Any:
    """A bar chart (one bar per label)."""
    go = _go()
    labels = [str(v) for v in labels]
    values = [float(v) for v in values]
    trace = go.Bar(y=labels, x=values, orientation="h") if horizontal else go.Bar(x=labels, y=values)
    fig = go.Figure(trace)
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white",
                      margin={"l": 60, "r": 20, "t": 50, "b": 60})
    return fig


def lines(x: Sequence[Any], series: dict[str, Sequence[float]], *, title: str, x_title: str, y_title: str) -> Any:
    """Several named lines over a shared x axis."""
    go = _go()
    fig = go.Figure([go.Scatter(x=list(x), y=[float(v) for v in ys], mode="lines+markers", name=name)
                     for name, ys in series.items()])
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white",
                      margin={"l": 60, "r": 20, "t": 50, "b": 60})
    return fig

"""The figure builders give the JSON that Plotly's own `go.Figure` gives (report.json and the pages
render it with plotly.js), without building `go.Figure` objects."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest

from knowmri.report import figures
from knowmri.report.result import MethodResult, jsonable

LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 60}}


def plain(fig) -> dict:
    """What `MethodResult.add_figure` stores."""
    result = MethodResult(method="m", path=[])
    result.add_figure("f", fig)
    return result.figures[0]["plotly"]


def reference_heatmap(z, x, y, *, title, x_title, y_title, text=None, colorscale="Blues", zmin=None, zmax=None,
                      colorbar="", reverse_y=False):
    trace = go.Heatmap(z=[list(map(float, row)) for row in z], x=[str(v) for v in x], y=[str(v) for v in y],
                       colorscale=colorscale, zmin=zmin, zmax=zmax, colorbar={"title": {"text": colorbar}},
                       hovertemplate=f"{x_title}: %{{x}}<br>{y_title}: %{{y}}<br>value: %{{z:.4g}}<extra></extra>")
    if text is not None:
        trace.text = [list(map(str, row)) for row in text]
        trace.texttemplate = "%{text}"
        trace.hovertemplate = f"{x_title}: %{{x}}<br>{y_title}: %{{y}}<br>%{{text}}: %{{z:.4g}}<extra></extra>"
    fig = go.Figure(trace)
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, **LAYOUT)
    if reverse_y:
        fig.update_layout(yaxis={"autorange": "reversed"})
    return fig


@pytest.mark.parametrize("options", [
    {},
    {"text": [["a", "b", "c"], ["d", "e", "f"]], "colorscale": "Blues_r", "colorbar": "log10 rank"},
    {"colorscale": "RdBu", "zmin": -2.5, "zmax": 2.5},
    {"colorscale": "Oranges", "zmin": 0, "reverse_y": True},
])
def test_heatmap_matches_plotly(options):
    z = np.array([[0.1, 2, 3], [4, 5.5, -6]])
    args = (z, ["x0", 1, "x2"], [0, 1])
    labels = {"title": "A <b>title</b>", "x_title": "position", "y_title": "layer"}
    assert plain(figures.heatmap(*args, **labels, **options)) == plain(reference_heatmap(*args, **labels, **options))


@pytest.mark.parametrize("horizontal", [False, True])
def test_bars_match_plotly(horizontal):
    labels, values = ["a", 2, "c"], [1, np.float32(2.5), 3]
    trace = (go.Bar(y=[str(v) for v in labels], x=[float(v) for v in values], orientation="h") if horizontal
             else go.Bar(x=[str(v) for v in labels], y=[float(v) for v in values]))
    expected = go.Figure(trace).update_layout(title="t", xaxis_title="x", yaxis_title="y", **LAYOUT)
    got = figures.bars(labels, values, title="t", x_title="x", y_title="y", horizontal=horizontal)
    assert plain(got) == plain(expected)


def test_lines_match_plotly():
    series = {"P(' Paris')": [0.1, 0.2, 0.9], "other": np.array([1, 2, 3])}
    expected = go.Figure([go.Scatter(x=[0, 1, 2], y=[float(v) for v in ys], mode="lines+markers", name=name)
                          for name, ys in series.items()])
    expected.update_layout(title="t", xaxis_title="layer", yaxis_title="p", **LAYOUT)
    got = figures.lines(range(3), series, title="t", x_title="layer", y_title="p")
    assert plain(got) == plain(expected)


def test_update_layout_merges_like_plotly():
    fig = figures.heatmap([[1.0]], [0], [0], title="t", x_title="x", y_title="y")
    fig.update_layout(yaxis={"autorange": "reversed"}, legend_title_text="token", paper_bgcolor="white")
    expected = reference_heatmap([[1.0]], [0], [0], title="t", x_title="x", y_title="y", reverse_y=True)
    expected.update_layout(legend_title_text="token", paper_bgcolor="white")
    assert plain(fig) == plain(expected)


def test_the_template_is_built_once_and_shared():
    a = figures.bars(["a"], [1], title="a", x_title="x", y_title="y")
    b = figures.lines([0], {"s": [1]}, title="b", x_title="x", y_title="y")
    assert a["layout"]["template"] is b["layout"]["template"] is figures.template_json()
    json.dumps(jsonable(a))  # plain JSON


def test_stored_figures_reference_the_shared_template():
    result = MethodResult(method="m", path=[])
    result.add_figure("a", figures.bars(["a"], [1], title="a", x_title="x", y_title="y"))
    result.add_figure("b", figures.heatmap([[1.0]], [0], [0], title="b", x_title="x", y_title="y"))
    first, second = (f["plotly"]["layout"]["template"] for f in result.figures)
    assert first is second is figures.template_json()
    assert json.loads(json.dumps(result.to_dict()))["figures"][1]["plotly"]["layout"]["template"] == first

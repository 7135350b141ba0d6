"""The example notebooks run top to bottom through a real Jupyter kernel, in quick mode (KNOWMRI_QUICK=1:
tiny models, few samples), and the quick start shows its report inline with the page's renderer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.ipynb"))

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("nbclient", "ipykernel", "nbformat")),
    reason="needs the dev extra's nbclient, ipykernel and nbformat")


def execute_module():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import execute
    finally:
        sys.path.remove(str(EXAMPLES))
    return execute


def test_there_are_four_examples() -> None:
    assert len(NOTEBOOKS) == 4, NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_example_runs_in_a_kernel(name: str) -> None:
    book = execute_module().execute(EXAMPLES / name, quick=True, timeout=120)
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert html, "no rich output"
    if name.startswith("01_"):
        reports = [h for h in html if "renderReport(" in h]
        assert len(reports) == 2  # the whole report, then report.show("causal_tracing")
        assert "window.__knowmriDefine" in reports[0] and "window.__knowmriDefine" not in reports[1]
        assert any("<table" in h and "token" in h for h in html)  # report.token_scores() as a DataFrame


def test_saved_examples_carry_outputs_but_not_plotly() -> None:
    import nbformat

    for name in NOTEBOOKS:
        book = nbformat.read(EXAMPLES / name, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), f"{name} is not saved with its outputs"
        assert "window.__knowmriDefine" not in nbformat.writes(book), f"{name} carries Plotly's bundle"

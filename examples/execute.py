"""Run the example notebooks through a real Jupyter kernel, and save them with their outputs.

    python examples/execute.py                 # every notebook, full mode (SmolLM2), saved in place
    python examples/execute.py --quick         # KNOWMRI_QUICK=1: tiny models, in seconds (saved too)
    python examples/execute.py --quick --check # run only, save nothing
    python examples/execute.py 01_quickstart.ipynb

Saved outputs keep everything but Plotly's 5 MB bundle (sent with a session's first report): a saved
notebook's tables and text read as they are, and its figures draw again when the notebook runs.
Needs the `dev` extra (nbclient, ipykernel, nbformat).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
_BUNDLE = re.compile(r"<script>window\.__knowmriDefine = window\.define;.*?delete window\.__knowmriDefine;</script>",
                     re.DOTALL)


def execute(path: Path, *, quick: bool, timeout: int = 600) -> Any:
    """The notebook at `path`, run top to bottom in a fresh python3 kernel started in examples/."""
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    repo = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    if quick:
        env["KNOWMRI_QUICK"] = "1"
    else:
        env.pop("KNOWMRI_QUICK", None)
    client = NotebookClient(book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
    client.execute(env=env)
    return book


def strip_plotly(book: Any) -> int:
    """Remove Plotly's bundle from the notebook's outputs; how many outputs carried it."""
    count = 0
    for cell in book.cells:
        for output in cell.get("outputs", []):
            html = output.get("data", {}).get("text/html")
            if html is None:
                continue
            text = html if isinstance(html, str) else "".join(html)
            stripped, n = _BUNDLE.subn("", text)
            if n:
                output["data"]["text/html"] = stripped
                count += n
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebook names (default: every example)")
    parser.add_argument("--quick", action="store_true", help="KNOWMRI_QUICK=1: tiny models and few samples")
    parser.add_argument("--check", action="store_true", help="run only, do not save the outputs")
    args = parser.parse_args(argv)
    import nbformat

    paths = [HERE / n for n in args.notebooks] if args.notebooks else NOTEBOOKS
    for path in paths:
        start = time.perf_counter()
        book = execute(path, quick=args.quick)
        seconds = time.perf_counter() - start
        if not args.check:
            strip_plotly(book)
            nbformat.write(book, path)
        print(f"{path.name}: ran in {seconds:.1f} s" + ("" if args.check else ", saved"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reports inline in Jupyter, JupyterLab and VS Code: the saved page's renderer, drawn into a notebook cell.

A notebook output is a `<div>` in the notebook's own page, so it cannot be a whole page: the report's
data travels as escaped JSON inside an inline module script that carries the one renderer
(`static/render.js`, as `index.html` inlines it), and the renderer's styles (`static/report.css`)
are scoped under the output's class so they leave the notebook's own styles alone. Plotly's bundle
(from the installed `plotly` package, never a CDN) is sent with the first output of a kernel
session only; later outputs wait for it on the page. `forget_plotly()` sends it again (after the
output that carried it was cleared).
"""

from __future__ import annotations

import itertools
import re
from functools import cache
from typing import Any

from knowmri.report.html import inline_asset, script_json

SCOPE = "knowmri-nb"
_count = itertools.count()
_sent = {"plotly": False}

# Plotly's bundle defines an AMD module where RequireJS is on the page (classic Notebook); it is loaded
# with `define` hidden so that it always sets `window.Plotly`.
_PLOTLY = """<script>window.__knowmriDefine = window.define; window.define = undefined;</script>
<script>{bundle}</script>
<script>window.define = window.__knowmriDefine; delete window.__knowmriDefine;</script>"""

_WAIT_FOR_PLOTLY = """function knowmriPlotly() {
  return new Promise((resolve, reject) => {
    let tries = 0;
    const poll = () => {
      if (window.Plotly) resolve(window.Plotly);
      else if (++tries > 100) reject(new Error("Plotly is not loaded on this page: run `knowmri.report.notebook.forget_plotly()` and show the report again"));
      else setTimeout(poll, 100);
    };
    poll();
  });
}"""


def forget_plotly() -> None:
    """Send Plotly's bundle again with the next output (after the output that carried it was cleared)."""
    _sent["plotly"] = False


@cache
def scoped_css(scope: str = SCOPE) -> str:
    """`report.css` with every selector under `.scope`, so the report's styles touch only its own output."""
    css = re.sub(r"/\*.*?\*/", "", inline_asset("report.css"), flags=re.DOTALL)
    return _scope_rules(css, f".{scope}")


def _scope_rules(css: str, prefix: str) -> str:
    out = []
    pos = 0
    while True:
        start = css.find("{", pos)
        if start < 0:
            break
        head = css[pos:start].strip()
        if head.startswith("@"):  # an at-rule's block: scope the rules inside it
            depth, end = 1, start + 1
            while depth:
                depth += {"{": 1, "}": -1}.get(css[end], 0)
                end += 1
            out.append(f"{head} {{\n{_scope_rules(css[start + 1:end - 1], prefix)}}}\n")
        else:
            end = css.index("}", start) + 1
            selectors = ", ".join(_scope_selector(s.strip(), prefix) for s in head.split(","))
            out.append(f"{selectors} {css[start:end]}\n")
        pos = end
    return "".join(out)


def _scope_selector(selector: str, prefix: str) -> str:
    if selector in (":root", "body", "html"):
        return prefix
    if selector.startswith(":root"):
        return prefix + selector[len(":root"):]
    if selector.startswith(":"):  # a bare pseudo-class such as :focus-visible
        return f"{prefix} *{selector}"
    return f"{prefix} {selector}"


def notebook_html(data: dict[str, Any], *, include_plotly: bool | None = None) -> str:
    """A notebook output drawing one report dict (`Report.to_dict()`'s structure) with the page's renderer.

    Plotly's bundle comes with the first output of the session (`include_plotly=None`), or as asked."""
    if include_plotly is None:
        include_plotly = not _sent["plotly"]
    element = f"{SCOPE}-{next(_count)}"
    parts = []
    if include_plotly:
        parts.append(_PLOTLY.format(bundle=inline_asset("plotly.js")))
        _sent["plotly"] = True
    parts.append(f"<style>{scoped_css()}\n.{SCOPE} {{ background: transparent; padding: .2rem 0; }}</style>")
    parts.append(f'<div class="{SCOPE}" id="{element}"><noscript>This report is drawn by JavaScript.</noscript></div>')
    parts.append(f'<script type="module">\n{inline_asset("render.js")}\n{_WAIT_FOR_PLOTLY}\n'
                 f'renderReport(document.getElementById("{element}"), {script_json(data)}, '
                 f'{{plotly: knowmriPlotly, sampleHref: () => null}});\n'
                 f"</script>")
    return "\n".join(parts)


def result_page(result: dict[str, Any], *, model: dict[str, Any] | None = None,
                sample: dict[str, Any] | None = None) -> dict[str, Any]:
    """A report dict holding one method's result (its `to_dict()`), to draw it alone."""
    name = result.get("method") or "result"
    return {"model": model or {}, "sample": sample or {}, "results": {name: result}, "consensus": {}}


def select(data: dict[str, Any], methods: str | list[str] | None) -> dict[str, Any]:
    """The report dict with only the named methods' results (all of them for None); the consensus only
    with every result."""
    if methods is None:
        return data
    names = [methods] if isinstance(methods, str) else list(methods)
    results = data.get("results") or {}
    unknown = [n for n in names if n not in results]
    if unknown:
        raise ValueError(f"no result for {', '.join(map(repr, unknown))} in this report; it has: {', '.join(results) or 'none'}")
    return {**data, "results": {n: results[n] for n in names}, "consensus": {}}


def display_html(html: str, text: str) -> None:
    """Show an output in the running notebook (IPython's display), with `text` for plain-text front ends."""
    try:
        from IPython.display import display
    except ImportError as err:
        raise ImportError("showing a report inline needs IPython (a Jupyter kernel): pip install ipykernel, or "
                          "save the report and open its index.html") from err
    display({"text/html": html, "text/plain": text}, raw=True)

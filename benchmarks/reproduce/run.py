"""The runner: for each model, keep the facts it answers, run each claim's dataset runs, compute, write the page.

    python -m benchmarks.reproduce [--quick] [--models smollm2-135m,...] [--claims tracing,...] [--out DIR]
                                   [--page docs/validity.md] [--page-only | --no-run] [--budget SECONDS]
                                   [--processes N]

Everything is resumable: the fact subsets, each dataset run (`--resume`) and each claim's JSON are kept
under `--out`; a second invocation continues where the first stopped, and `--page-only` rebuilds the page
from the JSON files alone; `--no-run` recomputes each claim from the samples saved so far.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.reproduce import common as c
from benchmarks.reproduce import facts, page
from benchmarks.reproduce.claims import CLAIMS

ROOT = Path(__file__).resolve().parents[2]
ORDER = ["circuits", "dominance", "patchscopes", "neurons", "capability", "tracing"]


def prepare(ctx: c.Ctx, claims: list[str]) -> dict:
    """The model's fact subsets (written once, into DIR/<model>/facts/)."""
    import torch

    import knowmri as km

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    folder = ctx.dir / "facts"
    start = time.perf_counter()
    model = km.load_model(ctx.model, dtype=ctx.dtype) if ctx.dtype else km.load_model(ctx.model)
    meta = {"known_1000": facts.known_1000(model, ctx.data / "known_1000" / "known_1000.json",
                                           ctx.n(100, 4), folder / "known_1000.json")}
    facts.prompts_only(folder / "known_1000.json", folder / "known_1000_prompts.json")
    if "neurons" in claims:
        meta["pararel"] = facts.pararel(model, ctx.data / "pararel", ctx.n(30, 4), folder / "pararel.json")
    meta["seconds"] = round(time.perf_counter() - start, 1)
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few facts per claim (minutes per model)")
    ap.add_argument("--models", default=",".join(c.MODELS))
    ap.add_argument("--claims", default=",".join(CLAIMS))
    ap.add_argument("--out", default=None, help="default benchmarks/results/reproduce (…/reproduce_quick with --quick)")
    ap.add_argument("--page", default=None, help="default docs/validity.md (the out folder's validity.md with --quick)")
    ap.add_argument("--page-only", action="store_true", help="rebuild the page from the saved claim results")
    ap.add_argument("--no-run", action="store_true",
                    help="recompute the claims from the samples the runs saved so far (a stopped run too), then the page")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds each dataset run may take in this session (it resumes on the next); default no limit")
    ap.add_argument("--processes", type=int, default=1,
                    help="CPU processes per dataset run (Accelerate's data-parallel launch, one torch thread each)")
    ap.add_argument("--data", default=str(c.DATA), help="the real data folder (known_1000/, pararel/, gsm8k/, emotion/)")
    args = ap.parse_args(argv)
    if not 1 <= args.processes <= 64:
        raise SystemExit("--processes must be between 1 and 64")
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("reproduce_quick" if args.quick else "reproduce"))
    page_path = Path(args.page or (out / "validity.md" if args.quick else ROOT / "docs" / "validity.md"))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    claims = [k.strip() for k in args.claims.split(",") if k.strip()]
    for name in claims:
        if name not in CLAIMS:
            raise SystemExit(f"unknown claim {name!r}; claims: {', '.join(CLAIMS)}")
    if not args.page_only:
        for model in models:
            ctx = c.Ctx(model, out, quick=args.quick, data=Path(args.data), budget=args.budget,
                          processes=args.processes)
            ctx.dir.mkdir(parents=True, exist_ok=True)
            timing_file = ctx.dir / "timing.json"
            timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
            if not args.no_run:
                try:
                    meta = prepare(ctx, claims)
                except Exception as err:  # a model that cannot load (package missing) leaves its column "not run"
                    print(f"[reproduce] {model}: skipped, it did not load: {type(err).__name__}: {err}", flush=True)
                    continue
                meta_file = ctx.dir / "facts.json"  # a run of some claims keeps the other subsets' record
                old = json.loads(meta_file.read_text()) if meta_file.exists() else {}
                meta_file.write_text(json.dumps({**old, **meta}, indent=1) + "\n")
            elif not (ctx.dir / "runs").is_dir():
                continue
            for name in sorted(claims, key=ORDER.index) if not args.no_run else []:  # cheapest first, tracing last
                start = time.perf_counter()
                CLAIMS[name].run(ctx)
                timing[name] = round(timing.get(name, 0.0) + time.perf_counter() - start, 1)
                timing_file.write_text(json.dumps(timing, indent=1) + "\n")
            for name in claims:  # after every run: dominance reads the tracing run too
                result = CLAIMS[name].compute(ctx)
                c.save(ctx, name, result)
                print(f"[reproduce] {model} {name}: n={result.get('n')} {result.get('verdict')}", flush=True)
    shown_models = list(dict.fromkeys([*c.MODELS, *models]))  # the page shows every model and claim measured so far
    page.write(out, page_path, shown_models, list(CLAIMS), quick=args.quick)
    print(f"[reproduce] wrote {page_path}")

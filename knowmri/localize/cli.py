"""`knowmri localize` and `knowmri enhance`: load, run (data-parallel when launched so), print, save."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from knowmri.parallel import Processes, processes


def _progress(args: argparse.Namespace) -> bool:
    return bool(args.progress or (sys.stderr.isatty() and not args.json))


def _model(args: argparse.Namespace, procs: Processes) -> Any:
    from knowmri.models import load_model

    device_map = getattr(args, "device_map", None)
    if device_map and procs.world > 1:
        raise ValueError("--device-map shards one model over the GPUs of one process; with several processes "
                         "each process holds its own copy (drop --device-map)")
    device = procs.model_device(args.device)  # one GPU per process
    return load_model(args.model, device=None if device_map else device, dtype=args.dtype, device_map=device_map)


def _dataset(args: argparse.Namespace) -> Any:
    import knowmri as km

    return km.load_dataset(args.dataset, path=args.path)


def _check(args: argparse.Namespace) -> None:
    """Fail on bad numbers before loading a model."""
    for name in ("samples", "top_k", "batch_size", "max_answer_tokens", "subsets", "epochs"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    template = args.template.replace("\\n", "\n") if args.template else None
    return {"samples": args.samples, "top_k": args.top_k, "answer_key": args.answer_key,
            "max_answer_tokens": args.max_answer_tokens, "template": template, "batch_size": args.batch_size,
            "seed": args.seed, "progress": _progress(args)}


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def run_localize(args: argparse.Namespace) -> int:
    """Localise capability neurons over a dataset; the main process prints and saves the result."""
    from knowmri.localize.capability import localize

    _check(args)
    procs = processes()
    dataset = _dataset(args)
    model = _model(args, procs)
    loc = localize(dataset, model, top_fraction=args.top_fraction, subsets=args.subsets, aggregate=args.aggregate,
                   positions=args.positions, **_options(args))
    if not procs.main:
        return 0
    if args.out:
        loc.save(args.out)
    if args.json:
        print(json.dumps(loc.to_dict(), indent=2, allow_nan=False))
        return 0
    print(loc.summary)
    print()
    print(_table([[i + 1, n["layer"], n["unit"] if "expert" not in n else f"E{n['expert']}.U{n['unit']}", n["score"]]
                  for i, n in enumerate(loc.neurons[:15])],
                 ["rank", "layer", "unit", "score"]))
    if loc.stability:
        print()
        print(_table([[s["samples"], s["overlap"], s["iou"]] for s in loc.stability],
                     ["samples/subset", "overlap", "iou"]))
    if args.out:
        print(f"\nwritten to {os.path.join(args.out, 'localization.json')} and {os.path.join(args.out, 'index.html')}")
    return 0


def run_enhance(args: argparse.Namespace) -> int:
    """Fine-tune the located neurons (given, or localised on the training split) against random and base."""
    from knowmri.localize.capability import Localization
    from knowmri.localize.tuning import enhance

    _check(args)
    procs = processes()
    dataset = _dataset(args)
    neurons = Localization.load(args.neurons) if args.neurons else None
    model = _model(args, procs)
    result = enhance(dataset, model, neurons, epochs=args.epochs, lr=args.lr, eval_fraction=args.eval_fraction,
                     **_options(args))
    if not procs.main:
        return 0
    if args.out:
        result.save(args.out)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, allow_nan=False))
        return 0
    print(result.summary)
    print()
    print(_table([[a, len(result.neurons.get(a, [])), r["loss"], r["accuracy"], r["first_token_accuracy"]]
                  for a, r in result.arms.items()], ["arm", "neurons", "loss", "accuracy", "first-token acc."]))
    if args.out:
        print(f"\nwritten to {os.path.join(args.out, 'enhancement.json')} and {os.path.join(args.out, 'index.html')}")
    return 0

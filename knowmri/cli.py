"""The `knowmri` command line (docs/CLI.md): models, datasets, methods, match, diagnose, localize, enhance, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DTYPES = ["float32", "float16", "bfloat16", "auto"]
DTYPE_HELP = "float32 (default, exact), bfloat16, float16, or auto (bfloat16 where the device computes it natively)"
LONG_RUN_SECONDS = 30.0  # runs estimated longer than this say so before they start


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _params(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`method.name=value` pairs -> {method: {name: value}} (values parsed as JSON when they can be)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise ValueError(f"--param {item!r}: expected METHOD.NAME=VALUE, e.g. causal_tracing.samples=3")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[name] = parsed
    return out


def _check_params(methods: list[str] | None, params: dict[str, dict[str, Any]]) -> None:
    """Every `--param` names a chosen (or, without --methods, a known) method and a valid value."""
    from knowmri.methods.base import get_method

    for name in [*(methods or []), *params]:
        get_method(name)  # an unknown method fails first
    for name, values in params.items():
        if methods is not None and name not in methods:
            raise ValueError(f"--param {name}.{next(iter(values))}: {name} is not among the chosen --methods")
        try:
            get_method(name).Params.from_dict(values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--param for {name}: {err}") from None


def _check_out(out: str) -> None:
    """Fail now, not after the computation, when the report folder cannot be written."""
    path = Path(out).expanduser()
    folder = path
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write in {folder} ({err.strerror or err})") from None


def _sample_from_args(args: argparse.Namespace) -> Any:
    import knowmri as km

    given = [args.dataset is not None, args.prompt is not None, args.text is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one input: --dataset NAME [--index I], --prompt TEXT, or --text 'free text'")
    if args.prompt is None and (args.subject is not None or args.target is not None):
        raise ValueError("--subject and --target go with --prompt (a dataset record or --text brings its own)")
    if args.dataset is not None:
        ds = km.load_dataset(args.dataset, path=getattr(args, "path", None))
        if not len(ds):
            raise ValueError(f"the dataset {args.dataset!r} is empty")
        if not -len(ds) <= args.index < len(ds):
            raise ValueError(f"--index {args.index} is out of range: {args.dataset} has {len(ds)} records")
        return ds[args.index]
    if args.text is not None:
        return km.from_text(args.text)
    fields: dict[str, Any] = {"prompt": args.prompt}
    if args.subject is not None:
        fields["triple_subject"] = args.subject
    if args.target is not None:
        fields["ground_truth"] = args.target
    return km.Sample(fields)


def cmd_models(args: argparse.Namespace) -> int:
    import knowmri as km
    from knowmri.models.arch import arch_specs

    presets = km.presets()
    if args.json:
        _print_json({"presets": presets, "families": sorted(arch_specs())})
        return 0
    print(_table([[p["name"], "yes" if p["installed"] else "no", p["title"]] for p in presets], ["preset", "installed", "model"]))
    print("\nsupported families: " + ", ".join(sorted(arch_specs())))
    print("also: a Hugging Face hub id, a local model folder, or a .gguf file")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    import knowmri as km

    methods = km.methods()
    if args.json:
        _print_json(methods)
        return 0
    print(_table([[m["name"], " / ".join(m["path"]), ",".join(m["requires_keys"]), ",".join(m["requires_capabilities"])]
                  for m in methods], ["method", "path", "keys", "capabilities"]))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    import knowmri as km

    items = km.datasets()
    if args.json:
        _print_json(items)
        return 0
    print(_table([[d["name"], d.get("size", ""), ",".join(d.get("keys") or d.get("support_keys") or [])] for d in items],
                 ["dataset", "built-in records", "keys"]))
    return 0


def cmd_match(args: argparse.Namespace) -> int:
    import knowmri as km

    if args.dataset and not args.index_given:
        target: Any = km.load_dataset(args.dataset)
    else:
        target = _sample_from_args(args)
    model = km.load_model(args.model) if args.model else None
    results = [m.to_dict() for m in km.match(target, model, estimate=model is not None)]
    if args.json:
        _print_json(results)
        return 0
    print(_table([[m["name"], "yes" if m["eligible"] else "no", " / ".join(m["path"]), "; ".join(m["reasons"])] for m in results],
                 ["method", "eligible", "path", "why not"]))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    import knowmri as km

    # every parameter and input is checked before the model loads (which can take minutes)
    params = _params(args.param or [])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
    if methods is not None and not methods:
        raise ValueError("--methods is empty: name at least one method, or leave it out to run every eligible one")
    _check_params(methods, params)
    if args.samples is not None and args.samples < 1:
        raise ValueError("--samples must be at least 1")
    dataset_level = args.dataset is not None and args.samples is not None and not args.index_given
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.batch_size > 1 and not dataset_level:
        raise ValueError("--batch-size is for dataset runs: give --dataset NAME --samples N")
    if args.resume and not (dataset_level and args.out):
        raise ValueError("--resume continues a dataset run: give --dataset NAME --samples N --out DIR")
    if dataset_level and any(v is not None for v in (args.prompt, args.text, args.subject, args.target)):
        raise ValueError("--dataset takes no --prompt, --text, --subject or --target")
    sample = km.load_dataset(args.dataset, path=args.path) if dataset_level else _sample_from_args(args)
    if dataset_level and not len(sample):
        raise ValueError(f"the dataset {args.dataset!r} is empty")
    if args.out is not None:
        _check_out(args.out)
    procs = _dataset_processes(args) if dataset_level else None
    model = km.load_model(args.model, device=procs.model_device(args.device) if procs else args.device, dtype=args.dtype)
    if methods and not dataset_level:
        blocked = [m for m in km.match(sample, model) if m.name in methods and not m.eligible]
        if blocked:
            raise ValueError("; ".join(f"{m.name} cannot run: {', '.join(m.reasons)}" for m in blocked))
    progress = not args.json and sys.stderr.isatty() or args.progress
    if procs is None:  # a dataset run prints its own estimate: every record's, and each process's share
        _say_estimate(model, sample, methods, params)
    if procs is not None:
        from knowmri.diagnosis import diagnose_dataset

        report = diagnose_dataset(sample, model, methods=methods, params=params, samples=args.samples, progress=progress,
                                  out=args.out, resume=args.resume, echo=True,
                                  batch_size=args.batch_size)  # saves into --out as it goes
        if not procs.main:
            return 0
    else:
        report = km.diagnose(sample, model, methods=methods, params=params, progress=progress)
        if args.out:
            report.save(args.out)
    if args.json:
        print(report.to_json())
    else:
        print(report.summary())
        if args.out:
            print(f"\nreport written to {os.path.join(args.out, 'index.html')}")
    failed = [n for n, r in report.results.items() if r.status == "error"]
    return 1 if failed and len(failed) == len(report.results) else 0


def _say_estimate(model: Any, sample: Any, methods: list[str] | None, params: dict[str, dict[str, Any]]) -> None:
    """Print the run's estimated time on stderr before a long run (so a mistaken one is stopped early)."""
    import knowmri as km
    from knowmri.run_cost import estimate_run, format_bytes, format_seconds

    names = methods if methods is not None else [m.name for m in km.match(sample, model) if m.eligible]
    cost = estimate_run(model, sample, names, params)
    if cost.seconds >= LONG_RUN_SECONDS:
        print(f"knowmri: this run is estimated to take {format_seconds(cost.seconds)} and up to "
              f"{format_bytes(cost.memory_bytes)} of memory; slowest: {cost.slowest()} (Ctrl+C stops it)",
              file=sys.stderr, flush=True)


def _dataset_processes(args: argparse.Namespace) -> Any:
    """This process among the data-parallel ones (`accelerate launch`); an unwritable or full --out fails here."""
    from knowmri.parallel import processes
    from knowmri.study import RunDir

    procs = processes(cpu=args.device == "cpu")
    if args.out:
        RunDir(args.out).check_writable()
    return procs


def cmd_localize(args: argparse.Namespace) -> int:
    from knowmri.localize.cli import run_localize

    return run_localize(args)


def cmd_enhance(args: argparse.Namespace) -> int:
    from knowmri.localize.cli import run_enhance

    return run_enhance(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from knowmri.server.app import serve

    if args.max_run_seconds < 0 or args.max_run_memory is not None and args.max_run_memory < 0:
        raise ValueError("--max-run-seconds and --max-run-memory must not be negative (0 turns a cap off)")
    memory = None if args.max_run_memory is None else int(args.max_run_memory * (1 << 30))
    return serve(host=args.host, port=args.port, token=args.token, max_run_seconds=args.max_run_seconds,
                 max_run_memory=memory) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knowmri", description="Reveal and interpret the knowledge mechanisms of LLMs.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    def with_input(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--dataset", help="a built-in dataset name or a data file")
        sp.add_argument("--path", help="the full public data file for a built-in dataset")
        sp.add_argument("--index", type=int, default=0, help="record index in the dataset")
        sp.add_argument("--prompt", help="the prompt text")
        sp.add_argument("--subject", help="the subject, as it appears in the prompt")
        sp.add_argument("--target", help="the expected answer (ground truth), e.g. ' Paris'")
        sp.add_argument("--text", help="free text, e.g. 'The Eiffel Tower is located in Paris'")

    for name, fn, help_ in (("models", cmd_models, "list presets and supported families"),
                            ("methods", cmd_methods, "list methods"), ("datasets", cmd_datasets, "list built-in datasets")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=fn)

    sp = sub.add_parser("match", help="which methods apply to an input (and why others do not)")
    with_input(sp)
    sp.add_argument("--model", help="also check the model's capabilities")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_match)

    sp = sub.add_parser("diagnose", help="run methods on one input and write a report")
    with_input(sp)
    sp.add_argument("--model", default="smollm2-135m", help="preset, hub id, folder or .gguf (default smollm2-135m)")
    sp.add_argument("--methods", help="comma-separated method names (default: every eligible one)")
    sp.add_argument("--samples", type=int, help="with --dataset (and no --index): diagnose this many records and aggregate "
                                                "(runs under `accelerate launch` too)")
    sp.add_argument("--param", action="append", metavar="METHOD.NAME=VALUE", help="override a hyper-parameter")
    sp.add_argument("--out", help="directory for report.json and index.html (dataset runs: and each sample's result "
                                  "under samples/ as it finishes)")
    sp.add_argument("--resume", action="store_true", help="continue a dataset run saved in --out, skipping its finished samples")
    sp.add_argument("--batch-size", type=int, default=1, help="dataset runs: records run at once by the methods that can "
                                                               "(the light methods' clean pass, attention weights, "
                                                               "integrated gradients); the same results")
    sp.add_argument("--device", choices=["cpu", "cuda"], default=None)
    sp.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    sp.add_argument("--json", action="store_true", help="print report.json to stdout")
    sp.add_argument("--progress", action="store_true", help="show progress even when not on a terminal")
    sp.set_defaults(func=cmd_diagnose)

    for name, fn in (("localize", cmd_localize), ("enhance", cmd_enhance)):
        sp = sub.add_parser(name, help=f"{name} capability neurons over a dataset (runs under `accelerate launch` too)")
        sp.add_argument("--model", default="smollm2-135m", help="preset, hub id, folder or .gguf (default smollm2-135m)")
        sp.add_argument("--dataset", required=True, help="a built-in dataset name or a data file")
        sp.add_argument("--path", help="the full public data file for a built-in dataset")
        sp.add_argument("--samples", type=int, default=None, help="use the first N records (default all)")
        sp.add_argument("--top-k", type=int, default=None, help="neurons to locate (default 0.1%% of all, at least 10)")
        sp.add_argument("--answer-key", default="ground_truth", help="the key teacher-forced as the answer, e.g. reasoning")
        sp.add_argument("--max-answer-tokens", type=int, default=None, help="truncate long answers to N tokens")
        sp.add_argument("--template", help="prompt template holding {prompt}, e.g. 'Question: {prompt}\\nAnswer:'")
        sp.add_argument("--batch-size", type=int, default=8)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--out", help="directory for the JSON result and index.html")
        sp.add_argument("--device", choices=["cpu", "cuda"], default=None)
        sp.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
        sp.add_argument("--device-map", help="shard one model over the GPUs present, e.g. auto")
        sp.add_argument("--json", action="store_true", help="print the JSON result to stdout")
        sp.add_argument("--progress", action="store_true", help="show progress even when not on a terminal")
        if name == "localize":
            sp.add_argument("--top-fraction", type=float, default=None, help="locate this fraction of all neurons")
            sp.add_argument("--subsets", type=int, default=2, help="disjoint subsets compared for stability")
            sp.add_argument("--aggregate", choices=["mean_abs", "mean", "frequency"], default="mean_abs")
            sp.add_argument("--positions", choices=["answer", "all"], default="answer")
            sp.add_argument("--epochs", type=int, default=None, help=argparse.SUPPRESS)
        else:
            sp.add_argument("--neurons", help="a saved localisation (directory or localization.json); default: "
                                              "localise on the training split first")
            sp.add_argument("--epochs", type=int, default=3)
            sp.add_argument("--lr", type=float, default=1e-3)
            sp.add_argument("--eval-fraction", type=float, default=0.25, help="held-out share of the samples")
        sp.set_defaults(func=fn)

    sp = sub.add_parser("serve", help="start the web UI")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--token", default=os.environ.get("KNOWMRI_TOKEN"), help="required when binding a non-loopback address")
    sp.add_argument("--max-run-seconds", type=float, default=3600.0, metavar="S",
                    help="refuse runs estimated to take longer (default 3600; 0 = no cap)")
    sp.add_argument("--max-run-memory", type=float, default=None, metavar="GIB",
                    help="refuse runs estimated to need more memory, in GiB (default 3/4 of the RAM, or of the "
                         "GPU's memory on cuda; 0 = no cap)")
    sp.set_defaults(func=cmd_serve)
    return p


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    print(f"knowmri: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "index"):
        raw = list(argv) if argv is not None else sys.argv[1:]
        args.index_given = "--index" in raw
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("knowmri: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line, never a bare traceback (unless --debug)
        if args.debug:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "" if isinstance(err, (ValueError, FileNotFoundError, KeyError)) else f"{type(err).__name__}: "
        print(f"knowmri: error: {kind}{message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

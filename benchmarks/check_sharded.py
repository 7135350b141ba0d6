"""Device check: every method on a model whose blocks are split across devices (Accelerate's
`dispatch_model`, what `device_map="auto"` does for a model too large for one GPU) gives the
results of the same model on one device.

Builds a LLaMA model (`--shape`, random weights, or the real SmolLM2 with `--shape none`), runs
each method on it whole on the first device, then dispatched with its blocks split over
`--devices` (the embeddings on the first, the final norm and unembedding on the last), and
compares the methods' findings (every number in them, with the dtype's tolerance). Writes
benchmarks/results/sharded.json (or --out). On a one-GPU machine, `--devices cuda:0,cpu` puts
half the blocks on the CPU: the same device crossings as two GPUs.

    python benchmarks/check_sharded.py --devices cuda:0,cpu --dtype bfloat16
    python benchmarks/check_sharded.py --devices cpu,cpu --dtype float32      # the code path, here
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import _harness as H
import torch

#: Small settings: the check is about devices, not the methods' defaults.
PARAMS: dict[str, dict[str, Any]] = {
    "causal_tracing": {"samples": 2, "window": 4},
    "knowledge_neurons": {"steps": 4},
    "integrated_gradients": {"steps": 8},
    "knowledge_circuits": {"ig_steps": 2},
    "self_explanation": {"max_new_tokens": 8},
    "spine": {"epochs": 2, "vocab_limit": 2000},
}


def numbers(value: Any, prefix: str = "") -> dict[str, float]:
    """Every number in a findings structure, keyed by its path."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: float(value)}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{prefix}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{prefix}[{i}]").items()}
    return {}


def compare(a: dict[str, Any], b: dict[str, Any], atol: float, rtol: float) -> tuple[bool, str]:
    na, nb = numbers(a), numbers(b)
    if na.keys() != nb.keys():
        return False, f"different findings: {sorted(set(na) ^ set(nb))[:5]}"
    worst, where = 0.0, ""
    for key, x in na.items():
        y = nb[key]
        if math.isnan(x) and math.isnan(y):
            continue
        excess = abs(x - y) - (atol + rtol * abs(y))
        if excess > worst:
            worst, where = excess, f"{key}: {x:.5g} vs {y:.5g}"
    return worst <= 0, where or "all numbers close"


def dispatch(model: Any, devices: list[str]) -> Any:
    """The model's modules placed over `devices` with Accelerate: blocks split evenly in order, the final
    norm on the last device, everything else (embeddings, a tied unembedding) on the first."""
    from accelerate import dispatch_model

    hf = model.hf_model
    names = {module: name for name, module in hf.named_modules()}
    blocks = [names[layer] for layer in model.layers]
    container = blocks[0].rsplit(".", 1)[0]
    last = {names[m] for m in (model.final_norm,) if m is not None}
    unembed = hf.get_output_embeddings()
    if unembed is not None and not model.config.tie_word_embeddings:
        last.add(names[unembed])
    device_map: dict[str, str] = {}

    def place(module: torch.nn.Module, prefix: str) -> None:
        for child, sub in module.named_children():
            full = prefix + child
            if full == container:
                device_map.update({name: devices[i * len(devices) // len(blocks)] for i, name in enumerate(blocks)})
            elif container.startswith(full + ".") or any(n.startswith(full + ".") for n in last):
                place(sub, full + ".")
            else:
                device_map[full] = devices[-1] if full in last else devices[0]

    place(hf, "")
    return dispatch_model(hf, device_map=device_map, main_device=devices[0])


def main() -> None:
    p = H.parser(__doc__.splitlines()[0])
    p.set_defaults(shape="smollm2-135m")
    p.add_argument("--devices", default="cuda:0,cpu", help="comma-separated devices the blocks are split over")
    p.add_argument("--methods", default="", help="comma-separated methods (default: every registered one)")
    args = p.parse_args()
    if args.shape == "none":
        args.shape = None
    devices = args.devices.split(",")
    args.device = devices[0]
    H.setup(args)
    import knowmri as km
    from knowmri.diagnosis import run_method
    from knowmri.methods.base import RunContext, get_method, list_methods

    names = args.methods.split(",") if args.methods else [cls.name for cls in list_methods()]
    whole = H.load_smollm2(args)
    split_hf = H.load_smollm2(args).hf_model  # a second copy, with the same seeded weights, to dispatch
    split = km.load_model(dispatch(km.load_model(split_hf, tokenizer=whole.tokenizer), devices),
                          tokenizer=whole.tokenizer)
    tol = H.tolerance(args)
    atol, rtol = max(tol["atol"], 1e-3), max(tol["rtol"], 1e-2)
    rows = []
    sample = H.eiffel()
    for name in names:
        results = []
        for model in (whole, split):
            method = get_method(name)
            start = time.perf_counter()
            fields = {f.name for f in dataclasses.fields(method.Params)}
            params = {k: v for k, v in PARAMS.get(name, {}).items() if k in fields}
            result = run_method(type(method)(), model, sample, params, RunContext())
            results.append((result, time.perf_counter() - start))
        (a, ta), (b, tb) = results
        if a.status != "ok" or b.status != "ok":
            equal, detail = False, f"one device: {a.status} {a.error or ''}; split: {b.status} {b.error or ''}"[:300]
        else:
            equal, detail = compare(b.findings, a.findings, atol, rtol)
        rows.append(H.row(name, f"split over {args.devices}", ta, tb, equal, detail, kind="sharded"))
        print(f"  {name:22s} one device {ta:7.2f} s, split {tb:7.2f} s, equal: {equal} ({detail})", flush=True)
    path = H.write_result("sharded", rows, model=args.shape or "smollm2-135m", args=args, devices=devices)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

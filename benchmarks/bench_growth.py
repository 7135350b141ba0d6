"""Benchmark: how each method's time grows with prompt length, depth and dataset size.

Models are small LLaMA-architecture models built from a config (random weights, the word-level
tokenizer of `knowmri.testing`, d_model 256, 8 heads, d_mlp 688) so that depth can be varied
(2, 4, 8, 16 layers) and compute is not hidden by fixed costs (figures, tokenizing), which
still flatten the curves of the cheapest methods. Curves:
- prompt length: 8, 16, 32, 64 tokens (filler words before "Eiffel Tower is in the city of"), 4 layers;
- layers: 2, 4, 8, 16 at 16 tokens;
- dataset size: `km.localize` over 5, 10, 20 samples of the built-in known_1000, and
  `km.diagnose` of a dataset (logit_lens + integrated_gradients) over 5, 10, 20 samples.
Each point is the minimum of `--repeats` runs (load only ever adds time), after one warm-up run;
both wall and CPU seconds are kept, and the exponent, the least-squares slope of log(CPU time)
against log(size) (1: linear, 2: quadratic), is fitted on CPU time, which a shared machine's
load disturbs less.
SPINE is left out of the length and depth curves: its cost depends on neither (see
docs/performance.md). Writes benchmarks/results/growth.json.

    python benchmarks/bench_growth.py [--quick] [--repeats 2] [--methods a,b]
"""

from __future__ import annotations

import math
import os
from typing import Any

import _harness as H
import torch

LENGTHS = (8, 16, 32, 64)
DEPTHS = (2, 4, 8, 16)
DATASET_SIZES = (5, 10, 20)
FILLER = ["good", "morning", "my", "friend", "the", "famous", "author", "wrote", "that", "the", "capital", "city", "of",
          "France", "is", "known", "for", "music", "and", "painting", "and", "the", "old", "river", "and", "the",
          "great", "mountain", "where", "people", "lived"]
BASE = ["Eiffel", "Tower", "is", "in", "the", "city", "of"]
#: Per-method overrides for the curves (the quick settings of bench_floor, generation shortened).
PARAMS: dict[str, dict[str, Any]] = {
    "causal_tracing": {"samples": 3},
    "knowledge_neurons": {"steps": 10},
    "self_explanation": {"max_new_tokens": 20},
}


def growth_model(n_layers: int, seed: int = 0) -> Any:
    """A random LLaMA (d_model 256, 8 heads, 4 KV heads, d_mlp 688) over the tiny word tokenizer."""
    import transformers as T

    from knowmri.models.model import Model
    from knowmri.testing import tiny_tokenizer

    tok = tiny_tokenizer("causal", bos=True)
    config = T.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=n_layers,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=256,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           initializer_range=0.1)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = T.LlamaForCausalLM(config).eval()
    hf.config._name_or_path = f"growth-llama-{n_layers}"
    return Model(hf, tok, name=f"growth-llama-{n_layers}")


def prompt_of(model: Any, n_tokens: int) -> Any:
    """A Sample whose prompt is `n_tokens` tokens (BOS included) ending with the Eiffel fact."""
    from knowmri.sample import Sample

    extra = max(0, n_tokens - 1 - len(BASE))
    words = [FILLER[i % len(FILLER)] for i in range(extra)] + BASE
    prompt = " ".join(words)
    return Sample(prompt=prompt, ground_truth=" Paris", triple_subject="Eiffel Tower", triple_relation="is in the city of",
                  triple_object="Paris", target_new=" Rome")


def exponent(xs: list[float], ys: list[float | None]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def time_method(name: str, model: Any, sample: Any, repeats: int, device: str) -> tuple[float | None, float | None, str]:
    """(min wall seconds, min CPU seconds, status) of `repeats` runs of one method."""
    from knowmri.diagnosis import run_method
    from knowmri.methods.base import RunContext, get_method

    method = get_method(name)
    wall = cpu = None
    status = ""
    for _ in range(repeats):
        w, c, result = H.measure(lambda: run_method(method, model, sample, PARAMS.get(name), RunContext(), 0), device)
        status = result.status if result.status == "ok" else f"{result.status}: {(result.error or '')[:100]}"
        if result.status != "ok":
            return None, None, status
        wall = w if wall is None else min(wall, w)
        cpu = c if cpu is None else min(cpu, c)
    return wall, cpu, status


def curve(label: str, sizes: tuple[int, ...], build: Any, methods: list[str], args: Any) -> dict[str, Any]:
    """Times [method][size] for models/samples from `build(size)` (each method warmed up once first)."""
    times: dict[str, list[float | None]] = {m: [] for m in methods}
    cpus: dict[str, list[float | None]] = {m: [] for m in methods}
    notes: dict[str, str] = {}
    tokens = []
    for i, size in enumerate(sizes):
        model, sample = build(size)
        model.hf_model.to(device=args.device, dtype=H.dtype_of(args))
        tokens.append(int(model.encode(sample["prompt"]).input_ids.shape[1]))
        for name in methods:
            if i == 0:
                time_method(name, model, sample, 1, args.device)  # warm-up: first-call costs out of the curve
            wall, cpu, status = time_method(name, model, sample, args.repeats, args.device)
            times[name].append(wall)
            cpus[name].append(cpu)
            if status != "ok":
                notes[name] = status
        print(f"  {label} {size}: " + ", ".join(f"{m} {H.fmt_s(times[m][-1])} (CPU {H.fmt_s(cpus[m][-1])})"
                                                 for m in methods), flush=True)
    return {"label": label, "sizes": list(sizes), "tokens": tokens, "times_s": times, "cpu_s": cpus, "notes": notes,
            "exponent": {m: exponent(list(sizes), cpus[m]) for m in methods},
            "exponent_wall": {m: exponent(list(sizes), times[m]) for m in methods}}


def dataset_curve(args: Any) -> dict[str, Any]:
    import knowmri as km

    model = growth_model(4)
    model.hf_model.to(device=args.device, dtype=H.dtype_of(args))
    data = km.load_dataset("known_1000")
    jobs = {"localize": lambda n: km.localize(data, model, samples=n, progress=False),
            "diagnose (logit_lens, integrated_gradients)": lambda n: km.diagnose(
                data, model, methods=["logit_lens", "integrated_gradients"], progress=False, samples=n)}
    out: dict[str, list[float | None]] = {k: [] for k in jobs}
    cpus: dict[str, list[float | None]] = {k: [] for k in jobs}
    for fn in jobs.values():
        fn(DATASET_SIZES[0])  # warm-up
    for n in DATASET_SIZES:
        for key, fn in jobs.items():
            best = best_cpu = None
            for _ in range(args.repeats):
                w, c, _ = H.measure(lambda fn=fn, n=n: fn(n), args.device)
                best = w if best is None else min(best, w)
                best_cpu = c if best_cpu is None else min(best_cpu, c)
            out[key].append(best)
            cpus[key].append(best_cpu)
        print(f"  dataset {n}: " + ", ".join(f"{k} {H.fmt_s(out[k][-1])} (CPU {H.fmt_s(cpus[k][-1])})" for k in jobs),
              flush=True)
    return {"label": "dataset samples", "sizes": list(DATASET_SIZES), "times_s": out, "cpu_s": cpus,
            "exponent": {k: exponent(list(DATASET_SIZES), v) for k, v in cpus.items()}}


def main() -> None:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default="", help="comma-separated subset (default: every method but spine)")
    p.set_defaults(repeats=2)
    args = p.parse_args()
    if args.quick:
        args.repeats = 1
    H.setup(args)
    from knowmri.matching import match

    os.environ["KNOWMRI_HOME"] = H.scratch_home()
    base = growth_model(4)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = [m.name for m in match(prompt_of(base, 16), base) if m.eligible and m.name != "spine"
               and (not wanted or m.name in wanted)]
    curves = [curve("prompt tokens", LENGTHS, lambda n: (base, prompt_of(base, n)), methods, args),
              curve("layers", DEPTHS, lambda n: (growth_model(n), prompt_of(base, 16)), methods, args)]
    try:
        curves.append(dataset_curve(args))
    except Exception as err:  # localize/diagnose of datasets may be unavailable
        print(f"  dataset curve skipped: {type(err).__name__}: {err}")
    rows = []
    print("\n| method (CPU seconds) | " + " | ".join(f"{c['label']} {c['sizes']}" for c in curves[:2]) + " |")
    print("|---|---|---|")
    for m in methods:
        cells = []
        for c in curves[:2]:
            ts = ", ".join(H.fmt_s(t) for t in c["cpu_s"][m])
            e = c["exponent"][m]
            cells.append(f"{ts} (~n^{e:.1f})" if e is not None else ts)
        print(f"| {m} | " + " | ".join(cells) + " |")
        rows.append(H.row(f"growth: {m}", "", None, None, None, "; ".join(
            f"{c['label']} {c['sizes']}: CPU " + ", ".join(H.fmt_s(t) for t in c["cpu_s"][m])
            + (f" (~n^{c['exponent'][m]:.2f})" if c["exponent"][m] is not None else "") for c in curves[:2]),
            kind="growth", exponents={c["label"]: c["exponent"][m] for c in curves[:2]}))
    for c in curves[2:]:
        for k, e in c["exponent"].items():
            rows.append(H.row(f"growth: {k}", "", None, None, None, f"{c['label']} {c['sizes']}: CPU "
                              + ", ".join(H.fmt_s(t) for t in c["cpu_s"][k]) + (f" (~n^{e:.2f})" if e else ""),
                              kind="growth", exponents={c["label"]: e}))
    path = H.write_result("growth", rows, model="growth-llama (d_model 256)", args=args, curves=curves)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

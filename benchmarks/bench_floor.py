"""Benchmark: each method's time against the floor set by the work its algorithm truly needs.

For every method on SmolLM2 and the Eiffel fact, with the parameters `make bench` uses (the
defaults, reduced where noted in PARAMS), this counts the forward/backward work the algorithm
needs (below), turns it into FLOPs, and divides by this machine's matmul rate measured in the
same run (matrices shaped like the model's). It also counts the FLOPs the implementation really
executed (`torch.utils.flop_counter`), so a ratio above 1 splits into "more FLOPs than needed"
(counted / floor) and "slower per FLOP than a big matmul" (time / counted time).

Work model (T prompt tokens, L layers, S noise samples, V vocabulary, d model width):
- a token through one block = 2 x (block matmul params) FLOPs + 4 x T x d (attention scores);
- a read-out (final norm + unembedding at one position) = 2 x V x d; the embedding lookup is free;
- backward = 1 x forward: the methods need gradients of activations only, the weights are frozen
  (a backward that also forms weight gradients costs 2 x forward, the usual "x3" of training;
  only SPINE trains, and its count includes that);
- the floor time is the longer of the FLOPs at the matmul rate and (weight sweeps that must happen
  one after another) x (weight bytes) / memory bandwidth (a roofline). The matmul rate is measured
  for the rows the work can batch (`RowRates`: [rows, d] through every MLP matrix of the model in
  sequence, so the weights stream from memory as in a forward): a short prompt (10 rows) or one
  decoding step (1 row) cannot reach the rate of a big matmul, and no implementation could either.
  Big-matmul rate and bandwidth are measured too and reported.
Per method (what the algorithm needs, not what any implementation does):
- logit_lens: 1 forward + L x T read-outs (positions "all");
- attention_weights, embedding_projection, fine: 1 forward (+ their vocabulary projections: for
  fine every value vector against the answer and the listed neurons' value vectors, for
  embedding_projection every layer's residual, the top neurons' value vectors, each chosen head's OV
  circuit on each distinct prompt token, and those tokens' embeddings);
- integrated_gradients: `steps` forward+backward of the prompt, read-out at the answer only;
- knowledge_neurons: 1 clean forward; per layer l, `steps` scaled rows that need only blocks
  l..L-1 at the answer position (the prefix's keys/values are the clean run's) + backward;
- causal_tracing: clean + S corrupted forwards; restoring (token t >= subject start, layer l)
  re-runs blocks l+1..L-1 (hidden) or window start..L-1 (mlp, attn; the MLP window's first block
  only adds the clean MLP output at t) for S rows over positions t..T-1 only (on a causal model
  the states before t are the corrupted run's), 1 read-out each, restorations whose states are
  still equal (ROME's first windows, until the shortest ends) computed once;
- knowledge_circuits (EAP-IG): the candidate corrupted subjects scored (one forward each, to pick
  the one that most lowers P(answer)) + clean forward + (1 + ig_steps) forward+backward + 1 forward
  for the faithfulness check;
- patchscopes: source forward + target prefix once + per layer l the patched token through
  blocks l+1..L-1 + (max_new_tokens - 1) cached decoding steps, one read-out per token;
- self_explanation: two cached generations (the answer, then the explanation request);
- spine: autoencoder training, 10 x updates x batch x d x hidden FLOPs (five [batch, d] x [d, hidden]
  products per update: encode, decode, and three for the gradients; the data needs none) + encoding the vocabulary.

Writes benchmarks/results/floor.json. Runs with torch.set_num_threads(2) by default.

    python benchmarks/bench_floor.py [--quick] [--methods a,b] [--no-count] [--device cuda]
    python benchmarks/bench_floor.py --quick --dtype bfloat16 --out benchmarks/results/floor_bfloat16.json
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import _harness as H
import torch

#: Parameters used by `make bench` (--quick): the defaults, reduced for the slowest methods.
QUICK_PARAMS: dict[str, dict[str, Any]] = {
    "causal_tracing": {"samples": 3},
    "knowledge_neurons": {"steps": 10},
    "self_explanation": {"max_new_tokens": 30},
}


@dataclass
class Dims:
    L: int
    d: int
    V: int
    d_mlp: int
    block_params: float  # mean matmul parameters of one block

    @classmethod
    def of(cls, model: Any) -> Dims:
        per_layer = []
        for layer in model.layers:
            per_layer.append(sum(p.numel() for p in layer.parameters() if p.dim() == 2))
        return cls(model.n_layers, model.d_model, model.vocab_size, model.d_mlp, statistics.mean(per_layer))

    def tokens(self, n: float, ctx: float) -> float:
        """FLOPs of `n` token-block passes attending over `ctx` keys."""
        return n * (2 * self.block_params + 4 * ctx * self.d)

    def readouts(self, n: float) -> float:
        return n * 2 * self.V * self.d


@dataclass
class Work:
    fwd: float  # forward FLOPs
    bwd_of: float = 0.0  # FLOPs of the forward work that is also back-propagated (to activations only)
    extra: float = 0.0  # other FLOPs (projections, training)
    passes: str = ""
    sweeps: float = 1.0  # passes over the weights that must happen one after another (memory floor)
    rows: float = 640  # rows per matmul the algorithm can batch (tokens x copies), for the matmul rate
    parts: list | None = None  # [(FLOPs, rows)] when parts of the work batch differently
    float32: bool = False  # computed in float32 whatever the model's dtype (SPINE trains on float32 copies)

    @property
    def flops(self) -> float:
        return self.fwd + self.bwd_of + self.extra

    def split(self) -> list[tuple[float, float]]:
        return self.parts or [(self.flops, self.rows)]


def floor_work(name: str, model: Any, dims: Dims, prep: Any, params: Any, result: Any) -> Work | None:
    """What the algorithm needs for `name` on this sample (see the module docstring)."""
    L, T = dims.L, prep.enc.input_ids.shape[1]
    full = dims.tokens(T * L, T)
    n_ans = max(1, len(prep.enc.target_ids))
    if name == "logit_lens":
        reads = L * T if getattr(params, "positions", "all") == "all" else L
        return Work(full + dims.readouts(reads), passes=f"1 forward + {reads} read-outs",
                    parts=[(full, T), (dims.readouts(reads), reads)])
    if name == "attention_weights":
        return Work(full + dims.readouts(1), passes="1 forward", rows=T)
    if name == "fine":  # + every value vector against the answer tokens, the listed neurons' vocabulary projections
        k, values = getattr(params, "top_k", 20), 2 * L * dims.d_mlp * dims.d * n_ans
        return Work(full + dims.readouts(1), extra=values + dims.readouts(k), passes=f"1 forward + {k} vocabulary projections",
                    parts=[(full + dims.readouts(1) + values, T), (dims.readouts(k), k)])
    if name == "embedding_projection":
        f = result.findings if result is not None else {}
        unique = len(f.get("neighbours") or {}) or T  # distinct prompt tokens
        heads = len(f.get("heads") or []) if f else getattr(params, "top_heads", 3)
        k = L + getattr(params, "top_neurons", 10) + heads * unique + unique  # the four views' vectors
        return Work(full + dims.readouts(1), extra=dims.readouts(k), passes=f"1 forward + {k} vocabulary projections",
                    parts=[(full + dims.readouts(1), T), (dims.readouts(k), k)])
    if name == "integrated_gradients":
        s = params.steps
        w = s * (full + dims.readouts(n_ans))
        return Work(w, bwd_of=w, passes=f"{s} forward+backward", sweeps=2,
                    rows=min(s, getattr(params, "internal_batch_size", s) or s) * T)
    if name == "knowledge_neurons":
        s = params.steps
        rows = sum(s * (L - layer) for layer in range(L))  # block passes at the answer position
        w = dims.tokens(rows * n_ans, T) + dims.readouts(L * s * n_ans)
        return Work(full + dims.readouts(1) + w, bwd_of=w, passes=f"1 forward + {L}x{s} rows over blocks l..L-1 (fwd+bwd)",
                    sweeps=3, parts=[(full + dims.readouts(1), T), (2 * w, s * n_ans * L / 2)])
    if name == "causal_tracing":
        S = params.samples
        s0 = prep.subject.start if prep.subject is not None else 0
        cells = range(s0, T) if model.kind == "causal" else range(T)
        from knowmri.methods.tracing_engine import restore_starts, staircase_cost

        work, reads = 0.0, 0
        for kind in params.kinds:
            starts = restore_starts(kind, params.window, L)
            # distinct states only: restorations still equal share rows, an MLP window's first block is a sum
            calls, groups = staircase_cost(kind, list(range(L)), starts, params.window, L, kind == "mlp")
            for t in cells:  # a causal model's states before t are the corrupted run's
                suffix = T - t if model.kind == "causal" else T
                work += S * calls * dims.tokens(suffix, T)
                reads += S * groups
        fwd = (1 + S) * (full + dims.readouts(1)) + work + dims.readouts(reads)
        return Work(fwd, passes=f"{1 + S} forwards + {reads} distinct restorations over blocks l..L-1, positions t..T-1",
                    sweeps=3, rows=params.batch_size * T)
    if name == "knowledge_circuits":
        f = result.findings if result is not None else {}
        scored = (f.get("corruption") or {}).get("candidates_scored", 0)  # the counterfactual subject's search
        steps = 1 + (params.ig_steps if params.method == "eap-ig" else 1)
        one = full + dims.readouts(1)
        return Work((3 + scored) * one + steps * one, bwd_of=steps * one,
                    passes=f"{scored} candidate subjects + 2 forwards + {steps} forward+backward + 1 check",
                    sweeps=5 if scored else 4, parts=[((3 + scored) * one, (scored or 1) * T), (2 * steps * one, steps * T)])
    if name == "patchscopes":
        f = result.findings if result is not None else {}
        tgt = len(model.tokenizer(params.target_prompt)["input_ids"])
        steps = params.max_new_tokens
        patched = sum(L - 1 - layer for layer in range(L))
        w = full + dims.tokens((tgt - 1) * L, tgt) + dims.tokens(patched, tgt)
        decode = dims.tokens(L * (steps - 1) * L, tgt + steps) + dims.readouts(L * steps)
        del f
        return Work(w + decode, passes=f"source + target prefix + {L} rows x {steps} cached steps", sweeps=1 + steps,
                    parts=[(w, T), (decode, L)])
    if name == "self_explanation":
        f = result.findings if result is not None else {}
        req = f.get("request") or ""
        t_req = len(model.tokenizer(req)["input_ids"]) + 20 if req else T + 60
        a, g = params.answer_tokens, params.max_new_tokens
        prefill = dims.tokens(T * L, T) + dims.tokens(t_req * L, t_req)
        decode = dims.tokens((a - 1) * L, T + a) + dims.readouts(a) + dims.tokens((g - 1) * L, t_req + g) + dims.readouts(g)
        return Work(prefill + decode, passes=f"2 cached generations ({a} + {g} tokens)", sweeps=a + g,
                    parts=[(prefill, T), (decode, 1)])
    if name == "spine":
        f = result.findings if result is not None else {}
        stats = f.get("training") or f.get("stats") or {}
        hidden = params.hidden_dim or min(4 * dims.d, 1000)
        updates = stats.get("updates") or 1500
        rows = stats.get("rows") or params.vocab_limit or dims.V
        train = 10 * updates * params.batch_size * dims.d * hidden
        return Work(0.0, extra=train + 2 * rows * dims.d * hidden, passes=f"{updates} autoencoder updates", sweeps=0,
                    rows=params.batch_size, float32=True)
    return None


def matmul_rate(dims: Dims, device: str, dtype: torch.dtype, rows: int = 640, reps: int = 20,
                samples: int = 5) -> tuple[float, float]:
    """FLOP/s of torch.matmul on [rows, d] @ [d, d_mlp] (a batch of tokens through an MLP): per wall-clock
    second and per CPU second of this process (the latter barely changes with the machine's load)."""
    a = torch.randn(rows, dims.d, device=device, dtype=dtype)
    b = torch.randn(dims.d, dims.d_mlp, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    flops = 2 * rows * dims.d * dims.d_mlp * reps

    def run() -> None:
        for _ in range(reps):
            a @ b

    wall, cpu = [], []
    for _ in range(samples):
        w, c, _ = H.measure(run, device)
        wall.append(flops / max(w, 1e-9))
        cpu.append(flops / max(c, 1e-9))
    return max(wall), statistics.median(cpu)


class RowRates:
    """The matmul rate at a given number of rows, measured on the model's own MLP matrices in sequence
    (every layer's, so the weights stream from memory as in a forward): [rows, d] times each matrix.
    A few rows (one decoding step, one short prompt) cannot reach the big-matmul rate; this is the
    rate the machine's BLAS gives for exactly that shape, with nothing else (no attention, no Python)."""

    def __init__(self, model: Any, dims: Dims, device: str, dtype: torch.dtype) -> None:
        n = dims.d * dims.d_mlp
        self.mats = [p.detach().to(dtype) for layer in model.layers for p in layer.parameters() if p.dim() == 2 and p.numel() == n]
        self.dims, self.device, self.dtype = dims, device, dtype
        self.cache: dict[int, tuple[float, float]] = {}

    def __call__(self, rows: float) -> tuple[float, float]:
        """(FLOP/s per wall second, best of 5; FLOP/s per CPU second, median) at `rows` rows."""
        rows = max(1, int(round(rows)))
        if rows not in self.cache:
            d = self.dims.d
            x = torch.randn(rows, d, device=self.device, dtype=self.dtype)
            flops_once = 2 * rows * d * self.dims.d_mlp * len(self.mats)
            reps = max(1, int(2e9 // max(flops_once, 1)))

            def run() -> None:
                for _ in range(reps):
                    for w in self.mats:
                        x @ w.T if w.shape[1] == d else x @ w

            run()
            wall, cpu = [], []
            for _ in range(5):
                w_s, c_s, _ = H.measure(run, self.device)
                wall.append(flops_once * reps / max(w_s, 1e-9))
                cpu.append(flops_once * reps / max(c_s, 1e-9))
            self.cache[rows] = (max(wall), statistics.median(cpu))
        return self.cache[rows]


def bandwidth(device: str, mbytes: int = 256, samples: int = 5) -> tuple[float, float]:
    """Bytes/s of reading a large float32 tensor (`sum`): per wall second (best) and per CPU second (median)."""
    x = torch.ones(mbytes * (1 << 20) // 4, device=device)
    x.sum()
    wall, cpu = [], []
    for _ in range(samples):
        w, c, _ = H.measure(lambda: x.sum(), device)
        wall.append(x.numel() * 4 / max(w, 1e-9))
        cpu.append(x.numel() * 4 / max(c, 1e-9))
    return max(wall), statistics.median(cpu)


def floor_seconds(work: Work, rate: Any, bw: float, weight_bytes: float) -> float:
    """The roofline floor: each part's FLOPs at the matmul rate for its rows (`rate(rows)`), or the
    sequential weight sweeps at the memory bandwidth, whichever is longer."""
    return max(sum(flops / rate(rows) for flops, rows in work.split()), work.sweeps * weight_bytes / bw)


def counted_flops(fn: Any) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())
    except Exception:  # an op the counter cannot follow: no count
        return None


def main() -> None:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default="", help="comma-separated subset (default: every method)")
    p.add_argument("--no-count", action="store_true", help="skip the FLOP-counting run (faster)")
    args = p.parse_args()
    H.setup(args)
    if args.quick:
        args.repeats = 1
    from knowmri.diagnosis import run_method
    from knowmri.matching import match
    from knowmri.methods.base import RunContext, get_method
    from knowmri.methods.common import prepare

    model = H.load_smollm2(args)
    dims = Dims.of(model)
    sample = H.eiffel()
    os.environ["KNOWMRI_HOME"] = H.scratch_home()  # cold caches (SPINE trains)
    prep = prepare(model, sample, need_subject=True)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    names = [m.name for m in match(sample, model) if m.eligible and (not wanted or m.name in wanted)]
    rate0, cpu_rate0 = matmul_rate(dims, args.device, H.dtype_of(args))
    bw, cpu_bw = bandwidth(args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.hf_model.parameters())
    rates = RowRates(model, dims, args.device, H.dtype_of(args))
    rates32 = rates if H.dtype_of(args) == torch.float32 else RowRates(model, dims, args.device, torch.float32)
    print(f"matmul rate {rate0 / 1e9:.1f} GFLOP/s per wall second (best of 5), {cpu_rate0 / 1e9:.1f} per CPU second; "
          f"memory {bw / 1e9:.1f} GB/s ({cpu_bw / 1e9:.1f} per CPU second); weights {weight_bytes / 1e6:.0f} MB; "
          f"block params {dims.block_params / 1e6:.2f} M x {dims.L} layers", flush=True)
    rows, table = [], []
    for name in names:
        method = get_method(name)
        overrides = QUICK_PARAMS.get(name, {}) if args.quick else {}
        params = method.Params.from_dict(overrides)

        def call(method: Any = method, overrides: dict = overrides) -> Any:
            os.environ["KNOWMRI_HOME"] = H.scratch_home()  # cold: SPINE trains each time
            return run_method(method, model, sample, overrides, RunContext(), 0)

        times, cpus, result = [], [], None
        while len(times) < max(1, args.repeats) or (args.quick and len(times) < 5 and sum(times) < 8.0):
            seconds, cpu, result = H.measure(call, args.device)  # --quick: up to 5 runs (the median) of the fast methods
            times.append(seconds)
            cpus.append(cpu)
        counted = None if args.no_count else counted_flops(call)
        work = floor_work(name, model, dims, prep, params, result)
        achieved, achieved_cpu = statistics.median(times), statistics.median(cpus)
        rate = rates32 if work is not None and work.float32 else rates
        floor_s = floor_seconds(work, lambda r, rate=rate: rate(r)[0], bw, weight_bytes) if work else None
        floor_cpu = floor_seconds(work, lambda r, rate=rate: rate(r)[1], cpu_bw, weight_bytes) if work else None
        entry = {"method": name, "params": overrides, "status": result.status, "error": result.error,
                 "seconds": achieved, "times_s": times, "cpu_s": achieved_cpu, "cpu_times_s": cpus,
                 "floor_flops": work.flops if work else None, "floor_s": floor_s, "floor_cpu_s": floor_cpu,
                 "passes": work.passes if work else "", "counted_flops": counted,
                 "time_over_floor": achieved / floor_s if floor_s else None,
                 "cpu_over_floor": achieved_cpu / floor_cpu if floor_cpu else None,
                 "counted_over_floor": counted / work.flops if counted and work else None,
                 "cpu_over_counted": achieved_cpu / (counted / cpu_rate0) if counted else None}
        table.append(entry)
        print(f"  {name}: {H.fmt_s(achieved)} (CPU {H.fmt_s(achieved_cpu)}) vs floor {H.fmt_s(floor_s)} "
              f"(CPU x{entry['cpu_over_floor'] or 0:.1f}; FLOPs counted/floor "
              f"{entry['counted_over_floor'] or 0:.2f}) [{result.status}]", flush=True)
        detail = work.passes if work else ""
        if entry["cpu_over_floor"]:
            detail += f"; CPU time / CPU floor {entry['cpu_over_floor']:.1f}x"
        if entry["counted_over_floor"]:
            detail += f"; FLOPs executed / needed {entry['counted_over_floor']:.2f}"
        label = name if args.dtype == "float32" else f"{name} ({args.dtype})"  # a second dtype's file joins the summary
        rows.append(H.row(label, "roofline floor (measured matmul rate and memory bandwidth)", achieved, floor_s, None, detail, kind="floor",
                          cpu_over_floor=entry["cpu_over_floor"], counted_over_floor=entry["counted_over_floor"]))
    rate1, cpu_rate1 = matmul_rate(dims, args.device, H.dtype_of(args))

    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.1f}"

    print("\n| method | seconds | CPU s | floor | wall / floor | CPU / CPU floor | FLOPs executed / needed | "
          "CPU / executed FLOPs | work |")
    print("|---|---|---|---|---|---|---|---|---|")
    for e in table:
        print(f"| {e['method']} | {H.fmt_s(e['seconds'])} | {H.fmt_s(e['cpu_s'])} | {H.fmt_s(e['floor_s'])} | "
              f"{f(e['time_over_floor'])} | {f(e['cpu_over_floor'])} | {f(e['counted_over_floor'])} | "
              f"{f(e['cpu_over_counted'])} | {e['passes']} |")
    path = H.write_result("floor", rows, model="smollm2-135m", args=args, methods=table,
                          matmul_gflops_wall=[rate0 / 1e9, rate1 / 1e9], matmul_gflops_cpu=[cpu_rate0 / 1e9, cpu_rate1 / 1e9],
                          row_rates_gflops={r: [w / 1e9, c / 1e9] for r, (w, c) in sorted(rates.cache.items())},
                          memory_gbps_wall=bw / 1e9, memory_gbps_cpu=cpu_bw / 1e9, weight_bytes=weight_bytes,
                          block_params=dims.block_params, finished=time.time())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The cost model behind `Method.estimate`: seconds and peak memory of a method's work, before it runs.

What `Method.estimate` shows before a run: seconds from the work a method does (its passes through the
blocks, its read-outs, per-call overheads) at rates measured lazily on the device (`device_rates`,
`stream_bandwidth`), and the peak extra memory from the largest batch alive at once. A method describes
its work as `Pass`es and extra terms and calls `work_estimate`; `sample_shape` gives the token counts it
scales with, from tokenising only. The per-token sizes below were checked against measured times and
peaks on SmolLM2 (benchmarks/bench_estimate.py); estimates are meant to be right within ~2x, and to
scale right with prompt length, layers, widths, vocabulary, rows and dtype.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from knowmri.methods.estimate import Estimate
from knowmri.sample import Sample

#: Elements kept per token and block for the backward pass, in units of (d_model, d_mlp): norms' inputs
#: and outputs, queries, keys, values, rotated copies, the attention output, the MLP's input and its
#: d_mlp-wide intermediates (4 for a gated MLP: gate, up, act(gate), act x up; 2 otherwise).
SAVED_PER_TOKEN = (10, 4, 2)
#: Elements alive at once per token inside one block without gradients (the MLP's intermediates, the
#: residual stream, a norm's output, the attention's output): (d_model, d_mlp gated, d_mlp plain).
TRANSIENT_PER_TOKEN = (4, 3, 2)
#: Elements read and written per token by one block's elementwise work (norms, rotary, activations,
#: residual adds, and the new tensors that matmuls write), (d_model, d_mlp), forward; the backward does
#: about twice this.
ELEMENTWISE_PER_TOKEN = (48, 12)
#: Small tensor ops (each paying a dispatch, and on GPU a launch) per block call, forward and backward,
#: and per call of the whole model (embedding, masks, final norm, the wrapper's own work).
BLOCK_OPS, BLOCK_BACKWARD_OPS, MODEL_OPS = 70, 70, 150


@dataclass(frozen=True)
class Rates:
    """What a device does per second, per device and dtype (`device_rates`; `stream_bandwidth` per model).

    A matmul of `rows` rows computes at `flops` x rows / (rows + half_rows) and, besides, reads its
    weights at `stream_bandwidth`: a handful of rows (a short prompt, one decoding step) cannot reach a
    big matmul's rate."""

    flops: float  # FLOP/s of a big matmul
    half_rows: float  # rows at which a matmul runs at half of `flops`
    op_seconds: float  # one small tensor op: dispatch (and launch) time
    bandwidth: float  # bytes/s read + written by an elementwise op that allocates its output
    inplace_bandwidth: float = 0.0  # bytes/s of an in-place elementwise op (no allocation)
    stream_bandwidth: float = 0.0  # bytes/s at which a model's weights are read by a one-row product (0: unknown)

    def matmul(self, flops: float, rows: float, weight_bytes: float = 0.0) -> float:
        """Seconds of `flops` FLOPs of matmuls whose left operand has `rows` rows, reading `weight_bytes`
        bytes of weights (streamed from memory once per product, whatever the rows)."""
        stream = weight_bytes / self.stream_bandwidth if self.stream_bandwidth else 0.0
        return stream + flops / self.flops * (1.0 + self.half_rows / max(rows, 1.0))


_RATES: dict[Any, tuple[Any, float, int, Any]] = {}  # key -> (best reading, when, readings, weak ref or None)
_RATES_LOCK = threading.Lock()
#: A measurement taken while other processes hold the cores reads far too slow (bursts of 10x on a shared
#: 2-core machine), so rates are re-measured, at most this often and this many times per process, and the
#: fastest reading is kept: the estimate is for the device itself, not for the load of a moment.
REMEASURE_SECONDS, MEASUREMENTS = 20.0, 6


def _best_reading(key: Any, measure: Any, better: Any, owner: Any = None) -> Any:
    """`measure()` cached under `key` (for as long as `owner` lives, when given), re-measured now and then
    (see `REMEASURE_SECONDS`) and combined with the previous reading by `better`."""
    found = _RATES.get(key)
    if found is not None and found[3] is not None and found[3]() is not owner:
        found = None  # the owner was freed and its id reused
    now = time.monotonic()
    if found is not None and (found[2] >= MEASUREMENTS or now - found[1] < REMEASURE_SECONDS):
        return found[0]
    with _RATES_LOCK:
        value = measure()
        if found is not None:
            value = better(found[0], value)
        ref = weakref.ref(owner) if owner is not None else None
        _RATES[key] = (value, time.monotonic(), 1 + (found[2] if found is not None else 0), ref)
    return value


def device_rates(device: Any = None, dtype: torch.dtype = torch.float32) -> Rates:
    """The `Rates` of `device` (default the CPU) for `dtype`, measured on first use (~10 ms) and now and
    then after that (see `REMEASURE_SECONDS`), keeping the best reading."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _best_reading((str(device), dtype), lambda: _measure_rates(device, dtype), _best)


def _best(a: Rates, b: Rates) -> Rates:
    """The faster reading of each rate (the 16-row rate is recovered from each reading's half_rows)."""
    small = max(a.flops / (1 + a.half_rows / 16), b.flops / (1 + b.half_rows / 16))
    big = max(a.flops, b.flops)
    return Rates(flops=big, half_rows=16.0 * max(big / small - 1.0, 0.0), op_seconds=min(a.op_seconds, b.op_seconds),
                 bandwidth=max(a.bandwidth, b.bandwidth), inplace_bandwidth=max(a.inplace_bandwidth, b.inplace_bandwidth),
                 stream_bandwidth=max(a.stream_bandwidth, b.stream_bandwidth))


#: Weights streamed to measure a model's weight-reading rate: more than a CPU's last-level cache.
STREAM_BYTES = 48 << 20


def stream_bandwidth(model: Any) -> float:
    """Bytes/s at which one-row products read this model's block weights (the first blocks', up to
    STREAM_BYTES): what a decoding step or a short prompt waits for, besides the FLOPs. Measured once per
    model (a few ms) and now and then after that, like `device_rates`."""
    hf = getattr(model, "hf_model", None)
    if hf is None:
        return 0.0
    return _best_reading(("stream", id(hf)), lambda: _measure_stream(model), max, owner=hf)


def _measure_stream(model: Any) -> float:
    weights, total = [], 0
    try:
        for layer in model.layers:
            for w in layer.parameters():
                if w.dim() == 2:
                    weights.append(w)
                    total += w.numel() * w.element_size()
            if total >= STREAM_BYTES:
                break
    except (AttributeError, TypeError):
        return 0.0
    if not weights:
        return 0.0
    gpu = weights[0].device.type == "cuda"
    with torch.inference_mode():
        inputs = {(w.shape[1], w.dtype, w.device): torch.ones(1, w.shape[1], dtype=w.dtype, device=w.device)
                  for w in weights}
        best = float("inf")
        for _ in range(2):
            if gpu:
                torch.cuda.synchronize(weights[0].device)
            start = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(inputs[(w.shape[1], w.dtype, w.device)], w)
            if gpu:
                torch.cuda.synchronize(weights[0].device)
            best = min(best, time.perf_counter() - start)
    return total / max(best, 1e-9)


def _measure_rates(device: torch.device, dtype: torch.dtype) -> Rates:
    """A big square matmul, the same weights times 16 rows, a tiny op, and an elementwise pass; best of a
    few tries each (a busy machine only ever slows a try down)."""
    gpu = device.type == "cuda"
    n = 4096 if gpu else 512

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(device)

    def best(fn: Any, reps: int, tries: int = 3) -> float:
        fn()
        sync()
        out = float("inf")
        for _ in range(tries):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            out = min(out, time.perf_counter() - start)
        return max(out / reps, 1e-9)

    with torch.inference_mode():
        w = torch.rand(n, n, device=device).to(dtype)
        x = w[:16].clone()
        one = torch.ones(1, device=device, dtype=dtype)
        buf = torch.ones(1 << (26 if gpu else 21), device=device, dtype=dtype)  # on GPU, big enough to outweigh a launch
        big = 2 * n**3 / best(lambda: w @ w, 2, 2)
        small = 2 * 16 * n * n / best(lambda: x @ w, 4)
        op = best(lambda: one.add(1), 40)
        bandwidth = 2 * buf.nbytes / best(lambda: buf * 1.0, 2)  # with a new output, as most ops allocate
        inplace = 2 * buf.nbytes / best(lambda: buf.mul_(1.0), 2)
    half = 16.0 * max(big / max(small, 1.0) - 1.0, 0.0)
    return Rates(flops=big, half_rows=half, op_seconds=op, bandwidth=bandwidth, inplace_bandwidth=inplace)


def matmul_flops_per_second() -> float:
    """This machine's float32 big-matmul rate (CPU), measured lazily (see `device_rates`)."""
    return device_rates().flops


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.hf_model.parameters())


@dataclass
class Pass:
    """Rows run through (some of) the model's blocks at once, as a method runs them (see `work_estimate`).

    `rows` rows of `tokens` positions each run `blocks` blocks (default all; the average when rows start
    at different blocks, as in a staircase batch) over `span` block calls (default `blocks`: the calls
    made for the whole batch), attending to `context` positions (a key/value prefix plus `tokens`;
    default `tokens`). `readout` rows x positions are projected onto the vocabulary (all positions of
    every row when a forward returns full logits). With `backward`, gradients flow back through it and
    every block's activations are kept; `cache` keeps a key/value cache of `context` positions.
    `model_call`: a call of the whole model (embedding, masks, final norm), not direct block calls.
    `count` such passes run one after the other."""

    rows: float = 1
    tokens: float = 1
    blocks: float | None = None
    span: float | None = None
    context: float | None = None
    readout: float = 0
    backward: bool = False
    cache: bool = False
    model_call: bool = True
    count: float = 1


@dataclass(frozen=True)
class Dims:
    """The sizes an estimate needs, read off a model once per call of `work_estimate` (no forward)."""

    layers: int
    d: int
    d_mlp: int
    heads: int
    d_head: int
    kv: int  # key (= value) width per token: n_kv_heads x d_head
    vocab: int
    bytes: int  # per element of the model's dtype
    block_params: int  # matmul weights of one block
    gated: bool

    @classmethod
    def of(cls, model: Any) -> Dims:
        config = getattr(model, "config", None)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or model.n_heads) if config is not None else model.n_heads
        if getattr(config, "multi_query", False):
            kv_heads = 1
        try:
            block = sum(p.numel() for p in model.layers[0].parameters() if p.dim() >= 2)
        except (AttributeError, IndexError, TypeError):
            block = 0
        gated = bool(getattr(model.spec, "mlp_gate", None))
        block = block or (4 * model.d_model * model.d_model + (3 if gated else 2) * model.d_model * model.d_mlp)
        return cls(layers=model.n_layers, d=model.d_model, d_mlp=model.d_mlp, heads=model.n_heads, d_head=model.d_head,
                   kv=kv_heads * model.d_head, vocab=model.vocab_size, bytes=_dtype_bytes(model), block_params=block,
                   gated=gated)

    def per_token(self, sizes: tuple[int, ...]) -> int:
        """Elements per token for per-token size coefficients (d_model, d_mlp gated[, d_mlp plain])."""
        mlp = sizes[1] if self.gated or len(sizes) < 3 else sizes[2]
        return sizes[0] * self.d + mlp * self.d_mlp

    def logits_bytes(self, rows: float) -> int:
        """Full-vocabulary logits of `rows` rows in the model's dtype, their float32 copy (unless already
        float32) and a float32 softmax of them."""
        return int(rows * self.vocab * (self.bytes + 4 + (4 if self.bytes < 4 else 0)))


def _dtype_bytes(model: Any) -> int:
    try:
        return int(torch.empty((), dtype=model.dtype).element_size())
    except (TypeError, RuntimeError, AttributeError):
        return 4


def model_rates(model: Any) -> Rates:
    """The `Rates` of the model's device and dtype."""
    try:
        device, dtype = model.device, model.dtype
    except AttributeError:
        device, dtype = torch.device("cpu"), torch.float32
    rates = device_rates(device, dtype if isinstance(dtype, torch.dtype) else torch.float32)
    return dataclasses.replace(rates, stream_bandwidth=stream_bandwidth(model))


def pass_seconds(dims: Dims, rates: Rates, p: Pass) -> float:
    """Seconds of one `Pass` (not times its count)."""
    blocks = dims.layers if p.blocks is None else p.blocks
    span = blocks if p.span is None else p.span
    context = p.tokens if p.context is None else p.context
    if blocks <= 0:
        span = 0.0
    work = p.rows * p.tokens * blocks  # token-block applications
    per_call_rows = work / max(span, 1e-9) if span else 0.0  # matmul rows of an average block call
    matmul = 2.0 * dims.block_params * work
    attention = 4.0 * work * context * dims.heads * dims.d_head
    elementwise = work * dims.per_token(ELEMENTWISE_PER_TOKEN) * dims.bytes
    back = 2.0 if p.backward else 1.0  # the backward of activations only (no weight gradients): ~1x forward
    seconds = back * (rates.matmul(matmul, per_call_rows, span * dims.block_params * dims.bytes)
                      + rates.matmul(attention, max(p.tokens, 1.0)) + elementwise / rates.bandwidth)
    seconds += span * (BLOCK_OPS + (BLOCK_BACKWARD_OPS if p.backward else 0)) * rates.op_seconds
    if p.model_call:
        seconds += MODEL_OPS * (2 if p.backward else 1) * rates.op_seconds
    if p.readout:
        seconds += back * (rates.matmul(2.0 * dims.d * dims.vocab * p.readout, p.readout, dims.vocab * dims.d * dims.bytes)
                           + 3 * p.readout * dims.vocab * (dims.bytes + 4) / rates.bandwidth)
    return seconds


def pass_bytes(dims: Dims, p: Pass) -> int:
    """Peak memory of one `Pass` above what was alive before it."""
    blocks = dims.layers if p.blocks is None else p.blocks
    context = p.tokens if p.context is None else p.context
    rows_tokens = p.rows * p.tokens
    attention = p.rows * dims.heads * p.tokens * context * dims.bytes  # one block's attention weights
    if p.backward:
        activations = blocks * (rows_tokens * dims.per_token(SAVED_PER_TOKEN) * dims.bytes + 2 * attention)
        activations += rows_tokens * dims.d * dims.bytes * 2  # the gradient flowing back, and its input's
    else:
        activations = rows_tokens * dims.per_token(TRANSIENT_PER_TOKEN) * dims.bytes + attention
    cache = p.rows * context * 2 * dims.kv * dims.bytes * blocks if p.cache else 0
    logits = dims.logits_bytes(p.readout) * (2 if p.backward else 1)
    return int(activations + cache + logits)


def work_estimate(model: Any, passes: Iterable[Pass], *, seconds: float = 0.0, memory: float = 0.0,
                  resident: float = 0.0) -> Estimate:
    """An `Estimate` of a method's work: its `passes` (run one after another; the peak is the largest
    one's), plus `seconds` of other work, plus `memory` bytes alive at that peak (buffers the method
    holds while its passes run), or `resident` bytes alive at some other time if that is more."""
    dims, rates = Dims.of(model), model_rates(model)
    passes = [p for p in passes if p.count > 0]
    total = seconds + sum(p.count * pass_seconds(dims, rates, p) for p in passes)
    peak = max([pass_bytes(dims, p) for p in passes] or [0]) + memory
    forward = sum(p.count for p in passes if p.model_call)
    backward = sum(p.count for p in passes if p.backward)
    return Estimate(seconds=float(total), memory_bytes=int(max(peak, resident, 0)),
                    forward_passes=int(round(forward)), backward_passes=int(round(backward)))


def elementwise_seconds(model: Any, nbytes: float, ops: float = 0, inplace: float = 0) -> float:
    """Seconds to read and write `nbytes` bytes in elementwise work (ops allocating their outputs) and
    `inplace` bytes in place, plus `ops` small-op dispatches."""
    rates = model_rates(model)
    return nbytes / rates.bandwidth + inplace / (rates.inplace_bandwidth or rates.bandwidth) + ops * rates.op_seconds


def matmul_seconds(model: Any, flops: float, rows: float, weight_bytes: float = 0.0) -> float:
    """Seconds of `flops` FLOPs of matmuls of `rows` rows on the model's device, reading `weight_bytes`
    bytes of weights."""
    return model_rates(model).matmul(flops, rows, weight_bytes)


@dataclass
class Shape:
    """A sample's token counts for one model, from tokenising only (what estimates scale with)."""

    prompt: int  # the prompt's tokens
    input: int  # tokens the model reads in a teacher-forced pass (the encoder's for seq2seq)
    answer: int  # answer tokens (1 when the answer is the model's own prediction)
    decoder: int  # the decoder's tokens (seq2seq), else 0
    has_answer: bool  # a ground truth is given (else finding the prediction costs a forward)
    subject: tuple[int, int] | None  # the subject's token span, when the sample has one in the prompt

    @property
    def positions(self) -> int:
        """Positions of a teacher-forced pass (the decoder's for seq2seq)."""
        return self.decoder or self.input


def sample_shape(model: Any, sample: Sample, max_answer_tokens: int | None = None) -> Shape:
    """The `Shape` of `sample` for `model` (a rough count from characters if it does not tokenise)."""
    prompt = sample.get("prompt") or ""
    truth = sample.get("ground_truth")
    try:
        enc = model.encode(prompt, truth) if truth else model.encode(prompt)
        n_answer = len(enc.target_ids) if truth else 1
        if max_answer_tokens is not None and n_answer > max_answer_tokens:
            cut = n_answer - max_answer_tokens
            n_answer = max_answer_tokens
        else:
            cut = 0
        dec = 0 if enc.decoder_input_ids is None else max(1, int(enc.decoder_input_ids.shape[1]) - cut)
        length = int(enc.input_ids.shape[1]) - (cut if model.kind == "causal" else 0)
        if not truth and model.kind == "causal":
            length = enc.prompt_len
        span = None
        subject = sample.get("triple_subject")
        if subject and subject in prompt:
            try:
                found = model.token_span(prompt, subject, encoded=enc)
                span = (found.start, found.stop)
            except ValueError:
                span = None
        return Shape(prompt=max(1, enc.prompt_len), input=max(1, length), answer=max(1, n_answer), decoder=dec,
                     has_answer=bool(truth), subject=span)
    except Exception:  # an estimate never fails on a sample the model cannot encode; the run will say why
        n = max(1, len(prompt) // 4 + 1)
        return Shape(prompt=n, input=n, answer=1, decoder=0, has_answer=bool(truth), subject=None)


def readout_pass(rows: float, count: float = 1) -> Pass:
    """`rows` vectors projected onto the vocabulary (final norm and unembedding), no block."""
    return Pass(rows=rows, tokens=1, blocks=0, readout=rows, model_call=False, count=count)


def prepare_passes(model: Any, shape: Shape) -> list[Pass]:
    """What `prepare` runs: nothing with a ground truth, else one forward to find the model's prediction."""
    if shape.has_answer:
        return []
    return [Pass(tokens=shape.input, readout=1)]


def clean_pass_passes(model: Any, shape: Shape, positions: int = 1) -> list[Pass]:
    """`clean_pass`: one forward, logits read at `positions` positions (all where logits_to_keep is missing)."""
    keep = positions if model.takes_logits_to_keep else shape.positions
    return [Pass(tokens=shape.input + shape.decoder, readout=keep)]


def clean_pass_bytes(model: Any, shape: Shape, positions: int = 1) -> int:
    """What a `CleanPass` holds: the residual stream of every layer and position, neurons and heads at
    `positions` positions, and their logits."""
    dims = Dims.of(model)
    return int(dims.bytes * dims.layers * (shape.positions * dims.d + positions * (dims.d_mlp + dims.heads * dims.d_head))
               + dims.logits_bytes(positions))


def forward_cost(model: Any, sample: Sample, forward: int = 1, backward: int = 0, tokens: int | None = None) -> Estimate:
    """An estimate of `forward` forward passes of one row (of which `backward` also run backward) over the
    sample's tokens (or `tokens`), each read out at one position: the default for a method with no
    estimate of its own (see `work_estimate` for a precise description of the work)."""
    if tokens is None:
        tokens = sample_shape(model, sample).input
    passes = [Pass(tokens=tokens, readout=1, backward=True, count=backward)] if backward else []
    passes.append(Pass(tokens=tokens, readout=1, count=max(forward - backward, 0)))
    return work_estimate(model, passes)

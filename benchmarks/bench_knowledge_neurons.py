"""Benchmark: knowmri's batched knowledge-neuron attribution (Dai et al. 2022) against

- the straightforward per-layer loop (the paper's / EleutherAI's algorithm, reimplemented in
  `knowmri.testing.kn_reference.ig_neurons_reference`: per layer a clean forward, then `steps`
  scaled copies of the whole input in one batch and one backward), and
- EleutherAI's `knowledge-neurons` PyPI package (`pip install --no-deps knowledge-neurons einops`).

All three integrate P(answer) over the same points (linspace(0, 1, steps), the package's) at the
answer-predicting position, so their attributions must agree. knowmri batches (layer, step) rows
of several layers per backward and, on causal models, runs only the predicting position over a
key/value cache of the clean prefix. The package attributes GPT-2's `mlp.c_fc` output, which is
the pre-GELU activation, not the neurons of the paper; the GPT-2 row points it at `mlp.act`
(post-GELU, the same neurons as knowmri). It has no entry for LLaMA-style models (SmolLM2): its
layer paths are hard-coded (`bert.encoder.layer` / `transformer.h`) and a gated MLP computes
act(gate) * up inline, with no module whose output is the neurons; the SmolLM2 row records why.

Commands alternate in one process; medians, ratios, allclose and top-10 neurons are reported.
On SmolLM2 the loop takes ~100 CPU-seconds per call even at 4 steps, so it runs twice, unwarmed
(once with --quick); tiny models run on one thread (their cost is per-call overhead).
Writes benchmarks/results/knowledge_neurons.json.

    python benchmarks/bench_knowledge_neurons.py [--repeats 3] [--skip-smollm2] [--device cuda]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from _harness import allclose, alternate, load_smollm2, parser, print_rows, row, setup, tolerance, write_result  # noqa: E402

from knowmri.methods import kn_engine  # noqa: E402
from knowmri.methods import neuron_readouts as nr  # noqa: E402
from knowmri.testing.kn_reference import ig_neurons_reference  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
TOP = 10


def ours(model: Any, enc: Any, steps: int) -> torch.Tensor:
    """knowmri: one clean forward, then the batched IG rows; [n_layers, d_mlp]."""
    jobs, positions = kn_engine.ig_jobs(model, enc, nr.answer_tokens(model, enc), "answer")
    clean, _ = nr.clean_neurons(model, enc, positions)
    return kn_engine.ig_neurons(model, enc, jobs, clean, positions, steps=steps, riemann="linspace").sum(0)


def loop(model: Any, enc: Any, steps: int) -> torch.Tensor:
    """The per-layer loop of the paper / EleutherAI; [n_layers, d_mlp]."""
    jobs, _ = kn_engine.ig_jobs(model, enc, nr.answer_tokens(model, enc), "answer")
    return ig_neurons_reference(model, enc, jobs, steps=steps, riemann="linspace").sum(0)


def eleutherai(model: Any, enc: Any, steps: int) -> Any:
    """A callable running EleutherAI's `KnowledgeNeurons.get_scores` on the same input; [n_layers, d_mlp]."""
    from knowledge_neurons import KnowledgeNeurons

    if model.spec.family == "bert":
        tok = copy.deepcopy(model.tokenizer)
        tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # the package reads token_type_ids
        kn = KnowledgeNeurons(model.hf_model, tok, model_type="bert", device=str(model.device))
        body = model.tokenizer.decode(enc.input_ids[0, 1: enc.pred_pos]) + " " + tok.mask_token
        truth = tok.convert_ids_to_tokens(enc.target_ids[0])
    elif model.spec.family == "gpt2":
        kn = KnowledgeNeurons(model.hf_model, model.tokenizer, model_type="gpt2", device=str(model.device))
        kn.input_ff_attr = "mlp.act"  # post-GELU neurons; the package's default (mlp.c_fc) is pre-activation
        body, truth = PROMPT, model.tokenizer.decode(enc.target_ids)
    else:
        kn = KnowledgeNeurons(model.hf_model, model.tokenizer, model_type="gpt2", device=str(model.device))
        body, truth = PROMPT, model.tokenizer.decode(enc.target_ids)
    ids = kn.tokenizer(body, return_tensors="pt")["input_ids"]
    if not torch.equal(ids.to(enc.input_ids.device), enc.input_ids):
        raise ValueError(f"the package tokenizes the prompt differently: {ids.tolist()} vs {enc.input_ids.tolist()}")
    return lambda: kn.get_scores(body, truth, batch_size=steps, steps=steps, pbar=False)


def top(scores: torch.Tensor) -> list[tuple[int, int]]:
    return [(layer, unit) for layer, unit, _ in nr.ranked(torch.as_tensor(scores).float().cpu(), TOP)]


def bench(label: str, model: Any, answer: str, steps: int, repeats: int, args: Any, peer: bool,
          warmup: int = 1) -> list[dict[str, Any]]:
    enc = model.encode(PROMPT, answer)
    commands = {"knowmri": lambda: ours(model, enc, steps), "loop": lambda: loop(model, enc, steps)}
    peer_error = None
    if peer:
        try:
            commands["eleutherai"] = eleutherai(model, enc, steps)
        except Exception as err:  # the package cannot load this model: that is the finding
            peer_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if not warmup:
        ours(model, enc, steps)  # the loop is too slow to warm up twice; knowmri's first call warms the kernels
    t = alternate(commands, repeats=repeats, warmup=warmup, device=args.device)
    base = (f"{label}: {model.n_layers} layers x {model.d_mlp} neurons, {enc.input_ids.shape[1]} tokens, "
            f"{steps} steps")
    k = t["knowmri"].result
    equal, diff = allclose(k, t["loop"].result, **tolerance(args))
    same_top = top(k) == top(t["loop"].result)
    rows = [row("knowledge_neurons", "per-layer loop (paper / EleutherAI algorithm)", t["knowmri"], t["loop"],
                equal and same_top, f"{base}; max |diff| {diff:.2e}; top-{TOP} identical: {same_top}",
                top_knowmri=top(k), top_baseline=top(t["loop"].result))]
    if peer:
        other = t.get("eleutherai")
        if peer_error or other is None or other.error or other.result is None:
            why = peer_error or (other.error if other is not None else "did not run")
            rows.append(row("knowledge_neurons", "EleutherAI knowledge-neurons 0.0.2", t["knowmri"], None, None,
                            f"{base}; the package cannot run this model: {why}", baseline_error=why))
        else:
            equal_p, diff_p = allclose(k, other.result, **tolerance(args))
            same_p = top(k) == top(other.result)
            rows.append(row("knowledge_neurons", "EleutherAI knowledge-neurons 0.0.2", t["knowmri"], other,
                            equal_p and same_p, f"{base}; max |diff| {diff_p:.2e}; top-{TOP} identical: {same_p}",
                            top_knowmri=top(k), top_baseline=top(other.result)))
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="IG steps on the tiny models")
    p.add_argument("--smollm2-steps", type=int, default=4, help="IG steps on SmolLM2 (the loop takes minutes at 20)")
    args = p.parse_args()
    setup(args)
    from knowmri.testing import build_tiny

    rows: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: per-call overhead dominates and threads only add contention
    for family in ("gpt2", "bert"):
        model = build_tiny(family)
        model.hf_model.to(args.device)
        rows += bench(f"tiny {family} (1 thread)", model, " Paris", args.steps, args.repeats, args, peer=True)
    torch.set_num_threads(threads)
    if not args.skip_smollm2:
        model = load_smollm2(args)
        repeats = 1 if args.quick else max(1, min(args.repeats, 2))
        rows += bench("SmolLM2-135M", model, " Paris", args.smollm2_steps, repeats, args, peer=True, warmup=0)
    print_rows(rows)
    path = write_result("knowledge_neurons", rows, model="tiny gpt2, tiny bert, smollm2-135m", args=args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

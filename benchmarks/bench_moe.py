"""Benchmark: knowledge neurons and causal tracing on a tiny-but-not-trivial mixture-of-experts model against
the dense model of the same active size.

The MoE model is Mixtral-style (8 layers, d_model 256, 8 experts of 512 neurons, 2 per token); the dense
model is LLaMA-style with the same attention and one MLP of 1024 neurons (what a token runs in the MoE
model). Both have seeded random weights and the project's tiny tokenizer. Knowledge neurons score every
expert's neurons (only the routed experts run, and only their neurons are scaled); causal tracing on the
MoE model also restores each expert's output alone at the subject's last token and the last token (the
"expert" kind), which the dense model has no counterpart of. Each method runs end to end (`run_method`),
without paraphrases or control facts, so the times are the attribution and the trace. Writes
benchmarks/results/moe.json.

    python benchmarks/bench_moe.py --threads 1 --repeats 1 [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from _harness import alternate, eiffel, parser, print_rows, row, setup, write_result  # noqa: E402

LAYERS, D_MODEL, HEADS, KV_HEADS, EXPERTS, TOP_K, D_EXPERT = 8, 256, 8, 4, 8, 2, 512


def build(moe: bool, dtype: torch.dtype, device: str) -> Any:
    """The MoE model (`moe`) or the dense model of the same active size, seeded."""
    import transformers as T

    import knowmri as km
    from knowmri.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer("causal", bos=True)
    common = {"vocab_size": len(tok), "hidden_size": D_MODEL, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": D_MODEL // HEADS, "max_position_embeddings": 128,
              "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
              "initializer_range": 0.05, "tie_word_embeddings": False}
    torch.manual_seed(0)
    if moe:
        hf = T.MixtralForCausalLM(T.MixtralConfig(**common, intermediate_size=D_EXPERT, num_local_experts=EXPERTS,
                                                  num_experts_per_tok=TOP_K))
    else:
        hf = T.LlamaForCausalLM(T.LlamaConfig(**common, intermediate_size=TOP_K * D_EXPERT))
    hf.config._attn_implementation = "eager"
    hf = hf.to(device=device, dtype=dtype).eval()
    hf.config._name_or_path = "bench-moe" if moe else "bench-dense"
    return km.load_model(hf, tokenizer=tok)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    setup(args)
    from knowmri.diagnosis import run_method
    from knowmri.methods.base import RunContext, get_method

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    moe, dense = build(True, dtype, args.device), build(False, dtype, args.device)
    sample = eiffel()
    steps, samples = (8, 4) if args.quick else (20, 10)
    params = {"knowledge_neurons": {"steps": steps, "paraphrases": 0, "controls": 0},
              "causal_tracing": {"samples": samples}}
    rows = []
    for name, kw in params.items():
        def call(model: Any, name: str = name, kw: dict = kw) -> Any:
            result = run_method(type(get_method(name))(), model, sample, kw, RunContext())
            if result.status != "ok":
                raise RuntimeError(result.error)
            return result

        timings = alternate({"moe": lambda: call(moe), "dense": lambda: call(dense)}, repeats=args.repeats,
                            device=args.device)
        found = timings["moe"].result
        what = ""
        if name == "knowledge_neurons" and found is not None:
            best = found.findings["top_neurons"][0]
            what = f"; best neuron L{best['layer']}.E{best['expert']}.U{best['unit']}"
        if name == "causal_tracing" and found is not None and found.findings.get("experts"):
            what = f"; {len(found.findings['experts']['grid'])} positions x {LAYERS} layers x {EXPERTS} experts restored"
        detail = (f"MoE: {LAYERS} layers, d_model {D_MODEL}, {EXPERTS} experts x {D_EXPERT} neurons, top-{TOP_K}; dense: "
                  f"MLP of {TOP_K * D_EXPERT}; {steps if name == 'knowledge_neurons' else samples} "
                  f"{'steps' if name == 'knowledge_neurons' else 'noise samples'}{what}")
        rows.append(row(name, "dense model of the same active size", timings["moe"], timings["dense"], None, detail,
                        kind="moe"))
    print_rows(rows)
    path = write_result("moe", rows, model="random Mixtral-style vs LLaMA-style", args=args)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

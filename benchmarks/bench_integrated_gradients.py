"""Benchmark: knowmri's integrated gradients vs Captum's `LayerIntegratedGradients` on the
embedding layer, same baseline (the pad token's embedding), steps, quadrature (Gauss-Legendre)
and internal batch size, P(answer token) as the target.

Captum runs once per answer token (its forward returns one target's probability); knowmri
batches all answer tokens' interpolation steps together and computes logits only at the
answer positions. The two are alternated in one process; medians, the ratio, and whether the
attributions are allclose are reported. Writes benchmarks/results/integrated_gradients.json.

    python benchmarks/bench_integrated_gradients.py [--repeats 3] [--skip-smollm2] [--device cuda]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from _harness import allclose, alternate, parser, print_rows, row, setup, tolerance, write_result  # noqa: E402

from knowmri.methods.ig_engine import input_embedding_module, integrated_gradients  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"


def captum_lig(model: Any, enc: Any, steps: int, batch: int) -> torch.Tensor:
    """[n_answer, T]: Captum LayerIntegratedGradients, one call per answer token."""
    from captum.attr import LayerIntegratedGradients

    embed = input_embedding_module(model)
    base = torch.full_like(enc.input_ids, model.tokenizer.pad_token_id)
    rows = []
    for pos, tid in zip(enc.target_positions, enc.target_ids):
        def forward(ids: torch.Tensor, pos: int = pos, tid: int = tid) -> torch.Tensor:
            mask = enc.attention_mask.repeat(ids.shape[0], 1)
            return model.hf_model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, pos].float().softmax(-1)[:, tid]

        att = LayerIntegratedGradients(forward, embed).attribute(enc.input_ids, baselines=base, n_steps=steps,
                                                                 method="gausslegendre", internal_batch_size=batch)
        rows.append(att.sum(-1)[0].detach().float().cpu())
    return torch.stack(rows)


def bench(label: str, model: Any, answer: str, steps: int, batch: int, repeats: int, args: Any) -> dict[str, Any]:
    enc = model.encode(PROMPT, answer)

    def ours() -> torch.Tensor:
        return integrated_gradients(model, enc, steps=steps, baseline="pad", internal_batch_size=batch)["attributions"]

    def theirs() -> torch.Tensor:
        return captum_lig(model, enc, steps, batch)

    t = alternate({"knowmri": ours, "captum": theirs}, repeats=repeats, device=args.device)
    equal, diff = allclose(t["knowmri"].result, t["captum"].result, **tolerance(args))
    detail = (f"{label}; {enc.input_ids.shape[1]} tokens, {len(enc.target_ids)} answer token(s), {steps} steps, "
              f"batch {batch}; max |diff| {diff:.1e}")
    return row("integrated_gradients", "captum LayerIntegratedGradients", t["knowmri"], t["captum"], equal, detail,
               model=label, answer=answer, max_abs_diff=diff)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    setup(args)
    from knowmri.testing import tiny_model

    tiny = tiny_model("llama")
    tiny.hf_model.to(args.device)
    rows = [bench("tiny-llama", tiny, " Paris", args.steps, args.steps, args.repeats, args),
            bench("tiny-llama", tiny, " Paris France", args.steps, args.steps, args.repeats, args)]
    if not args.skip_smollm2:
        import knowmri as km

        smol = km.load_model("smollm2-135m", device=args.device, dtype=args.dtype)
        rows += [bench("smollm2-135m", smol, " Paris", args.steps, args.steps, args.repeats, args),
                 bench("smollm2-135m", smol, " Paris, France", args.steps, 2 * args.steps, args.repeats, args)]
    print_rows(rows)
    path = write_result("integrated_gradients", rows, model="smollm2-135m, tiny-llama", args=args)
    print(f"\nwrote {path}")
    if not all(r["equal"] for r in rows):
        raise SystemExit("knowmri's attributions differ from Captum's")


if __name__ == "__main__":
    main()

"""Benchmark: knowmri's batched Patchscopes decoding (Ghandeharioun et al. 2024) against

- the straightforward per-layer loop (`knowmri.methods.patchscope_engine.decode_per_layer`: for each source
  layer, re-run the patched target prompt at every greedy step, no cache), and
- a per-layer loop that already uses a KV cache and the shared target prefix (the batched code run
  one layer at a time), which isolates what batching the layers adds.

knowmri runs the target prefix once, shares its KV cache across one row per layer, patches every
layer's row in one pass and decodes all rows together. All commands decode the same greedy tokens
from the same source states; equality of the tokens and the step probabilities is checked.
Writes benchmarks/results/patchscopes.json.

    python benchmarks/bench_patchscopes.py [--repeats 3] [--quick] [--skip-smollm2] [--threads 1] [--device cuda]

On a CPU shared with other jobs, --threads 1 avoids thread oversubscription (two threads were several
times slower than one under load here); the JSON records the settings used.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from _harness import (  # noqa: E402
    EIFFEL,
    allclose,
    alternate,
    load_smollm2,
    parser,
    print_rows,
    row,
    setup,
    tolerance,
    write_result,
)

from knowmri.hooks import Hooks, site  # noqa: E402
from knowmri.methods.patchscope_engine import decode_batched, decode_per_layer, target_ids  # noqa: E402
from knowmri.methods.patchscopes import IDENTITY_PROMPT  # noqa: E402


def source_states(model: Any, prompt: str, subject: str) -> torch.Tensor:
    """Every layer's residual stream at the subject's last token: [n_layers, d_model]."""
    enc = model.encode(prompt)
    position = model.token_span(prompt, subject).stop - 1
    with torch.no_grad(), Hooks(model) as h:
        caps = [h.read(site(layer, "resid_post"), positions=[position]) for layer in range(model.n_layers)]
        model.forward(**enc.inputs())
    return torch.stack([c.value[0, 0] for c in caps])


def cached_loop(
    model: Any, states: torch.Tensor, ids: list[int], position: int, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer at a time, each with the KV cache and shared prefix (no batching across layers)."""
    outs = [
        decode_batched(model, states[layer : layer + 1], ids, position, layer, steps)
        for layer in range(states.shape[0])
    ]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def picked(result: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tokens, probs = result
    return probs.gather(-1, tokens[..., None]).squeeze(-1)


def bench(label: str, model: Any, steps: int, repeats: int, args: Any, warmup: int = 1) -> list[dict[str, Any]]:
    states = source_states(model, EIFFEL["prompt"], EIFFEL["triple_subject"])
    ids, _ = target_ids(model, IDENTITY_PROMPT)
    position = len(ids) - 1
    commands = {
        "knowmri": lambda: decode_batched(model, states, ids, position, None, steps),
        "loop": lambda: decode_per_layer(model, states, ids, position, None, steps),
        "cached_loop": lambda: cached_loop(model, states, ids, position, steps),
    }
    t = alternate(commands, repeats=repeats, warmup=warmup, device=args.device)
    ours = t["knowmri"].result
    base = f"{label}: {model.n_layers} layers, target prompt {len(ids)} tokens, {steps} greedy tokens per layer"
    rows = []
    for name, title in (
        ("loop", "per-layer loop, no cache (the paper's procedure)"),
        ("cached_loop", "per-layer loop with KV cache and shared prefix"),
    ):
        other = t[name].result
        same_tokens = bool(torch.equal(ours[0].cpu(), other[0].cpu()))
        close, diff = allclose(picked(ours), picked(other), **tolerance(args))
        rows.append(
            row(
                "patchscopes",
                title,
                t["knowmri"],
                t[name],
                same_tokens and close,
                f"{base}; decoded tokens identical: {same_tokens}; max |diff| of step probabilities {diff:.2e}",
                decoded=[model.tokenizer.decode(r.tolist()) for r in ours[0]],
            )
        )
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="greedy tokens decoded per layer on the tiny model")
    p.add_argument("--smollm2-steps", type=int, default=3, help="greedy tokens per layer on SmolLM2 (the loop is slow)")
    args = p.parse_args()
    if args.quick:  # reduced settings: fewer greedy tokens and rounds
        args.steps, args.smollm2_steps, args.repeats = 4, 2, min(args.repeats, 2)
    setup(args)
    from knowmri.testing import build_tiny

    rows: list[dict[str, Any]] = []
    for family in ("gpt2", "llama"):
        model = build_tiny(family)
        model.hf_model.to(args.device)
        rows += bench(f"tiny {family}", model, args.steps, args.repeats, args)
        print_rows(rows[-2:])
    if not args.skip_smollm2:
        # the tiny runs warmed the code paths up; the slow loop is not run untimed on SmolLM2
        rows += bench(
            "SmolLM2-135M", load_smollm2(args), args.smollm2_steps, max(1, min(args.repeats, 2)), args, warmup=0
        )
    print_rows(rows)
    path = write_result("patchscopes", rows, model="tiny gpt2, tiny llama, smollm2-135m", args=args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""The Patchscopes decoding engine (Ghandeharioun et al. 2024): a source state written into a target prompt,
then greedy decoding, every layer's state as one row of a batch.

The target tokens before the patched position cannot see the patch (causal attention), so they run once and
their KV cache is shared by all rows; the patched pass fills the cache and decoding goes on from it, all rows
at once (`decode_batched`). `decode_per_layer` is the straightforward loop (re-run the patched prompt at every
step, one layer at a time), kept as the reference for tests and benchmarks.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from knowmri.hooks import Hooks, site


def target_ids(model: Any, text: str) -> tuple[list[int], str]:
    """The target prompt's token ids and the text used; words the tokenizer cannot represent are dropped."""
    tok = model.tokenizer
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    unk = tok.unk_token_id
    if unk is None or unk not in ids:
        return ids, text
    pieces = re.findall(r"\w+|[^\w\s]+", text)
    known = [p for p in pieces if unk not in tok(p, add_special_tokens=False)["input_ids"]]
    if not known:
        return ids, text
    cleaned = " ".join(known)
    return list(tok(cleaned, add_special_tokens=True)["input_ids"]), cleaned


def patch_rows(h: Hooks, states: torch.Tensor, position: int, target_layer: int | None) -> None:
    """Row l of the batch gets states[l] at `position`: at layer l (target_layer None) or at target_layer."""
    if target_layer is None:
        for layer in range(states.shape[0]):
            h.replace(site(layer, "resid_post"), states[layer], rows=[layer], positions=[position])
    else:
        h.replace(site(target_layer, "resid_post"), states[:, None, :], positions=[position])


def forward_cached(model: Any, past: Any = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Last-position logits and the KV cache of an HF forward that continues `past`.

    Logits are computed only at the last position where the model allows it (`Model.run`'s `keep`).
    """
    out = model.run(**kwargs, keep=1, cache=past, use_cache=True)
    return out.logits[:, -1].float(), model.output_cache(out)


@torch.inference_mode()
def decode_batched(
    model: Any, states: torch.Tensor, ids: list[int], position: int, target_layer: int | None, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [rows, steps] and next-token distributions [rows, steps, vocab], all rows at once.

    The target tokens before `position` do not see the patch (causal attention), so they run once and
    their KV cache is shared by every row; only the tokens from `position` on run per row.
    """
    rows = states.shape[0]
    device = model.device
    past = None
    if position > 0:
        prefix = torch.tensor([ids[:position]], device=device)
        _, past = forward_cached(model, input_ids=prefix, attention_mask=torch.ones_like(prefix))
        past.batch_repeat_interleave(rows)
    mask = torch.ones(rows, len(ids), dtype=torch.long, device=device)
    with Hooks(model) as h:
        patch_rows(h, states, 0, target_layer)
        rest = torch.tensor([ids[position:]], device=device).repeat(rows, 1)
        logits, past = forward_cached(model, past, input_ids=rest, attention_mask=mask)
    tokens, probs = [], []
    for step in range(steps):
        p = logits.softmax(-1)
        nxt = p.argmax(-1)
        tokens.append(nxt)
        probs.append(p)
        if step + 1 == steps:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits, past = forward_cached(model, past, input_ids=nxt[:, None], attention_mask=mask)
    return torch.stack(tokens, 1), torch.stack(probs, 1)


@torch.inference_mode()
def decode_per_layer(
    model: Any, states: torch.Tensor, ids: list[int], position: int, target_layer: int | None, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward loop (reference): for each layer, re-run the patched target at every step, no cache."""
    all_tokens, all_probs = [], []
    for layer in range(states.shape[0]):
        seq = list(ids)
        tokens, probs = [], []
        for _ in range(steps):
            with Hooks(model) as h:
                tl = layer if target_layer is None else target_layer
                h.replace(site(tl, "resid_post"), states[layer], positions=[position])
                logits = model.forward(
                    input_ids=torch.tensor([seq], device=model.device),
                    attention_mask=torch.ones(1, len(seq), dtype=torch.long, device=model.device),
                )
            p = logits[0, -1].float().softmax(-1)
            tokens.append(p.argmax())
            probs.append(p)
            seq.append(int(p.argmax()))
        all_tokens.append(torch.stack(tokens))
        all_probs.append(torch.stack(probs))
    return torch.stack(all_tokens), torch.stack(all_probs)

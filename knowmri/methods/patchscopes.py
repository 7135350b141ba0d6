"""Patchscopes (Ghandeharioun et al. 2024): decode what a hidden representation encodes by patching it
into a separate target prompt and letting the model continue.

The source prompt runs once and every layer's residual stream at the source position is kept. The target
prompt (default the paper's identity prompt "cat -> cat; 1135 -> 1135; hello -> hello; ?") then runs once as a
batch of n_layers rows: row l has the source's layer-l state written over the target position's layer-l
output (or over a fixed target layer). The target tokens before the patched position cannot see the patch,
so they run once and their KV cache is shared by all rows; the patched pass fills the cache and greedy
decoding goes on from it, all rows at once. Since the patch touches only a prompt position, this equals
re-running the patched prompt at every step (`decode_per_layer`, the straightforward loop, kept as the
reference for tests and benchmarks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.hooks import Hooks, site
from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import prepare
from knowmri.models.attention import uses_short_attention
from knowmri.report import figures
from knowmri.sample import Sample

IDENTITY_PROMPT = "cat -> cat; 1135 -> 1135; hello -> hello; ?"


@dataclass
class PatchscopesParams(Params):
    target_prompt: str = field(
        default=IDENTITY_PROMPT,
        metadata={"help": "prompt the representation is patched into (default: the paper's identity prompt)"},
    )
    source_position: int = field(
        default=-1,
        metadata={
            "help": "source token: -1 = the subject's last token when the subject is known, else the prompt's last; "
            "otherwise a prompt index (negative counts from the end)"
        },
    )
    target_position: int = field(
        default=-1, metadata={"help": "target prompt position overwritten (-1: its last token)"}
    )
    target_layer: str = field(
        default="same", metadata={"help": "layer patched in the target: 'same' as the source layer, or a number"}
    )
    max_new_tokens: int = field(default=8, metadata={"help": "greedy tokens decoded from each patched target"})

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= 64:
            raise ValueError("max_new_tokens must be between 1 and 64")
        if not self.target_prompt.strip():
            raise ValueError("target_prompt is empty")
        if self.target_layer != "same" and not str(self.target_layer).lstrip("-").isdigit():
            raise ValueError("target_layer must be 'same' or a layer number")


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


def _position(index: int, length: int, what: str) -> int:
    if not -length <= index < length:
        raise ValueError(f"{what} {index} is out of range for {length} tokens")
    return index % length


def _patch(h: Hooks, states: torch.Tensor, position: int, target_layer: int | None) -> None:
    """Row l of the batch gets states[l] at `position`: at layer l (target_layer None) or at target_layer."""
    if target_layer is None:
        for layer in range(states.shape[0]):
            h.replace(site(layer, "resid_post"), states[layer], rows=[layer], positions=[position])
    else:
        h.replace(site(target_layer, "resid_post"), states[:, None, :], positions=[position])


def _forward(model: Any, past: Any = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
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
        _, past = _forward(model, input_ids=prefix, attention_mask=torch.ones_like(prefix))
        past.batch_repeat_interleave(rows)
    mask = torch.ones(rows, len(ids), dtype=torch.long, device=device)
    with Hooks(model) as h:
        _patch(h, states, 0, target_layer)
        rest = torch.tensor([ids[position:]], device=device).repeat(rows, 1)
        logits, past = _forward(model, past, input_ids=rest, attention_mask=mask)
    tokens, probs = [], []
    for step in range(steps):
        p = logits.softmax(-1)
        nxt = p.argmax(-1)
        tokens.append(nxt)
        probs.append(p)
        if step + 1 == steps:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits, past = _forward(model, past, input_ids=nxt[:, None], attention_mask=mask)
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


def expected_tokens(model: Any, text: str) -> list[int]:
    """The first token of each word of `text`, with and without a leading space (what decoding may produce)."""
    words = re.findall(r"\w+", text) or [text.strip()]
    tok = model.tokenizer
    ids = {
        tok(form, add_special_tokens=False)["input_ids"][:1][0]
        for w in words
        for form in (w, " " + w)
        if tok(form, add_special_tokens=False)["input_ids"]
    }
    return sorted(ids - set(tok.all_special_ids)) or sorted(ids)


def mentions(text: str, reference: str) -> bool:
    """Whether decoded `text` names `reference`: one of its words (3+ characters, or the whole of it) appears."""
    words = [w for w in re.findall(r"\w+", reference.lower()) if len(w) >= 3] or [reference.strip().lower()]
    low = text.lower()
    return any(w and re.search(rf"(?<!\w){re.escape(w)}", low) for w in words)


@register_method
class Patchscopes(Method):
    name = "patchscopes"
    title = "Patchscopes"
    path = ("Internal", "Representation", "Hidden states")
    paper = "Ghandeharioun et al. 2024, 'Patchscopes: A Unifying Framework for Inspecting Hidden Representations'"
    description = "Patches each layer's hidden state of a token into an identity prompt and decodes what it says."
    requires_keys = ("prompt",)
    requires_capabilities = ("causal_lm",)
    Params = PatchscopesParams

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """The source prompt once (full logits), the target's prefix once, then a batch of n_layers rows:
        the patched pass over the target from the patched position, and max_new_tokens - 1 cached
        decoding steps; every step's float32 next-token distribution [n_layers, vocab] is kept (and
        stacked at the end: twice their size), with the rows' key/value cache."""
        from knowmri.methods.costs import Dims, Pass, prepare_passes, sample_shape, work_estimate

        p = params if isinstance(params, PatchscopesParams) else PatchscopesParams()
        shape = sample_shape(model, sample)
        dims = Dims.of(model)
        try:
            n = len(target_ids(model, p.target_prompt)[0])
        except Exception:  # the run reports a target prompt that does not tokenise
            n = max(1, len(p.target_prompt) // 4)
        position = p.target_position % n if -n <= p.target_position < n else n - 1
        rows, steps = dims.layers, p.max_new_tokens
        passes = [*prepare_passes(model, shape), Pass(tokens=shape.prompt, readout=shape.prompt),
                  Pass(tokens=position, readout=1, cache=True, count=1 if position else 0),
                  Pass(rows=rows, tokens=n - position, context=n, readout=rows, cache=True),
                  Pass(rows=rows, tokens=1, context=n + steps / 2, readout=rows, cache=True, count=steps - 1)]
        dists = 4 * rows * steps * dims.vocab
        cache = rows * (n + steps) * 2 * dims.kv * dims.bytes * dims.layers
        return work_estimate(model, passes, memory=dists, resident=2 * dists + cache)

    @uses_short_attention(torch.bfloat16)
    @torch.inference_mode()
    def run(self, model: Any, sample: Sample, params: PatchscopesParams, ctx: RunContext) -> MethodResult:
        prep = prepare(model, sample)
        enc, tok, n_layers = prep.enc, model.tokenizer, model.n_layers
        if params.source_position == -1:
            src = prep.subject.stop - 1 if prep.subject is not None else enc.prompt_len - 1
        else:
            src = _position(params.source_position, enc.prompt_len, "source_position")
        target_layer = None if params.target_layer == "same" else int(params.target_layer)
        if target_layer is not None and not 0 <= target_layer < n_layers:
            raise ValueError(f"target_layer {target_layer} is out of range (the model has {n_layers} layers)")
        ids, used_prompt = target_ids(model, params.target_prompt)
        tgt = _position(params.target_position, len(ids), "target_position")

        with Hooks(model) as h:
            caps = [h.read(site(layer, "resid_post"), positions=[src]) for layer in range(n_layers)]
            model.forward(
                input_ids=enc.input_ids[:, : enc.prompt_len], attention_mask=enc.attention_mask[:, : enc.prompt_len]
            )
        states = torch.stack([c.value[0, 0].to(model.device) for c in caps])  # [L, d_model]
        ctx.progress(0.2, "decoding the patched target prompts")
        tokens, probs = decode_batched(model, states, ids, tgt, target_layer, params.max_new_tokens)

        subject = sample.get("triple_subject")
        expected = subject or prep.answer.strip()
        candidates = expected_tokens(model, expected)
        expected_prob = probs[:, :, candidates].amax(-1)  # [L, steps]
        scores = expected_prob.amax(-1).tolist()
        step_probs = probs.gather(-1, tokens[..., None]).squeeze(-1).tolist()
        decoded = [tok.decode(row.tolist(), skip_special_tokens=True) for row in tokens]
        decoded_tokens = [[tok.decode([int(t)]) for t in row] for row in tokens]
        recovered = [mentions(text, expected) for text in decoded]
        answer_recovered = [mentions(text, prep.answer) for text in decoded]
        hits = [layer for layer, ok in enumerate(recovered) if ok]

        result = self.new_result(params)
        source_token = prep.tokens[src]
        result.findings = {
            "decoded": decoded,
            "decoded_tokens": decoded_tokens,
            "step_probs": step_probs,
            "layer_scores": [{"layer": i, "score": s} for i, s in enumerate(scores)],
            "expected": expected,
            "expected_kind": "subject" if subject else prep.answer_source,
            "subject_recovered": recovered,
            "answer_recovered": answer_recovered,
            "recovered_layers": hits,
            "source_position": src,
            "source_token": source_token,
            "target_prompt": used_prompt,
            "target_position": tgt,
            "target_layer": params.target_layer,
            "answer": prep.answer,
        }
        what = f"the subject {subject!r}" if subject else f"the answer {prep.answer.strip()!r}"
        where = f"token {src} ({source_token!r})"
        if hits:
            span = f"layer {hits[0]}" if len(hits) == 1 else f"layers {hits[0]} to {hits[-1]}"
            gaps = "" if len(hits) == hits[-1] - hits[0] + 1 else f" ({len(hits)} of those layers)"
            best = max(range(n_layers), key=lambda i: scores[i])
            result.summary = (
                f"Patched into the target prompt, the hidden state of {where} decodes to text naming {what} "
                f"from {span}{gaps}; the identity is decodable there. One of its words is most likely in "
                f"layer {best} (p={scores[best]:.3f}). Layer 0 decodes to {decoded[0]!r}, the last layer to "
                f"{decoded[-1]!r}."
            )
        else:
            result.summary = (
                f"No layer's hidden state of {where} decodes to text naming {what} through the target "
                f"prompt {used_prompt!r}; layer 0 decodes to {decoded[0]!r} and the last layer to {decoded[-1]!r}."
            )
        if used_prompt != params.target_prompt:
            result.summary += (
                f" (Words the tokenizer does not know were dropped from the target prompt: {used_prompt!r}.)"
            )

        steps = list(range(1, params.max_new_tokens + 1))
        result.add_figure(
            "Decoded tokens by layer",
            figures.heatmap(
                step_probs,
                x=steps,
                y=list(range(n_layers)),
                text=decoded_tokens,
                colorbar="p",
                title=f"Patchscopes: greedy decoding of {where} patched into the target prompt",
                x_title="step",
                y_title="layer",
            ),
        )
        result.add_figure(
            "Expected token by layer",
            figures.lines(
                list(range(n_layers)),
                {f"max P({expected!r})": scores},
                title=f"Highest probability of a word of {expected!r} while decoding",
                x_title="layer",
                y_title="probability",
            ),
        )
        result.add_table(
            "Patchscopes decoding",
            ["layer", "decoded", f"names {expected!r}", "score"],
            [[i, decoded[i], recovered[i], round(scores[i], 5)] for i in range(n_layers)],
        )
        return result

"""Patchscopes (Ghandeharioun et al. 2024): decode what a hidden representation encodes by patching it
into a separate target prompt and letting the model continue.

The source prompt runs once and every layer's residual stream at the source position is kept. The target
prompt (default the paper's few-shot entity-description prompt, "Syria: Country in the Middle East ...
x", with each example's description starting with its name so that a resolved entity can be checked by
name) then runs once as a batch of n_layers rows: row l has the source's layer-l state written over the
placeholder's layer-l output (or over a fixed target layer). The target tokens before the patched position
cannot see the patch, so they run once and their KV cache is shared by all rows; the patched pass fills the
cache and greedy decoding goes on from it, all rows at once. Since the patch touches only a prompt
position, this equals re-running the patched prompt at every step (`patchscope_engine.decode_per_layer`,
the straightforward loop, kept as the reference for tests and benchmarks).

A decode counts as naming the subject only when its first line names a word of the subject that the source
token's own text does not contain (`names_entity`): the source state of " Islands" decoding to "Islands" is
an echo of the token (`is_echo`; both in `patchscope_text`), not evidence that "Marshall Islands" was resolved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.hooks import Hooks, site
from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import prepare
from knowmri.methods.patchscope_engine import decode_batched, target_ids
from knowmri.methods.patchscope_text import entity_words, expected_tokens, first_line, is_echo, mentions, names_entity
from knowmri.models.attention import uses_short_attention
from knowmri.report import figures
from knowmri.sample import Sample

IDENTITY_PROMPT = "cat -> cat; 1135 -> 1135; hello -> hello; ?"
ENTITY_PROMPT = (
    "Syria: Syria is a country in the Middle East\n"
    "Leonardo DiCaprio: Leonardo DiCaprio is an American actor\n"
    "Samsung: Samsung is a South Korean multinational corporation\n"
    "x"
)


@dataclass
class PatchscopesParams(Params):
    target_prompt: str = field(
        default=ENTITY_PROMPT,
        metadata={"help": "prompt the representation is patched into (default: the paper's few-shot entity "
                  "description prompt, patched at its last placeholder 'x')"},
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
    max_new_tokens: int = field(default=10, metadata={"help": "greedy tokens decoded from each patched target"})

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= 64:
            raise ValueError("max_new_tokens must be between 1 and 64")
        if not self.target_prompt.strip():
            raise ValueError("target_prompt is empty")
        if self.target_layer != "same" and not str(self.target_layer).lstrip("-").isdigit():
            raise ValueError("target_layer must be 'same' or a layer number")


def _position(index: int, length: int, what: str) -> int:
    if not -length <= index < length:
        raise ValueError(f"{what} {index} is out of range for {length} tokens")
    return index % length


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
        source_token = prep.tokens[src]
        step_probs = probs.gather(-1, tokens[..., None]).squeeze(-1).tolist()
        decoded = [tok.decode(row.tolist(), skip_special_tokens=True) for row in tokens]
        decoded_tokens = [[tok.decode([int(t)]) for t in row] for row in tokens]
        named_words = entity_words(expected, source_token, used_prompt)
        named = [names_entity(text, expected, source_token, used_prompt) for text in decoded]
        echoes = [is_echo(text, expected, source_token, used_prompt) for text in decoded]
        answer_recovered = [mentions(first_line(text), prep.answer) for text in decoded]
        spelled = [w for w in re.findall(r"\w+", expected) if w.lower() in named_words]
        candidates = expected_tokens(model, " ".join(spelled)) if spelled else []
        scores = probs[:, :, candidates].amax(-1).amax(-1).tolist() if candidates else [0.0] * n_layers
        hits = [layer for layer, ok in enumerate(named) if ok]
        echo_layers = [layer for layer, ok in enumerate(echoes) if ok]
        warnings = []
        if not named_words:
            warnings.append(f"every word of {expected!r} is in the source token {source_token!r} (or the target prompt): "
                            "a decode naming it cannot be told from an echo of the token, so none is counted")

        result = self.new_result(params)
        result.findings = {
            "decoded": decoded,
            "decoded_tokens": decoded_tokens,
            "step_probs": step_probs,
            "expected": expected,
            "expected_kind": "subject" if subject else prep.answer_source,
            "entity_words": named_words,
            "entity_word_prob": [{"layer": i, "score": s} for i, s in enumerate(scores)],
            "subject_recovered": named,
            "echo": echoes,
            "echo_layers": echo_layers,
            "answer_recovered": answer_recovered,
            "recovered_layers": hits,
            "decode_rate": [{"layer": i, "rate": float(ok)} for i, ok in enumerate(named)],
            "holds": bool(hits),
            "source_position": src,
            "source_token": source_token,
            "target_prompt": used_prompt,
            "target_position": tgt,
            "target_layer": params.target_layer,
            "answer": prep.answer,
        }
        if hits:  # the layers it decodes at; none when nothing was decoded, so no consensus layer
            result.findings["layer_scores"] = [{"layer": i, "score": float(ok)} for i, ok in enumerate(named)]
        if warnings:
            result.findings["warnings"] = warnings
        what = f"the subject {subject!r}" if subject else f"the answer {prep.answer.strip()!r}"
        where = f"token {src} ({source_token!r})"
        beyond = f"beyond the source token's own text (one of {', '.join(map(repr, named_words))})" if named_words else ""
        if hits:
            span = f"layer {hits[0]}" if len(hits) == 1 else f"layers {hits[0]} to {hits[-1]}"
            gaps = "" if len(hits) == hits[-1] - hits[0] + 1 else f" ({len(hits)} of those layers)"
            result.summary = (
                f"Patched into the target prompt, the hidden state of {where} decodes to a description naming "
                f"{what} {beyond} at {span}{gaps}; the identity is decodable there. Layer {hits[0]} decodes to "
                f"{first_line(decoded[hits[0]])!r}."
            )
        else:
            result.summary = (
                f"No layer's hidden state of {where} decodes to a description naming {what}"
                f"{' ' + beyond if beyond else ''} through the target prompt; nothing is decoded. Layer 0 decodes "
                f"to {first_line(decoded[0])!r} and the last layer to {first_line(decoded[-1])!r}."
            )
        if echo_layers:
            result.summary += (
                f" At {len(echo_layers)} layer{'s' if len(echo_layers) > 1 else ''} the decode only repeats the source "
                f"token's text {source_token.strip()!r} (an echo, not counted)."
            )
        for w in warnings:
            result.summary += f" Warning: {w}."
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
            "Entity word by layer",
            figures.lines(
                list(range(n_layers)),
                {"max P(entity word)": scores},
                title=f"Highest probability of a word of {expected!r} beyond the source token while decoding",
                x_title="layer",
                y_title="probability",
            ),
        )
        result.add_table(
            "Patchscopes decoding",
            ["layer", "decoded", f"names {expected!r}", "echo", "max P(entity word)"],
            [[i, decoded[i], named[i], echoes[i], round(scores[i], 5)] for i in range(n_layers)],
        )
        return result

"""Self-explanation: the model answers the prompt, is then shown the prompt and its own answer,
and asked which input words it relied on and why. The words it names are matched back to the
prompt's tokens, so its claimed reasons can be compared with gradient attribution."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.report import figures
from knowmri.sample import Sample

IG_CACHE_KEY = ("integrated_gradients", "token_scores")
_STOP_TEXT = """a an the of in on at to for from by with and or but is are was were be been being it its this that
these those as into than then there their they he she his her we you your i my me our not no do does did has have had
which what who whom whose where when why how so if about"""
STOPWORDS = frozenset(_STOP_TEXT.split())
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)
_QUOTED = re.compile(r"\"([^\"\n]{1,80})\"|“([^”\n]{1,80})”|‘([^’\n]{1,80})’|`([^`\n]{1,80})`|(?<!\w)'([^'\n]{1,80})'(?!\w)")
PLAIN_TEMPLATE = ('Text: "{prompt}"\nContinuation: "{answer}"\n'
                  "Question: Which words of the text were most important for choosing this continuation, and why?\n"
                  "Answer: ")
PRIMER = 'The words I relied on most were "'  # the reply is started for the model, so that it names words at once
CHAT_TEMPLATE = ('Here is a text: "{prompt}"\nYou continued it with: "{answer}".\n'
                 "Which words of the text did you rely on to give this answer, and why? Put each word you name in double quotes.")


@dataclass
class SelfExplanationParams(Params):
    max_new_tokens: int = field(default=60, metadata={"help": "tokens the model may generate for its explanation"})
    answer_tokens: int = field(default=8, metadata={"help": "tokens generated for the model's own answer to the prompt"})
    template: str = field(default="auto", metadata={"help": "'chat' (the tokenizer's chat template), 'plain', or 'auto'",
                                                    "choices": ["auto", "chat", "plain"]})

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= 1024:
            raise ValueError("max_new_tokens must be between 1 and 1024")
        if not 1 <= self.answer_tokens <= 64:
            raise ValueError("answer_tokens must be between 1 and 64")
        if self.template not in ("auto", "chat", "plain"):
            raise ValueError("template must be 'auto', 'chat' or 'plain'")


def prompt_words(prompt: str) -> list[tuple[str, int, int]]:
    """The prompt's words with their character ranges."""
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(prompt)]


def _same_word(a: str, b: str) -> bool:
    a, b = a.lower().replace("’", "'"), b.lower().replace("’", "'")
    if a == b:
        return True
    if min(len(a), len(b)) < 4:
        return False
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.85


def parse_named_words(explanation: str, prompt: str) -> list[dict[str, Any]]:
    """The prompt words an explanation names, in order: first those inside quotes, then other mentions.

    Matching is case-insensitive and fuzzy (inflections, small typos). A quote that repeats
    most of the prompt, or a verbatim restatement of it, names nothing in particular and is
    skipped; unquoted mentions of stop words are ignored. Each entry: word (as in the prompt), occurrences (indices into
    `prompt_words(prompt)`), quoted.
    """
    words = prompt_words(prompt)
    if not words:
        return []
    named: list[dict[str, Any]] = []
    seen: set[str] = set()

    def name(candidate: str, quoted: bool) -> None:
        hits = [i for i, (w, _, _) in enumerate(words) if _same_word(candidate, w)]
        if not hits:
            return
        key = words[hits[0]][0].lower()
        if key in seen:
            return
        seen.add(key)
        named.append({"word": words[hits[0]][0], "occurrences": hits, "quoted": quoted})

    mentioned_elsewhere = re.sub(re.escape(prompt.strip()), " ", explanation, flags=re.IGNORECASE)  # a restatement names nothing
    for match in _QUOTED.finditer(explanation):
        phrase = next(g for g in match.groups() if g is not None)
        inner = [m.group(0) for m in _WORD.finditer(phrase)]
        if len(inner) >= max(3, int(0.8 * len(words))):
            mentioned_elsewhere = mentioned_elsewhere.replace(match.group(0), " ")
            continue
        for word in inner:
            if word.lower() not in STOPWORDS or len(inner) == 1:
                name(word, True)
    for m in _WORD.finditer(mentioned_elsewhere):
        if m.group(0).lower() not in STOPWORDS:
            name(m.group(0), False)
    return named


def word_tokens(model: Any, prompt: str, ids: list[int]) -> list[list[int]]:
    """For each prompt word, the indices of the tokens (of `ids`, the encoded prompt) that overlap it."""
    words = prompt_words(prompt)
    spans: list[tuple[int, int]] | None = None
    try:
        enc = model.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
        if list(enc["input_ids"])[: len(ids)] == ids[: len(enc["input_ids"])]:
            spans = [tuple(o) for o in enc["offset_mapping"]][: len(ids)]
    except (NotImplementedError, ValueError, KeyError, TypeError):
        spans = None
    if spans is None:  # slow tokenizers: character ranges from decoding growing prefixes
        spans, prev = [], 0
        for i in range(len(ids)):
            length = len(model.tokenizer.decode(ids[: i + 1], skip_special_tokens=True))
            spans.append((prev, length))
            prev = length
    return [[t for t, (a, b) in enumerate(spans) if b > a and a < end and b > start] for _, start, end in words]


_SENTENCE_END = re.compile(r"\n|(?<=[.!?])\s")
_TEXT_MARK = "\nText:"  # a plain-template model that starts a new example: the explanation ends there


def first_sentence(raw: str) -> str:
    """The answer `run` keeps from a generated continuation: its first line or sentence."""
    return _SENTENCE_END.split(raw.strip(), maxsplit=1)[0].strip() or raw.strip()


def answer_complete(raw: str) -> bool:
    """Whether more tokens can no longer change `first_sentence(raw)`: the stripped text has a line or sentence
    break with at least 3 characters after it. (Decoding more tokens only appends text; the 3 characters cover the
    tokenizer clean-up that can drop a space before "'s", "'ve", "n't" and the like.)"""
    text = raw.strip()
    end = _SENTENCE_END.search(text)
    return end is not None and len(text) - end.end() >= 3


def explanation_text(reply: str) -> str:
    """The explanation `run` keeps from a generated reply (the primer put back in front)."""
    return (PRIMER + reply).split(_TEXT_MARK)[0].strip()


def explanation_complete(reply: str) -> bool:
    """Whether more tokens can no longer change `explanation_text(reply)`: the cut mark has been written."""
    return _TEXT_MARK in PRIMER + reply


class _TextDone:
    """A `generate` stopping criterion: stop once `done(decoded new tokens)` holds. Greedy decoding of the tokens
    before the stop is unchanged, so what is kept from the text is the same as without it, with fewer forwards."""

    def __init__(self, tok: Any, start: int, done: Any) -> None:
        self.tok, self.start, self.done = tok, start, done

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        text = self.tok.decode(input_ids[0, self.start:], skip_special_tokens=True)
        return torch.full((input_ids.shape[0],), bool(self.done(text)), dtype=torch.bool, device=input_ids.device)


def _generate(model: Any, text: str, max_new_tokens: int, *, chat: bool, primer: str = "", done: Any = None) -> str:
    """Greedy continuation of `text` (or of a chat turn holding it, the reply starting with `primer`); `done`, if
    given, is called with the text so far after each token and ends the generation early when it returns true."""
    tok = model.tokenizer
    if chat:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        ids = tok(rendered + primer, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    else:
        input_ids = model.encode(text if model.kind == "seq2seq" else text + primer).input_ids
    extra: dict[str, Any] = {}
    if model.kind == "seq2seq":  # the primer starts the decoder's output
        start = [model.config.decoder_start_token_id] + (tok(primer, add_special_tokens=False)["input_ids"] if primer else [])
        extra["decoder_input_ids"] = torch.tensor([start], dtype=torch.long, device=model.device)
    skip = extra["decoder_input_ids"].shape[1] if extra else input_ids.shape[1]
    limit = model.max_length if model.kind == "causal" else None
    if limit is not None:  # a learned position table ends at the context: generate only what fits
        if input_ids.shape[1] >= limit:
            raise ValueError(f"the explanation request takes {input_ids.shape[1]} tokens, which fills the model's "
                             f"context of {limit}; use a shorter prompt")
        max_new_tokens = min(max_new_tokens, limit - input_ids.shape[1])
    if done is not None:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList([_TextDone(tok, skip, done)])
    out = model.hf_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                                  pad_token_id=tok.pad_token_id, **extra)
    return tok.decode(out[0, skip:], skip_special_tokens=True)


@register_method
class SelfExplanation(Method):
    name = "self_explanation"
    title = "Self-explanation"
    path = ("External", "Self-explanation")
    paper = "the model explains its own answer (generation)"
    description = "Asks the model which words of the prompt it relied on for its answer, and maps them to tokens."
    requires_keys = ("prompt",)
    requires_capabilities = ("generate",)
    Params = SelfExplanationParams

    def check(self, model: Any, sample: Sample) -> list[str]:
        return [] if prompt_words(sample.get("prompt") or "") else ["the prompt has no words to name"]

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """Two greedy generations of one row, each a prefill and one cached step per further token: the
        answer (`answer_tokens` after the prompt) and the explanation (`max_new_tokens` after the request,
        which holds the prompt and the answer); generation may stop earlier, at an end-of-text token."""
        from knowmri.methods.costs import Pass, elementwise_seconds, sample_shape, work_estimate

        p = params if isinstance(params, SelfExplanationParams) else SelfExplanationParams()
        shape = sample_shape(model, sample)
        prompt = sample.get("prompt") or ""
        chat = "chat" in model.capabilities if p.template == "auto" else p.template == "chat"
        try:
            request = (CHAT_TEMPLATE if chat else PLAIN_TEMPLATE).format(prompt=prompt, answer="")
            if chat:
                request = model.tokenizer.apply_chat_template([{"role": "user", "content": request}],
                                                              add_generation_prompt=True, tokenize=False)
            asked = len(model.tokenizer(request + PRIMER, add_special_tokens=not chat)["input_ids"]) + p.answer_tokens
        except Exception:  # no chat template after all: the run says so
            asked = shape.prompt + 60 + p.answer_tokens
        passes = []
        for length, new in ((shape.prompt, p.answer_tokens), (asked, p.max_new_tokens)):
            passes += [Pass(tokens=length, readout=1, cache=True),
                       Pass(tokens=1, context=length + new / 2, readout=1, cache=True, count=new - 1)]
        step_ops = 250  # `generate`'s own work per token (logits processors, stopping checks), in small ops
        steps = elementwise_seconds(model, 0, ops=step_ops * (p.answer_tokens + p.max_new_tokens))
        return work_estimate(model, passes, seconds=steps)

    @torch.inference_mode()
    def run(self, model: Any, sample: Sample, params: SelfExplanationParams, ctx: RunContext) -> MethodResult:
        prompt = sample["prompt"]
        has_chat = "chat" in model.capabilities
        if params.template == "chat" and not has_chat:
            raise ValueError(f"{model.name} has no chat template; use template='plain' or 'auto'")
        chat = has_chat if params.template == "auto" else params.template == "chat"
        ctx.progress(0.05, "generating the model's answer")
        answer = first_sentence(_generate(model, prompt, params.answer_tokens, chat=False, done=answer_complete))
        ctx.progress(0.3, "asking the model to explain")
        request = (CHAT_TEMPLATE if chat else PLAIN_TEMPLATE).format(prompt=prompt, answer=answer)
        reply = _generate(model, request, params.max_new_tokens, chat=chat, primer=PRIMER, done=explanation_complete)
        explanation = explanation_text(reply)
        named = parse_named_words(explanation, prompt)
        ids = model.encode(prompt).input_ids[0].tolist()
        tokens = model.to_str_tokens(ids)
        per_word = word_tokens(model, prompt, ids)
        scores = [0.0] * len(ids)
        for rank, entry in enumerate(named):
            entry["tokens"] = sorted({t for w in entry["occurrences"] for t in per_word[w]})
            entry["score"] = 1.0 - 0.5 * rank / max(1, len(named))
            for t in entry["tokens"]:
                scores[t] = max(scores[t], entry["score"])
        token_scores = [{"index": i, "token": tokens[i], "score": scores[i]} for i in range(len(ids))]
        result = self.new_result(params)
        result.findings = {
            "explanation": explanation, "answer": answer, "ground_truth": sample.get("ground_truth"),
            "answer_matches_ground_truth": _matches(answer, sample.get("ground_truth")),
            "named_words": [{k: e[k] for k in ("word", "tokens", "quoted", "score")} for e in named],
            "token_scores": token_scores, "template": "chat" if chat else "plain", "request": request,
        }
        ig = ctx.cache.get(IG_CACHE_KEY)
        self._report(result, ig if isinstance(ig, list) else None)
        ctx.progress(1.0, "done")
        return result

    def _report(self, result: MethodResult, ig: list[dict] | None) -> None:
        f = result.findings
        named = [e["word"] for e in f["named_words"]]
        truth = f["ground_truth"]
        text = f"Asked to continue the prompt, the model answers {f['answer']!r}"
        if truth:
            text += f" ({'matching' if f['answer_matches_ground_truth'] else 'unlike'} the expected {truth!r})"
        text += (f". Asked which words it relied on ({f['template']} prompt), it names "
                 f"{', '.join(map(repr, named)) if named else 'no word of the prompt'}.")
        token_scores = f["token_scores"]
        labels = [f"{t['index']}:{t['token']}" for t in token_scores]
        rows = [[t["index"], t["token"], t["score"]] for t in token_scores]
        columns = ["index", "token", "self-explanation score"]
        if ig is not None and len(ig) >= len(token_scores):
            ranked = sorted((t for t in ig if not t.get("special")), key=lambda t: -t["score"])
            rank = {t["index"]: r + 1 for r, t in enumerate(ranked)}
            chosen = {t["index"] for t in token_scores if t["score"] > 0}
            top_ig = [t["index"] for t in ranked[: max(1, len(chosen))]]
            overlap = len(chosen & set(top_ig)) / max(1, len(chosen)) if chosen else 0.0
            f["ig_comparison"] = {"ig_top_tokens": top_ig, "overlap": overlap,
                                  "ig_scores": [float(ig[t["index"]]["score"]) for t in token_scores]}
            columns += ["integrated gradients", "IG rank"]
            rows = [r + [round(float(ig[r[0]]["score"]), 6), rank.get(r[0])] for r in rows]
            text += (f" Integrated gradients' top tokens ({', '.join(repr(ig[i]['token']) for i in top_ig)}) "
                     f"overlap {overlap:.0%} with the tokens the model named.")
        result.summary = text
        result.add_table("Tokens named by the model", columns, rows)
        result.add_table("Explanation", ["request", "explanation"], [[f["request"], f["explanation"]]])
        if "ig_comparison" in f:
            ig_scores = f["ig_comparison"]["ig_scores"]
            peak = max(max(abs(v) for v in ig_scores), 1e-12)
            fig = figures.figure(
                [{"name": "named by the model", "x": list(labels), "y": [t["score"] for t in token_scores], "type": "bar"},
                 {"name": "integrated gradients (scaled)", "x": list(labels), "y": [v / peak for v in ig_scores], "type": "bar"}],
                title="Self-explanation vs integrated gradients", x_title="input token", y_title="score", barmode="group")
            result.add_figure("Named tokens vs attribution", fig)
        else:
            result.add_figure("Named tokens", figures.bars(labels, [t["score"] for t in token_scores],
                                                           title="Prompt tokens the model says it relied on",
                                                           x_title="input token", y_title="score"))


def _matches(answer: str, truth: str | None) -> bool | None:
    if not truth:
        return None
    a, t = answer.strip().lower(), truth.strip().lower()
    return bool(a) and (a.startswith(t) or t.startswith(a))

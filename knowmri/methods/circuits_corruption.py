"""The corrupted input of knowledge circuits: a counterfactual subject whose answer is a real
alternative object, or Gaussian noise on the subject's token embeddings.

Edge attribution patching (Syed et al. 2023; Hanna et al. 2024) measures a circuit by the change
of a metric between a clean and a corrupted run; with the logit difference, the corrupted run's
answer is the other side of the metric. A random famous entity often makes the model answer a
function word (" the"), and a circuit found for " Paris" vs " the" is a circuit for "name a city
now", not for the fact. So, as in the counterfactual contrasts of CounterFact (Meng et al. 2022,
"Locating and Editing Factual Associations in GPT"), the corrupting subject is one of the same
relation whose answer is another real object:

1. the contrast answer is the sample's `target_new` where it has one (CounterFact);
2. candidate subjects are, first, those of the same relation (`counterfactual_subjects`, with
   their objects as contrast answers), then well-known subjects of several kinds (`SUBJECTS`,
   whose contrast is the model's own answer on the corrupted prompt); only those with as many
   tokens as the sample's subject can be swapped in (patching aligns positions);
3. all candidates are scored in one batch and ranked: a same-relation subject that the model
   answers with its object, then a subject the model answers with a real word, then a same-relation
   subject the model answers with another real word, then the rest; within a rank, the largest
   contrast (lowest clean-answer-minus-contrast logit difference on the corrupted prompt).

The alternative, `noise`, adds Gaussian noise (a multiple of the embedding std) to the subject's
token embeddings, as ROME's causal tracing does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from knowmri.hooks import Hooks
from knowmri.methods.circuits_engine import forward_logits
from knowmri.methods.weight_cache import embedding_std

#: Well-known subjects of several kinds, to swap for the sample's subject (same token length).
SUBJECTS: tuple[str, ...] = (
    "Brandenburg Gate", "Colosseum", "Big Ben", "Statue of Liberty", "Great Wall", "Taj Mahal", "Golden Gate Bridge",
    "Sydney Opera House", "Leaning Tower of Pisa", "Kremlin", "Acropolis", "Sagrada Familia", "Empire State Building",
    "Barack Obama", "Albert Einstein", "William Shakespeare", "Isaac Newton", "Marie Curie", "Lionel Messi",
    "Michael Jordan", "Serena Williams", "Mozart", "Picasso", "Napoleon", "Cleopatra", "Leonardo da Vinci",
    "Charles Darwin", "Frida Kahlo", "Nelson Mandela", "Queen Elizabeth", "Apple", "Microsoft", "Google", "Amazon",
    "Toyota", "Nokia", "Samsung", "Volkswagen", "Nintendo", "iPhone", "Windows", "Android", "Python", "Paris",
    "Berlin", "Rome", "London", "Tokyo", "Madrid", "Moscow", "Beijing", "Cairo", "Athens", "Lisbon", "Vienna",
    "France", "Germany", "Italy", "Japan", "Spain", "Russia", "China", "Canada", "Australia", "Egypt", "Greece",
    "the Nile", "the Amazon River", "Mount Everest", "the Sahara", "Lake Victoria", "the Danube",
)

#: Words that are no answer to a factual question (articles, prepositions, auxiliaries, pronouns).
_FUNCTION_TEXT = """a an the of in on at to for from by with and or but nor is are was were be been being
it its this that these those as into than then there their they he she his her him we you your i my me our not no
do does did has have had which what who whom whose where when why how so if about also one"""
FUNCTION_WORDS = frozenset(_FUNCTION_TEXT.split())

#: How well a counterfactual subject serves, best first (see the module doc).
_RANKS = ("the model answers the alternative object", "the model answers a real word (the contrast)",
          "the model answers a real word, not the alternative object", "the model answers no real alternative object")


def is_function_word(text: str) -> bool:
    """Whether a token's text is a function word, punctuation or whitespace (no answer to a factual prompt)."""
    word = text.strip().lower()
    return not any(ch.isalnum() for ch in word) or word in FUNCTION_WORDS


@dataclass
class Corruption:
    """The corrupted input and the contrast answer (the other side of the logit difference)."""

    kind: str  # "counterfactual" or "noise"
    ids: torch.Tensor  # [1, T]: the corrupted prompt (the clean one for noise)
    wrong: int  # the contrast answer's first token
    top: int  # the model's top token on the corrupted input
    subject: str | None = None
    prompt: str | None = None
    source: str = ""  # where the subject or the contrast came from
    rank: str = ""
    scored: int = 0
    noise: torch.Tensor | None = None
    scale: float = 0.0
    note: str = ""

    def describe(self, tokenizer: Any) -> dict[str, Any]:
        """The JSON-ready record for findings."""
        out: dict[str, Any] = {"kind": self.kind, "contrast_answer": tokenizer.decode([self.wrong]),
                               "model_answer": tokenizer.decode([self.top]), "source": self.source}
        if self.kind == "counterfactual":
            out.update(subject=self.subject, prompt=self.prompt, rank=self.rank, candidates_scored=self.scored)
        else:
            out["scale"] = self.scale
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class Candidate:
    subject: str
    answer: str | None  # the subject's known object, if any
    source: str


def first_token(model: Any, prompt: str, answer: str) -> int:
    """The first token of `answer` as the continuation of `prompt`."""
    return int(model.encode(prompt, answer).target_ids[0])


def _real(token: int, answer: int, tokenizer: Any) -> bool:
    return token != answer and not is_function_word(tokenizer.decode([token]))


def _best_real(logits: torch.Tensor, answer: int, tokenizer: Any, k: int = 20) -> int:
    """The most likely token that is neither the answer nor a function word (among the top k), else the top non-answer."""
    top = logits.topk(k).indices.tolist()
    return next((t for t in top if _real(t, answer, tokenizer)), next(t for t in top if t != answer))


@torch.no_grad()
def counterfactual(model: Any, prompt: str, subject: str, clean_ids: list[int], answer: int,
                   candidates: list[Candidate], contrast: int | None = None, limit: int = 12) -> Corruption | None:
    """The best counterfactual subject of `candidates` (ranked as in the module doc), or None when
    none has as many tokens as `subject`. `contrast`: a fixed contrast answer (`target_new`)."""
    start = prompt.rindex(subject)
    unk, tok = model.tokenizer.unk_token_id, model.tokenizer
    options: list[tuple[Candidate, str, list[int]]] = []
    seen = {subject.lower()}
    for cand in candidates:
        if cand.subject.lower() in seen:
            continue
        seen.add(cand.subject.lower())
        text = prompt[:start] + cand.subject + prompt[start + len(subject):]
        ids = model.encode(text).input_ids[0].tolist()
        if len(ids) == len(clean_ids) and (unk is None or unk not in ids) and ids != clean_ids:
            options.append((cand, text, ids))
        if len(options) == limit:
            break
    if not options:
        return None
    logits = forward_logits(model, torch.tensor([ids for _, _, ids in options], device=model.device))[:, -1].float().cpu()
    best: tuple | None = None
    for i, (cand, text, ids) in enumerate(options):
        top = int(logits[i].argmax())
        if contrast is not None:
            wrong = contrast
        elif cand.answer is not None:
            wrong = first_token(model, text, cand.answer)
        else:
            wrong = _best_real(logits[i], answer, tok)
        related = cand.answer is not None or contrast is not None
        if wrong == answer:
            continue
        rank = (0 if related and top == wrong else 1 if _real(top, answer, tok) and not related
                else 2 if _real(top, answer, tok) else 3)
        key = (rank, float(logits[i, answer] - logits[i, wrong]))
        if best is None or key < best[0]:
            best = (key, Corruption("counterfactual", torch.tensor([ids]), wrong, top, subject=cand.subject,
                                    prompt=text, source=cand.source, rank=_RANKS[rank], scored=len(options)))
    if best is None:
        return None
    found = best[1]
    if found.rank == _RANKS[3]:
        found.note = (f"the model's answer on the corrupted prompt, {tok.decode([found.top])!r}, is no real "
                      "alternative object")
    return found


@torch.no_grad()
def noise(model: Any, clean: torch.Tensor, positions: list[int], scale: float, seed: int, answer: int,
          contrast: int | None = None) -> Corruption:
    """Gaussian noise (`scale` x the std of the embedding module's output, `weight_cache.embedding_std`) on
    the token embeddings at `positions`; the contrast
    answer is `contrast`, else the noised run's most likely real word other than the answer."""
    gen = torch.Generator().manual_seed(seed)
    std = embedding_std(model)
    delta = torch.randn(len(positions), model.d_model, generator=gen) * scale * std
    with Hooks(model) as h:
        h.add("embed", delta, positions=positions)
        logits = forward_logits(model, clean)[0, -1].float().cpu()
    wrong = contrast if contrast is not None and contrast != answer else _best_real(logits, answer, model.tokenizer)
    return Corruption("noise", clean, wrong, int(logits.argmax()), source="target_new" if wrong == contrast else "noised run",
                      noise=delta, scale=scale)

"""Relations of factual recall: paraphrases of a fact, same-relation facts and unrelated control facts.

Localisation findings on a real model need controls, and these helpers give the data for them:

- `paraphrases(sample)`: more prompts of the same fact, built from its relation's templates, as
  Dai et al. 2022 ("Knowledge Neurons in Pretrained Transformers") refine knowledge neurons over
  several prompts of one fact.
- `counterfactual_subjects(relation_id, ...)`: subjects of the same relation whose answer is a real,
  different object, for corrupting a prompt by swapping its subject (counterfactual patching).
- `control_facts(...)` / `controls_for(sample)`: short unrelated facts that the embedded SmolLM2-135M
  answers correctly, to check that what was located for one fact is specific to it.

The data is written for knowmri (`knowmri/data/builtin/relations.toml`, `control_facts.toml`) and read
on first use. Relations are Wikidata ids ("P17"); a sample names its relation by the `relation_id` key,
or else by `triple_relation` (an id, or a phrasing such as ROME's "is located in the country of").
Pure Python: no model, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import tomllib

#: Where the subject goes in a template.
SLOT = "{subject}"

_ID = re.compile(r"^[Pp]\d+$")


@dataclass(frozen=True)
class Relation:
    """One relation: its Wikidata id, a short name, paraphrase templates and example facts.

    Each template holds `{subject}` and ends right before the object, so the object is the
    next-token continuation. `examples` are true (subject, object) facts of the relation;
    `aliases` are other phrasings that identify it but are not used as paraphrases.
    """

    id: str
    name: str
    templates: tuple[str, ...]
    examples: tuple[tuple[str, str], ...]
    aliases: tuple[str, ...] = ()

    def prompts(self, subject: str) -> list[str]:
        """Every template with `subject` filled in."""
        return [t.replace(SLOT, subject) for t in self.templates]


def relations() -> dict[str, Relation]:
    """All built-in relations by id."""
    return dict(_table())


def relation(rid: str) -> Relation:
    """The built-in relation with Wikidata id `rid` ("P17")."""
    table = _table()
    key = _normal_id(rid)
    if key is None or key not in table:
        raise ValueError(f"unknown relation {rid!r}; the built-in relations are {', '.join(table)}")
    return table[key]


def relation_id_of(sample: Mapping[str, Any]) -> str | None:
    """A sample's relation id: its `relation_id`, else recognised from `triple_relation` or the prompt.

    `triple_relation` may be an id ("P131") or a phrasing ("is located in the country of", ROME's
    known_1000 form); the prompt is matched with its `triple_subject` taken out. A phrasing that two
    relations share identifies neither. None when nothing is recognised.
    """
    sample = _mapping(sample)
    for key in ("relation_id", "triple_relation"):
        rid = _normal_id(sample.get(key))
        if rid is not None:
            return rid
    phrases = _phrases()
    text = sample.get("triple_relation")
    if isinstance(text, str) and _phrase(text) in phrases:
        return phrases[_phrase(text)]
    prompt, subject = sample.get("prompt"), sample.get("triple_subject")
    if isinstance(prompt, str) and isinstance(subject, str) and subject and subject in prompt:
        at = prompt.index(subject)
        before, after = prompt[:at], prompt[at + len(subject):]
        candidates = [before + SLOT + after]
        if before.lower().endswith("the "):
            candidates.append(before[:-4] + SLOT + after)
        for candidate in candidates:
            if _phrase(candidate) in phrases:
                return phrases[_phrase(candidate)]
    return None


def paraphrases(sample: Mapping[str, Any], n: int | None = None) -> list[str]:
    """Other prompts of the same fact, from the templates of the sample's relation.

    Needs `triple_subject` and a recognisable relation (see `relation_id_of`); returns [] otherwise.
    The sample's own prompts (`prompt` and `prompts`) are left out; `n` keeps the first n.
    """
    sample = _mapping(sample)
    _check_n(n)
    subject, rid = sample.get("triple_subject"), relation_id_of(sample)
    table = _table()
    if not isinstance(subject, str) or not subject.strip() or rid not in table:
        return []
    own = [sample.get("prompt"), *(sample.get("prompts") or [])]
    seen = {_text_key(p) for p in own if isinstance(p, str)}
    out: list[str] = []
    for prompt in table[rid].prompts(subject):
        if _text_key(prompt) not in seen:
            seen.add(_text_key(prompt))
            out.append(prompt)
    return out if n is None else out[:n]


def counterfactual_subjects(
    relation_id: str,
    exclude_subject: str | None = None,
    exclude_object: str | None = None,
    n: int | None = None,
) -> list[tuple[str, str]]:
    """Example (subject, object) facts of a relation whose object differs from `exclude_object`.

    Objects are compared by their first word (case-insensitive), so the answer's first token
    differs too ("New York City" is not an alternative to "New Zealand"); `exclude_subject` is left
    out. [] for a relation without examples; `n` keeps the first n.
    """
    _check_n(n)
    rid = _normal_id(relation_id)
    table = _table()
    if rid not in table:
        return []
    subject_key = _text_key(exclude_subject) if exclude_subject else None
    object_key = _first_word(exclude_object) if exclude_object else None
    out = [(s, o) for s, o in table[rid].examples
           if _text_key(s) != subject_key and _first_word(o) != object_key]
    return out if n is None else out[:n]


def control_facts(
    exclude_relation: str | Iterable[str] | None = None,
    n: int | None = None,
    exclude_subject: str | None = None,
    exclude_answer: str | None = None,
) -> list[dict[str, str]]:
    """Unrelated facts that SmolLM2-135M answers top-1, as sample dicts.

    Each dict has `prompt`, `ground_truth` (the continuation, with its leading space),
    `triple_subject`, `triple_object` and `relation_id`. Facts of `exclude_relation` (an id or ids),
    about `exclude_subject`, or whose answer starts like `exclude_answer` are left out. The order
    takes one fact of each relation in turn, so the first `n` spread over relations.
    """
    _check_n(n)
    if isinstance(exclude_relation, str):
        exclude_relation = [exclude_relation]
    excluded = {_normal_id(r) or r for r in exclude_relation or ()}
    subject_key = _text_key(exclude_subject) if exclude_subject else None
    answer_key = _first_word(exclude_answer) if exclude_answer else None
    out = []
    for fact in _controls():
        if fact["relation_id"] in excluded or _first_word(fact["ground_truth"]) == answer_key:
            continue
        if subject_key and (subject_key in _text_key(fact["prompt"])
                            or _text_key(fact["triple_subject"]) in subject_key):
            continue
        out.append(dict(fact))
    return out if n is None else out[:n]


def controls_for(sample: Mapping[str, Any], n: int | None = None) -> list[dict[str, str]]:
    """Control facts unrelated to `sample`: another relation, subject and answer."""
    sample = _mapping(sample)
    answer = sample.get("ground_truth") or sample.get("triple_object")
    return control_facts(exclude_relation=relation_id_of(sample) or (), n=n,
                         exclude_subject=sample.get("triple_subject"),
                         exclude_answer=answer if isinstance(answer, str) else None)


# --- loading -----------------------------------------------------------------------------

def _read(name: str) -> dict[str, Any]:
    text = (resources.files("knowmri.data") / "builtin" / name).read_text(encoding="utf-8")
    return tomllib.loads(text)


@cache
def _table() -> dict[str, Relation]:
    table: dict[str, Relation] = {}
    for rid, entry in _read("relations.toml").items():
        templates = tuple(entry.get("templates") or ())
        aliases = tuple(entry.get("aliases") or ())
        examples = tuple((str(s), str(o)) for s, o in entry.get("examples") or ())
        for template in templates + aliases:
            if template.count(SLOT) != 1 or template != template.strip():
                raise ValueError(f"relations.toml [{rid}]: {template!r} needs one {SLOT} and no outer spaces")
        if not _ID.match(rid) or not entry.get("name") or not templates:
            raise ValueError(f"relations.toml [{rid}]: needs a P-id, a name and templates")
        table[rid] = Relation(rid, str(entry["name"]), templates, examples, aliases)
    return table


@cache
def _phrases() -> dict[str, str]:
    """Relation phrasing -> id, over every template and alias; shared phrasings left out."""
    owners: dict[str, set[str]] = {}
    for rel in _table().values():
        for template in rel.templates + rel.aliases:
            owners.setdefault(_phrase(template), set()).add(rel.id)
    return {phrase: next(iter(ids)) for phrase, ids in owners.items() if len(ids) == 1 and phrase}


@cache
def _controls() -> tuple[dict[str, str], ...]:
    """The control facts, one relation at a time in turn (in file order)."""
    by_relation: dict[str, list[dict[str, str]]] = {}
    for fact in _read("control_facts.toml")["fact"]:
        record = {"prompt": fact["prompt"], "ground_truth": fact["answer"], "triple_subject": fact["subject"],
                  "triple_object": fact["object"], "relation_id": fact["relation"]}
        by_relation.setdefault(record["relation_id"], []).append(record)
    ordered = []
    for round_ in range(max(len(v) for v in by_relation.values())):
        ordered += [facts[round_] for facts in by_relation.values() if round_ < len(facts)]
    return tuple(ordered)


# --- text keys ---------------------------------------------------------------------------

def _normal_id(value: Any) -> str | None:
    if isinstance(value, str) and _ID.match(value.strip()):
        return value.strip().upper()
    return None


def _phrase(text: str) -> str:
    """A relation phrasing without its subject slot: lower case, single spaces, no outer punctuation."""
    for slot in (SLOT, "{}", "[X]"):
        text = text.replace(slot, " ")
    text = re.sub(r"\s+", " ", text.lower())
    text = re.sub(r" ([,.;:])", r"\1", text)
    return text.strip(" ,.;:")


def _text_key(text: Any) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().casefold()


def _first_word(text: Any) -> str:
    words = _text_key(text).split(" ")
    return words[0] if words else ""


def _mapping(sample: Any) -> Mapping[str, Any]:
    if not isinstance(sample, Mapping):
        raise ValueError(f"expected a Sample or a mapping of template keys, got {type(sample).__name__}")
    return sample


def _check_n(n: int | None) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative integer or None, got {n!r}")

"""Parsers for the native formats of the knowledge datasets (facts, edits, commonsense, bias).

Each parser takes the user's path (and an optional split) and returns rows
`(source, index, fields)`: `fields` maps template keys (docs/API.md#samples-and-keys) to values, and
`(source, index)` locates the record for error messages. Record-level converters
(`*_record`) are shared with the hub loader, which feeds them Hugging Face rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from knowmri.data._io import (
    as_mapping,
    bad,
    continuation,
    need,
    need_str,
    read_json,
    read_jsonl,
    read_records,
)

#: (source, index, fields): one parsed record and where it came from.
Row = tuple[str, int, dict[str, Any]]
RecordFn = Callable[[Mapping[str, Any], str, int], "dict[str, Any] | None"]

#: The prompt wrapped around a commonsense statement so a causal LM can answer " True"/" False".
CSK_PROMPT = "{statement}. True or false? Answer:"


def per_record(path: Path, fn: RecordFn) -> list[Row]:
    """Apply a record converter to every record of a record file (json/jsonl/csv/parquet)."""
    rows: list[Row] = []
    for i, rec in enumerate(read_records(path)):
        fields = fn(as_mapping(rec, path, i), str(path), i)
        if fields is not None:
            rows.append((str(path), i, fields))
    return rows


def no_split(name: str, split: str | None) -> None:
    """Refuse a split for a format whose file is already one split."""
    if split is not None:
        raise ValueError(f"{name} files hold a single split; drop split={split!r} (or filter the Dataset)")


def find_in(prompt: str, subject: Any) -> str | None:
    """`subject` as spelled in `prompt` (matched case-insensitively), or None if absent."""
    if not isinstance(subject, str) or not subject.strip():
        return None
    if subject in prompt:
        return subject
    at = prompt.lower().find(subject.lower())
    return prompt[at: at + len(subject)] if at >= 0 else None


def is_knowmri_eval(rec: Mapping[str, Any]) -> bool:
    """Know-MRI's evaluation format: {question, answer, subject, origin_question, origin_answer}."""
    return "question" in rec and "answer" in rec and "origin_question" in rec


def knowmri_eval_record(rec: Mapping[str, Any], src: str, i: int, mcq: bool = False) -> dict[str, Any]:
    """A Know-MRI evaluation record: the original fact, or (mcq) the multiple-choice question."""
    key_q, key_a = ("question", "answer") if mcq else ("origin_question", "origin_answer")
    prompt = need_str(rec, key_q, src, i)
    answer = str(need(rec, key_a, src, i))
    fields: dict[str, Any] = {"prompt": prompt, "ground_truth": continuation(answer)}
    if mcq:
        fields["label"] = answer.strip()
    subject = find_in(prompt, rec.get("subject"))
    if subject:
        fields["triple_subject"] = subject
        if not mcq:
            fields["triple_object"] = answer.strip()
    return fields


# --- known_1000 (ROME knowns) ------------------------------------------------------------

def known_record(rec: Mapping[str, Any], src: str, i: int) -> dict[str, Any]:
    """ROME's knowns: {known_id, subject, attribute, template, prediction, prompt, relation_id}."""
    subject = need_str(rec, "subject", src, i)
    attribute = str(need(rec, "attribute", src, i))
    template = rec.get("template")
    prompt = rec.get("prompt") or (template.format(subject) if isinstance(template, str) else None)
    if not prompt:
        raise bad(src, i, "prompt", "missing (and no template to build it from)")
    relation = template.replace("{}", "").strip() if isinstance(template, str) else rec.get("relation_id")
    fields = {"prompt": prompt, "ground_truth": continuation(attribute), "triple_subject": subject,
              "triple_object": attribute.strip()}
    if relation:
        fields["triple_relation"] = str(relation)
    if isinstance(rec.get("relation_id"), str) and rec["relation_id"].strip():
        fields["relation_id"] = rec["relation_id"].strip()
    return fields


def known(path: Path, split: str | None) -> list[Row]:
    """ROME's known_1000.json."""
    no_split("known_1000", split)
    return per_record(path, known_record)


# --- CounterFact -------------------------------------------------------------------------

def counterfact_record(rec: Mapping[str, Any], src: str, i: int) -> dict[str, Any]:
    """CounterFact: ROME's nested `requested_rewrite`, EasyEdit's flat form, or Know-MRI eval."""
    if is_knowmri_eval(rec):
        return knowmri_eval_record(rec, src, i)
    if "requested_rewrite" in rec:
        rw = need(rec, "requested_rewrite", src, i)
        if not isinstance(rw, Mapping):
            raise bad(src, i, "requested_rewrite", "must be an object")
        subject = need_str(rw, "subject", src, i)
        template = need_str(rw, "prompt", src, i)
        if "{}" not in template:
            raise bad(src, i, "requested_rewrite.prompt", "has no '{}' where the subject goes")
        true = str(need(rw, "target_true.str", src, i))
        new = str(need(rw, "target_new.str", src, i))
        prompt = template.format(subject)
        fields = {"prompt": prompt, "ground_truth": continuation(true), "target_new": continuation(new),
                  "triple_subject": subject, "triple_relation": str(rw.get("relation_id") or
                                                                     template.replace("{}", "").strip()),
                  "triple_object": true.strip()}
        if isinstance(rw.get("relation_id"), str) and rw["relation_id"].strip():
            fields["relation_id"] = rw["relation_id"].strip()
        paraphrases = [p for p in rec.get("paraphrase_prompts") or [] if isinstance(p, str) and p.strip()]
        if paraphrases:
            fields["prompts"] = [prompt, *paraphrases]
        return fields
    prompt = need_str(rec, "prompt", src, i)
    subject = need_str(rec, "subject", src, i)
    true = str(need(rec, "ground_truth", src, i))
    fields = {"prompt": prompt, "ground_truth": continuation(true),
              "target_new": continuation(str(need(rec, "target_new", src, i))),
              "triple_subject": subject, "triple_object": true.strip()}
    rephrase = rec.get("rephrase_prompt")
    if isinstance(rephrase, str) and rephrase.strip():
        fields["prompts"] = [prompt, rephrase]
    return fields


def counterfact(path: Path, split: str | None) -> list[Row]:
    """CounterFact JSON (nested ROME form, flat EasyEdit form, or Know-MRI eval)."""
    no_split("CounterFact", split)
    return per_record(path, counterfact_record)


# --- zsRE --------------------------------------------------------------------------------

def zsre_record(rec: Mapping[str, Any], src: str, i: int) -> dict[str, Any]:
    """zsRE in MEND's form: {subject, src, pred, rephrase, alt, answers, loc, loc_ans}."""
    question = need_str(rec, "src", src, i)
    subject = need_str(rec, "subject", src, i)
    answers = rec.get("answers")
    if isinstance(answers, list) and answers:
        answer = str(answers[0])
    else:
        answer = str(need(rec, "pred", src, i))
    fields: dict[str, Any] = {"prompt": question, "ground_truth": continuation(answer),
                              "triple_subject": subject, "triple_object": answer.strip()}
    alt = rec.get("alt")
    if isinstance(alt, str) and alt.strip():
        fields["target_new"] = continuation(alt)
    rephrase = rec.get("rephrase")
    if isinstance(rephrase, str) and rephrase.strip():
        fields["prompts"] = [question, rephrase]
    return fields


def zsre(path: Path, split: str | None) -> list[Row]:
    """zsRE JSON in MEND/ROME/EasyEdit form."""
    no_split("zsRE", split)
    return per_record(path, zsre_record)


# --- PARAREL -----------------------------------------------------------------------------

def _pararel_dirs(path: Path) -> tuple[Path, Path]:
    for base in (path, path / "data", path.parent, path.parent.parent):
        for patterns in (base / "graphs_json", base / "pattern_data" / "graphs_json"):
            tuples = base / "trex_lms_vocab"
            if patterns.is_dir() and tuples.is_dir():
                return patterns, tuples
    raise ValueError(f"{path}: expected a PARAREL folder holding graphs_json/P*.jsonl and trex_lms_vocab/P*.jsonl")


def pararel(path: Path, split: str | None) -> list[Row]:
    """PARAREL: one record per T-REx tuple, `prompts` = every pattern that ends with the object.

    `path` is the PARAREL folder (or one graphs_json/P*.jsonl file); `split` keeps the named
    relations ("P1376" or "P1376,P36").
    """
    patterns_dir, tuples_dir = _pararel_dirs(path if path.is_dir() else path.parent)
    files = [path] if path.is_file() else sorted(patterns_dir.glob("P*.jsonl"))
    wanted = {s.strip() for s in split.split(",")} if split else None
    rows: list[Row] = []
    for pattern_file in files:
        relation = pattern_file.stem
        if wanted is not None and relation not in wanted:
            continue
        templates = []
        for j, rec in enumerate(read_jsonl(pattern_file)):
            pattern = need_str(as_mapping(rec, pattern_file, j), "pattern", pattern_file, j).strip()
            body = pattern[:-1].rstrip() if pattern.endswith(".") else pattern
            if body.endswith("[Y]") and "[X]" in body:
                templates.append(body[: -len("[Y]")].rstrip())
        tuple_file = tuples_dir / pattern_file.name
        if not templates or not tuple_file.is_file():
            continue
        for j, rec in enumerate(read_jsonl(tuple_file)):
            rec = as_mapping(rec, tuple_file, j)
            sub = need_str(rec, "sub_label", tuple_file, j)
            obj = need_str(rec, "obj_label", tuple_file, j)
            prompts = [t.replace("[X]", sub) for t in templates]
            rows.append((str(tuple_file), j, {"prompt": prompts[0], "prompts": prompts,
                                              "ground_truth": continuation(obj), "triple_subject": sub,
                                              "triple_relation": relation, "triple_object": obj,
                                              "relation_id": relation}))
    if wanted and not rows:
        raise ValueError(f"{path}: no PARAREL relation matches split={split!r}")
    return rows


# --- PEP-3k / 20Q (MEMIT-CSK) ------------------------------------------------------------

def csk_record(rec: Mapping[str, Any], src: str, i: int) -> dict[str, Any]:
    """MEMIT-CSK: {prompt, label: 0/1 or " True"/" False", [subject, verb, object]}."""
    statement = need_str(rec, "prompt", src, i).strip().rstrip(".")
    raw = need(rec, "label", src, i)
    text = str(raw).strip().lower()
    if text in ("1", "true"):
        label = "True"
    elif text in ("0", "false"):
        label = "False"
    else:
        raise bad(src, i, "label", f"expected 0/1 or True/False, got {raw!r}")
    prompt = CSK_PROMPT.format(statement=statement[:1].upper() + statement[1:])
    fields: dict[str, Any] = {"prompt": prompt, "ground_truth": " " + label, "label": label}
    subject, verb, obj = rec.get("subject"), rec.get("verb"), rec.get("object")
    subject = find_in(prompt, subject)
    if subject:
        fields["triple_subject"] = subject
        if isinstance(verb, str) and verb.strip():
            fields["triple_relation"] = verb
        if isinstance(obj, str) and obj.strip():
            fields["triple_object"] = obj
    return fields


def csk(path: Path, split: str | None) -> list[Row]:
    """A MEMIT-CSK PEP-3k or 20Q file (edit, validation, SVO-annotated or probe set)."""
    no_split("MEMIT-CSK", split)
    return per_record(path, csk_record)


# --- bias neurons ------------------------------------------------------------------------

def bias(path: Path, split: str | None) -> list[Row]:
    """Bias-neuron groups: lists of [masked sentence, demographic, group id] (a file or a folder).

    `split` keeps one demographic ("female").
    """
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    rows: list[Row] = []
    for file in files:
        data = read_json(file)
        if not isinstance(data, list):
            if path.is_dir():
                continue  # e.g. demographic_dict.json beside the group files
            raise bad(file, None, None, "expected a list of groups of [sentence, demographic, id]")
        index = 0
        for g, group in enumerate(data):
            items = group if isinstance(group, list) and group and isinstance(group[0], list) else [group]
            for item in items:
                if not isinstance(item, list) or len(item) < 2 or not all(isinstance(x, str) for x in item[:2]):
                    raise bad(file, index, None, f"group {g}: expected [sentence, demographic, id], got {item!r}")
                sentence, demographic = item[0], item[1].strip()
                if not sentence.strip() or not demographic:
                    raise bad(file, index, "sentence" if not sentence.strip() else "demographic", "is empty")
                if split is None or demographic.lower() == split.lower():
                    rows.append((str(file), index, {"prompt": sentence, "label": demographic,
                                                    "ground_truth": continuation(demographic)}))
                index += 1
    if not rows:
        raise ValueError(f"{path}: no bias-neuron records found" + (f" for split={split!r}" if split else ""))
    return rows


# --- concept_edit ------------------------------------------------------------------------

def concept_record(rec: Mapping[str, Any], src: str, i: int) -> dict[str, Any]:
    """A concept definition: Know-MRI eval form or {concept, definition}."""
    if is_knowmri_eval(rec):
        fields = knowmri_eval_record(rec, src, i)
    else:
        concept = need_str(rec, "concept", src, i)
        definition = need_str(rec, "definition", src, i)
        fields = {"prompt": f"The definition of {concept} is", "ground_truth": continuation(definition),
                  "triple_subject": concept, "triple_object": definition.strip()}
    if "triple_subject" in fields:
        fields["triple_relation"] = "definition"
    return fields


def concept_edit(path: Path, split: str | None) -> list[Row]:
    """Concept definitions; split="mcq" gives Know-MRI's two-option multiple-choice form."""
    if split not in (None, "mcq"):
        raise ValueError(f"concept_edit: unknown split {split!r}; use None or 'mcq'")
    if split == "mcq":
        return per_record(path, lambda r, s, i: knowmri_eval_record(r, s, i, mcq=True))
    return per_record(path, concept_record)

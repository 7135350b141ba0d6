"""Parsers for the native formats of the task datasets (math, classification, translation, code).

Same contract as `formats`: a parser returns rows `(source, index, fields)`, and the
record-level converters are shared with the hub loader.

Key mapping (template keys in docs/API.md): math -> prompt (question), reasoning (worked solution), ground_truth
(" " + final answer); classification -> prompt (text wrapped in `*_PROMPT`), label (class
name) and ground_truth (" " + label) so that causal methods can run on it; translation ->
prompt (`TRANSLATE_PROMPT`), ground_truth (" " + translation), source_lang, target_lang;
MBPP -> prompt (task + first test), ground_truth (reference code), tests (setup/imports, then
the asserts, in the order they must be executed after the code).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from knowmri.data._io import as_mapping, bad, continuation, need, need_str, read_lines, read_records
from knowmri.data.formats import Row, is_knowmri_eval, knowmri_eval_record, no_split, per_record

IMDB_PROMPT = "Review: {text}\nSentiment:"
EMOTION_PROMPT = "Text: {text}\nEmotion:"
TRANSLATE_PROMPT = "Translate {src} to {tgt}:\n{src}: {text}\n{tgt}:"
MBPP_PROMPT = "{task}\nYour code should pass this test:\n{test}\n"

IMDB_LABELS = ("Negative", "Positive")
EMOTION_LABELS = ("sadness", "joy", "love", "anger", "fear", "surprise")
LANGUAGES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
             "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese",
             "af": "Afrikaans", "ar": "Arabic", "hu": "Hungarian", "fi": "Finnish", "sv": "Swedish",
             "no": "Norwegian", "pl": "Polish", "el": "Greek", "ca": "Catalan", "eo": "Esperanto"}
#: MBPP's documented task-id ranges per split.
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}

_CALC = re.compile(r"<<[^<>]*>>")
_ANSWER_IS = re.compile(r"The answer is:?\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


# --- GSM8K / MetaMathQA -----------------------------------------------------------------

def gsm8k_record(rec: Mapping[str, Any], src: str, i: int) -> dict[str, Any]:
    """GSM8K: {question, answer}; the answer is the reasoning, then '#### final'."""
    question = need_str(rec, "question", src, i)
    answer = need_str(rec, "answer", src, i)
    if "####" not in answer:
        raise bad(src, i, "answer", "has no '#### <final answer>' line")
    reasoning, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if not final:
        raise bad(src, i, "answer", "the '####' line has no final answer")
    return {"prompt": question, "reasoning": _CALC.sub("", reasoning).strip() or answer.strip(),
            "ground_truth": continuation(final)}


def gsm8k(path: Path, split: str | None) -> list[Row]:
    """GSM8K JSONL (one split per file)."""
    no_split("GSM8K", split)
    return per_record(path, gsm8k_record)


def metamath_record(rec: Mapping[str, Any], src: str, i: int) -> dict[str, Any]:
    """MetaMathQA: {query, response, type, original_question}; the response ends 'The answer is: X'."""
    query = need_str(rec, "query", src, i)
    response = need_str(rec, "response", src, i)
    found = _ANSWER_IS.findall(response)
    if not found:
        raise bad(src, i, "response", "has no 'The answer is: X' line")
    return {"prompt": query, "reasoning": response.strip(), "ground_truth": continuation(found[-1])}


def metamath(path: Path, split: str | None) -> list[Row]:
    """MetaMathQA JSON/JSONL; split keeps one `type` (e.g. 'GSM_Rephrased')."""
    rows: list[Row] = []
    for i, rec in enumerate(read_records(path)):
        rec = as_mapping(rec, path, i)
        if split is None or rec.get("type") == split:
            rows.append((str(path), i, metamath_record(rec, str(path), i)))
    return rows


# --- IMDB / emotion ----------------------------------------------------------------------

def _label_name(raw: Any, labels: Sequence[str], src: str, i: int, field: str) -> str:
    if isinstance(raw, bool) or raw is None:
        raise bad(src, i, field, f"expected a class name or index, got {raw!r}")
    if isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit()):
        k = int(raw)
        if not 0 <= k < len(labels):
            raise bad(src, i, field, f"label index {k} is out of range for {list(labels)}")
        return labels[k]
    text = str(raw).strip()
    for name in labels:
        if text.lower() in (name.lower(), name.lower()[:3]):
            return name
    raise bad(src, i, field, f"unknown label {raw!r}; expected one of {list(labels)}")


def labelled_record(rec: Mapping[str, Any], src: str, i: int, labels: Sequence[str], template: str) -> dict:
    """{text, label (index or name)}, {text, label_name}, {text, answer} or Know-MRI eval."""
    if is_knowmri_eval(rec):
        text, field, raw = need_str(rec, "question", src, i), "answer", need(rec, "answer", src, i)
    else:
        text = need_str(rec, "text", src, i)
        field = next((f for f in ("label_name", "answer", "label") if rec.get(f) not in (None, "")), "label")
        raw = need(rec, field, src, i)
    label = _label_name(raw, labels, src, i, field)
    return {"prompt": template.format(text=text.strip()), "label": label, "ground_truth": " " + label}


def labelled(path: Path, split: str | None, labels: Sequence[str], template: str) -> list[Row]:
    """`text;label_name` lines (header optional) or records with a text and a label."""
    no_split("labelled-text", split)
    if path.suffix.lower() in (".txt", ".tsv") or (path.suffix.lower() == ".csv" and _semicolon(path)):
        rows: list[Row] = []
        lines = read_lines(path)
        start = 1 if lines and lines[0].strip().lower().replace("\t", ";") in ("text;label_name", "text;label") else 0
        for i, line in enumerate(lines[start:]):
            if not line.strip():
                continue
            sep = "\t" if "\t" in line and ";" not in line else ";"
            if sep not in line:
                raise bad(path, i, "label_name", f"line {i + start + 1} has no '{sep}' before the label")
            text, raw = line.rsplit(sep, 1)
            rows.append((str(path), i, labelled_record({"text": text, "label": raw}, str(path), i, labels,
                                                       template)))
        return rows
    return per_record(path, lambda r, s, i: labelled_record(r, s, i, labels, template))


def _semicolon(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        header = handle.readline()
    return ";" in header and "," not in header


# --- Opus translation --------------------------------------------------------------------

def translation_fields(src_lang: str, tgt_lang: str, source: str, target: str) -> dict[str, Any]:
    """The Sample fields of one translation pair."""
    names = (LANGUAGES.get(src_lang, src_lang), LANGUAGES.get(tgt_lang, tgt_lang))
    prompt = TRANSLATE_PROMPT.format(src=names[0], tgt=names[1], text=source.strip())
    return {"prompt": prompt, "ground_truth": continuation(target), "source_lang": src_lang,
            "target_lang": tgt_lang}


def opus_record(rec: Mapping[str, Any], src: str, i: int) -> dict[str, Any]:
    """A Hugging Face Opus row {translation: {xx: ..., yy: ...}}; English is the source if present."""
    pair = need(rec, "translation", src, i)
    if not isinstance(pair, Mapping) or len(pair) != 2:
        raise bad(src, i, "translation", "expected an object with exactly two languages")
    langs = sorted(pair, key=lambda k: k != "en")
    for lang in langs:
        if not isinstance(pair[lang], str) or not pair[lang].strip():
            raise bad(src, i, f"translation.{lang}", "must be non-empty text")
    return translation_fields(langs[0], langs[1], pair[langs[0]], pair[langs[1]])


def opus(path: Path, split: str | None) -> list[Row]:
    """Opus: HF records with `translation`, or line-aligned files `*.xx-yy*.{xx,yy}` (a file or folder).

    Given one text file, that file is the source side; given a folder, English is the source.
    """
    if path.suffix.lower() in (".json", ".jsonl", ".parquet", ".csv"):
        no_split("Opus record", split)
        return per_record(path, opus_record)
    source_file, target_file = _opus_pair(path, split)
    src_lang, tgt_lang = source_file.suffix[1:], target_file.suffix[1:]
    sources, targets = read_lines(source_file), read_lines(target_file)
    if len(sources) != len(targets):
        raise ValueError(f"{source_file} has {len(sources)} lines but {target_file} has {len(targets)}; "
                         "line-aligned files must have the same number of lines")
    rows: list[Row] = []
    for i, (s, t) in enumerate(zip(sources, targets)):
        if not s.strip() or not t.strip():
            raise bad(source_file if not s.strip() else target_file, i, src_lang if not s.strip() else tgt_lang,
                      "is an empty line")
        rows.append((str(source_file), i, translation_fields(src_lang, tgt_lang, s, t)))
    return rows


def _opus_pair(path: Path, split: str | None) -> tuple[Path, Path]:
    pattern = re.compile(r"([a-z]{2,3})-([a-z]{2,3})")
    if path.is_file():
        match = pattern.search(path.name)
        if not match:
            raise ValueError(f"{path}: cannot tell the language pair; name files like opus.en-fr-test.en")
        other = match.group(2) if path.suffix[1:] == match.group(1) else match.group(1)
        partner = path.with_suffix("." + other)
        if not partner.is_file():
            raise ValueError(f"{path}: the aligned file {partner.name} is missing")
        return path, partner
    candidates = sorted(p for p in path.iterdir() if p.is_file() and pattern.search(p.name)
                        and (split is None or split in p.name))
    stems: dict[str, list[Path]] = {}
    for p in candidates:
        stems.setdefault(p.stem, []).append(p)
    pairs = [sorted(v, key=lambda p: p.suffix != ".en") for v in stems.values() if len(v) == 2]
    if split is None and len(pairs) > 1:
        pairs = [p for p in pairs if "test" in p[0].name] or pairs
    if len(pairs) != 1:
        raise ValueError(f"{path}: expected one pair of line-aligned files (e.g. opus.en-fr-test.en/.fr), found "
                         f"{len(pairs)}; pass split='test'/'dev'/'train' or a file path")
    return pairs[0][0], pairs[0][1]


# --- MBPP --------------------------------------------------------------------------------

def mbpp_record(rec: Mapping[str, Any], src: str, i: int) -> dict[str, Any]:
    """MBPP (full: text/code/test_list/test_setup_code; sanitized: prompt/code/test_imports/test_list)."""
    if is_knowmri_eval(rec):
        return knowmri_eval_record(rec, src, i, mcq=True)
    task = need_str(rec, "text" if "text" in rec else "prompt", src, i)
    code = need_str(rec, "code", src, i)
    asserts = need(rec, "test_list", src, i)
    if not isinstance(asserts, list) or not asserts or not all(isinstance(t, str) for t in asserts):
        raise bad(src, i, "test_list", "must be a non-empty list of assert statements")
    setup = [t for t in rec.get("test_imports") or [] if isinstance(t, str) and t.strip()]
    if isinstance(rec.get("test_setup_code"), str) and rec["test_setup_code"].strip():
        setup.append(rec["test_setup_code"])
    return {"prompt": MBPP_PROMPT.format(task=task.strip(), test=asserts[0]), "ground_truth": code,
            "tests": [*setup, *asserts]}


def mbpp(path: Path, split: str | None) -> list[Row]:
    """MBPP JSONL or sanitized JSON; split picks MBPP's task-id range (prompt/test/validation/train)."""
    if split is not None and split not in MBPP_SPLITS:
        raise ValueError(f"mbpp: unknown split {split!r}; use one of {list(MBPP_SPLITS)}")
    low, high = MBPP_SPLITS.get(split or "", (None, None))

    def convert(rec: Mapping[str, Any], src: str, i: int) -> dict[str, Any] | None:
        if low is not None and not low <= int(rec.get("task_id") or 0) <= high:
            return None
        return mbpp_record(rec, src, i)

    return per_record(path, convert)

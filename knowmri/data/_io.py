"""Reading record files (JSON, JSONL, CSV, Parquet) and naming bad data precisely.

Every error raised for bad data says which file, which record (0-based index) and which
field is wrong, so a user can open the file and fix it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: Extensions that `read_records` understands.
RECORD_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class DataError(ValueError):
    """Bad data in a file: the message names the file, the record and the field."""


def where(path: Path | str, index: int | None = None, field: str | None = None) -> str:
    """'file.json, record 3, field "subject"' -- the location prefix of data errors."""
    parts = [str(path)]
    if index is not None:
        parts.append(f"record {index}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ", ".join(parts)


def bad(path: Path | str, index: int | None, field: str | None, message: str) -> DataError:
    """A DataError located at (path, index, field)."""
    return DataError(f"{where(path, index, field)}: {message}")


def read_json(path: Path) -> Any:
    """Parse a JSON file, naming the file and the line on a syntax error."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise bad(path, None, None, f"not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise bad(path, None, None, f"not UTF-8 text ({exc.reason})") from exc


def read_jsonl(path: Path) -> list[Any]:
    """Parse a JSON Lines file (blank lines skipped); a bad line is reported as its record."""
    out: list[Any] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise bad(path, len(out), None, f"line {line_no} is not valid JSON: {exc.msg}") from exc
    return out


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Read a CSV (or TSV, by extension) file with a header row into dicts."""
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            raise bad(path, None, None, "the CSV file has no header row")
        return [dict(row) for row in reader]


def read_parquet(path: Path) -> list[dict[str, Any]]:
    """Read a Parquet file into dicts (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from exc
    return pq.read_table(path).to_pylist()


def read_records(path: Path) -> list[Any]:
    """The records of a .json (a list, or an object holding one list), .jsonl, .csv or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return read_csv(path)
    if suffix == ".parquet":
        return read_parquet(path)
    if suffix == ".json":
        data = read_json(path)
        if isinstance(data, list):
            return data
        if isinstance(data, Mapping):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1:
                return lists[0]
        raise bad(path, None, None, "expected a JSON list of records (or an object holding one list)")
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(RECORD_SUFFIXES)}")


def as_mapping(record: Any, path: Path | str, index: int) -> Mapping[str, Any]:
    """The record itself if it is an object, else a DataError."""
    if not isinstance(record, Mapping):
        raise bad(path, index, None, f"expected an object with fields, got {type(record).__name__}")
    return record


def get_field(record: Mapping[str, Any], field: str) -> Any:
    """A field's value; 'a.b' reaches into nested objects. KeyError if absent."""
    if field in record:
        return record[field]
    value: Any = record
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(field)
        value = value[part]
    return value


def need(record: Mapping[str, Any], field: str, path: Path | str, index: int) -> Any:
    """A required field's value (not None, not empty text), else a DataError naming it."""
    try:
        value = get_field(record, field)
    except KeyError:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise bad(path, index, field, f"missing (the record has: {fields})") from None
    if value is None or (isinstance(value, str) and not value.strip()):
        raise bad(path, index, field, "is empty")
    return value


def need_str(record: Mapping[str, Any], field: str, path: Path | str, index: int) -> str:
    """A required text field, else a DataError naming it."""
    value = need(record, field, path, index)
    if not isinstance(value, str):
        raise bad(path, index, field, f"must be text, got {type(value).__name__}")
    return value


def continuation(text: str) -> str:
    """An answer as a continuation of a prompt: one leading space, as tokenizers expect."""
    text = str(text)
    return text if text.startswith((" ", "\n")) else " " + text.strip()


def read_lines(path: Path) -> list[str]:
    """The lines of a text file without their line endings."""
    with open(path, encoding="utf-8") as handle:
        return handle.read().splitlines()


def first(items: Iterable[Any]) -> Any:
    """The first item, or None."""
    return next(iter(items), None)

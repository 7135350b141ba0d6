"""`load_dataset` and `datasets`: built-in samples, native files, any record file, the hub."""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from knowmri.data import builtins as _builtins  # noqa: F401  (registers the built-in specs)
from knowmri.data._io import RECORD_SUFFIXES, bad, get_field, read_jsonl, read_records
from knowmri.data.dataset import (
    Dataset,
    DatasetSpec,
    build_samples,
    closest_names,
    get_spec,
    registered,
    spec_for_hub_id,
)
from knowmri.data.formats import RecordFn, Row
from knowmri.sample import KEYS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_dataset(
    spec: str | os.PathLike[str],
    *,
    path: str | os.PathLike[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    mapping: Mapping[str, str] | None = None,
) -> Dataset:
    """Load a dataset as Samples.

    `spec` is a built-in name (its authored offline sample; with `path=` its full public file in
    the native format; with `split=` its hub copy), a local .json/.jsonl/.csv/.parquet file read
    with `mapping` ({file_field: template_key}, dotted fields reach into objects), or a Hugging
    Face hub id ("owner/name"). `limit` keeps the first records.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
    name = os.fspath(spec).strip() if isinstance(spec, (str, os.PathLike)) else None
    if not name:
        raise ValueError(f"expected a dataset name, a file path or a hub id, got {spec!r}")
    if mapping is not None:
        mapping = _check_mapping(mapping)
    known = get_spec(name)
    if known is not None:
        return _load_known(known, path=path, split=split, limit=limit, mapping=mapping)
    if path is not None:
        return _load_file(Path(path), name=name, mapping=mapping, split=split, limit=limit)
    file = Path(name).expanduser()
    if file.exists() or file.suffix.lower() in RECORD_SUFFIXES:
        if not file.exists():
            raise ValueError(f"no such file: {file}")
        return _load_file(file, name=file.stem, mapping=mapping, split=split, limit=limit)
    if _HUB_ID.match(name):
        hub_spec = spec_for_hub_id(name)
        if hub_spec is not None and mapping is None:
            return _load_hub(hub_spec.hub_id or name, hub_spec.hub_config, split or hub_spec.hub_split, limit,
                             hub_spec.hub_record, hub_spec)
        return _load_hub(name, None, split, limit, _mapper(mapping, name), None)
    hint = closest_names(name)
    raise ValueError(
        f"unknown dataset {name!r}: not a built-in name, an existing file or a hub id (owner/name)"
        + (f"; did you mean {', '.join(map(repr, hint))}" if hint else "")
        + f". Built-ins: {', '.join(s.name for s in registered())}"
    )


def datasets() -> list[dict[str, Any]]:
    """Every built-in dataset: name, description, source, keys, size of its built-in sample, formats."""
    return [{**spec.info(), "size": _builtin_size(spec.name)} for spec in registered()]


def _load_known(spec: DatasetSpec, *, path: Any, split: str | None, limit: int | None,
                mapping: Mapping[str, str] | None) -> Dataset:
    if path is not None:
        file = Path(path).expanduser()
        if not file.exists():
            raise ValueError(f"{spec.name}: no such file or folder: {file}")
        if mapping is not None:
            return _load_file(file, name=spec.name, mapping=mapping, split=split, limit=limit, spec=spec)
        rows = spec.native(file, split)
        return _dataset(spec, rows[:limit] if limit is not None else rows, origin=str(file))
    if mapping is not None:
        raise ValueError(f"{spec.name}: a mapping applies to a file; pass path= as well")
    if split is not None:
        if not spec.hub_id:
            raise ValueError(
                f"{spec.name} has no known hub copy; download its data and pass path= "
                f"(accepted: {spec.formats}), or load the built-in sample without split="
            )
        return _load_hub(spec.hub_id, spec.hub_config, split, limit, spec.hub_record, spec)
    rows = _builtin_rows(spec.name)
    return _dataset(spec, rows[:limit] if limit is not None else rows, origin="built-in", required=True)


def _dataset(spec: DatasetSpec, rows: list[Row], *, origin: str, required: bool = False) -> Dataset:
    samples = build_samples(rows, spec.support_keys if required else ())
    return Dataset(samples, name=spec.name, description=spec.description, source=spec.source, origin=origin)


def _builtin_file(name: str) -> Any:
    return resources.files("knowmri.data") / "builtin" / f"{name}.jsonl"


def _builtin_rows(name: str) -> list[Row]:
    resource = _builtin_file(name)
    with resources.as_file(resource) as file:
        records = read_jsonl(Path(file))
    return [(f"built-in {name}.jsonl", i, dict(rec)) for i, rec in enumerate(records)]


@cache
def _builtin_size(name: str) -> int:
    text = _builtin_file(name).read_text(encoding="utf-8")
    return sum(1 for line in text.splitlines() if line.strip())


# --- any file with a mapping ------------------------------------------------------------

def _check_mapping(mapping: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError("mapping must be a non-empty {file_field: template_key} dict")
    out = {}
    for field, key in mapping.items():
        if not isinstance(field, str) or not field or not isinstance(key, str) or not key:
            raise ValueError(f"mapping entries must be non-empty strings, got {field!r}: {key!r}")
        if key not in KEYS:
            close = difflib.get_close_matches(key, list(KEYS), n=1, cutoff=0.75)
            if close:
                raise ValueError(f"mapping {field!r} -> {key!r}: unknown template key; did you mean {close[0]!r}?")
        out[field] = key
    if "prompt" not in out.values():
        raise ValueError(f"the mapping {out} gives no 'prompt'; map the field holding the model input to 'prompt'")
    return out


def _coerce(key: str, value: Any, src: str, i: int, field: str) -> Any:
    expected = KEYS.get(key)
    if expected is list:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise bad(src, i, field, f"looks like a JSON list but does not parse: {exc.msg}") from exc
            else:
                value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad(src, i, field, f"must be a list for {key!r}, got {type(value).__name__}")
        return [str(v) for v in value]
    if expected is str:
        if isinstance(value, (dict, list, tuple)):
            raise bad(src, i, field, f"must be text for {key!r}, got {type(value).__name__}")
        return str(value)
    return value


def _mapper(mapping: Mapping[str, str] | None, src_name: str) -> RecordFn:
    def convert(rec: Mapping[str, Any], src: str, i: int) -> dict[str, Any]:
        use = mapping if mapping is not None else {k: k for k in rec if k in KEYS}
        if not use:
            fields = ", ".join(map(str, rec)) or "none"
            raise bad(src, i, None, f"no field is a template key (fields: {fields}); pass mapping=, e.g. "
                      f"mapping={{'question': 'prompt', 'answer': 'ground_truth'}}")
        out: dict[str, Any] = {}
        for field, key in use.items():
            try:
                value = get_field(rec, field)
            except KeyError:
                fields = ", ".join(map(str, rec)) or "none"
                raise bad(src, i, field, f"missing (the record has: {fields})") from None
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            out[key] = _coerce(key, value, src, i, field)
        return out

    return convert


def _load_file(file: Path, *, name: str, mapping: Mapping[str, str] | None, split: str | None,
               limit: int | None, spec: DatasetSpec | None = None) -> Dataset:
    if not file.is_file():
        raise ValueError(f"{file}: not a file; give a .json, .jsonl, .csv or .parquet file")
    if split is not None:
        raise ValueError(f"{file}: a file holds one split; drop split={split!r}")
    convert = _mapper(mapping, str(file))
    records = read_records(file)
    if limit is not None:
        records = records[:limit]
    rows: list[Row] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise bad(file, i, None, f"expected an object with fields, got {type(rec).__name__}")
        rows.append((str(file), i, convert(rec, str(file), i)))
    samples = build_samples(rows)
    return Dataset(samples, name=name, description=spec.description if spec else f"records from {file.name}",
                   source=spec.source if spec else str(file), origin=str(file))


# --- the Hugging Face hub ---------------------------------------------------------------

def _load_hub(hub_id: str, config: str | None, split: str | None, limit: int | None,
              convert: RecordFn | None, spec: DatasetSpec | None) -> Dataset:
    local_hint = ("download the data and load the file instead, e.g. "
                  f"load_dataset({(spec.name if spec else 'file.jsonl')!r}"
                  + (", path='data.jsonl')" if spec else ", mapping={'question': 'prompt', 'answer': 'ground_truth'})"))
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise RuntimeError(f"loading {hub_id!r} from the Hugging Face hub needs the 'datasets' library "
                           f"(pip install datasets); or {local_hint}") from exc
    _check_reachable(hub_id, local_hint)
    expr = None if split is None else (f"{split}[:{limit}]" if limit is not None else split)
    try:
        loaded = hf_datasets.load_dataset(hub_id, config, split=expr)
        if split is None:
            names = list(loaded)
            split = next((s for s in ("test", "validation", "train") if s in names), names[0])
            loaded = loaded[split]
            if limit is not None:
                loaded = loaded.select(range(min(limit, len(loaded))))
    except Exception as exc:  # the datasets library raises many types (connection, not found, config)
        raise RuntimeError(f"could not load {hub_id!r} from the Hugging Face hub ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); {local_hint}") from exc
    source = f"hf://{hub_id}" + (f" ({config})" if config else "") + f" [{split}]"
    convert = convert or _mapper(None, hub_id)
    rows = []
    for i, rec in enumerate(loaded):
        fields = convert(rec, source, i)
        if fields is not None:
            rows.append((source, i, fields))
    samples = build_samples(rows)
    return Dataset(samples, name=spec.name if spec else hub_id, description=spec.description if spec else "",
                   source=spec.source if spec else source, origin=source)


def _check_reachable(hub_id: str, local_hint: str) -> None:
    """Fail within seconds when the hub cannot be reached (the datasets library retries for ~20 s)."""
    offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if offline or proxied:
        return  # offline mode reads the local cache (and fails fast); a proxy may reach what we cannot
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=3):
            return
    except OSError as exc:
        raise RuntimeError(f"could not reach the Hugging Face hub at {host}:{port} to load {hub_id!r} ({exc}). "
                           f"If the dataset is in your local cache, set HF_DATASETS_OFFLINE=1; otherwise "
                           f"{local_hint}") from exc

"""Tidy pandas DataFrames of a report's findings: one row per token, layer or neuron and method.

They read the shared findings keys (`token_scores`, `layer_scores`, `neurons`, docs/REPORT.md), so a
new method that fills them shows up with no change here. pandas is optional: without it the frames
say how to install it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKEN_COLUMNS = ("method", "index", "token", "role", "score")
LAYER_COLUMNS = ("method", "layer", "score")
NEURON_COLUMNS = ("method", "layer", "unit", "score", "generic")


def pandas() -> Any:
    """The pandas module, or an ImportError that says how to install it."""
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError("report DataFrames need pandas: pip install pandas (or pip install 'knowmri[data]')") from err
    return pd


def frame(rows: list[dict[str, Any]], first: tuple[str, ...]) -> Any:
    """A DataFrame of `rows` with the `first` columns leading, then the others in the order they appear."""
    columns = list(first)
    for row in rows:
        columns += [k for k in row if k not in columns]
    return pandas().DataFrame(rows, columns=columns)


def _ok(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, findings) of the results that ran, from MethodResult objects or their dicts."""
    out = []
    for name, r in results.items():
        status = r.get("status", "ok") if isinstance(r, dict) else r.status
        findings = (r.get("findings") if isinstance(r, dict) else r.findings) or {}
        if status == "ok":
            out.append((name, findings))
    return out


def _roles(findings: dict[str, Any], others: list[dict[str, Any]]) -> list | None:
    """A per-position list of token roles: the result's own `roles`, else another result's on the same tokens."""
    for source in [findings, *others]:
        roles = source.get("roles")
        same_tokens = source is findings or (findings.get("tokens") is not None
                                             and source.get("tokens") == findings.get("tokens"))
        if same_tokens and isinstance(roles, list) and all(isinstance(r, str) or r is None for r in roles):
            return roles
    return None


def token_rows(results: dict[str, Any], **extra: Any) -> list[dict[str, Any]]:
    """One row per method and scored token; `role` from the entry, else from the findings' `roles`, else None."""
    ok = _ok(results)
    rows = []
    for name, findings in ok:
        scores = findings.get("token_scores") or []
        roles = _roles(findings, [f for _, f in ok]) if scores else None
        for entry in scores:
            index = entry.get("index")
            role = entry.get("role")
            if role is None and roles is not None and isinstance(index, int) and 0 <= index < len(roles):
                role = roles[index]
            rest = {k: v for k, v in entry.items() if k not in ("index", "token", "score", "role")}
            rows.append({"method": name, **extra, "index": index, "token": entry.get("token"), "role": role,
                         "score": entry.get("score"), **rest})
    return rows


def layer_rows(results: dict[str, Any], **extra: Any) -> list[dict[str, Any]]:
    """One row per method and layer of `layer_scores` (with `basis`, what the method measures, where it says)."""
    rows = []
    for name, findings in _ok(results):
        basis = findings.get("layer_scores_kind") or findings.get("layer_scores_basis")
        for entry in findings.get("layer_scores") or []:
            rest = {k: v for k, v in entry.items() if k not in ("layer", "score")}
            row = {"method": name, **extra, "layer": entry.get("layer"), "score": entry.get("score"), **rest}
            if basis is not None:
                row["basis"] = basis
            rows.append(row)
    return rows


def neuron_rows(results: dict[str, Any], **extra: Any) -> list[dict[str, Any]]:
    """One row per method and neuron of `neurons`, best first (`rank` from 1); `expert` where a neuron has one."""
    rows = []
    for name, findings in _ok(results):
        for rank, entry in enumerate(findings.get("neurons") or [], start=1):
            row = {"method": name, **extra, "layer": entry.get("layer"), "unit": entry.get("unit")}
            if "expert" in entry:
                row["expert"] = entry["expert"]
            row.update({"score": entry.get("score"), "generic": bool(entry.get("generic", False)), "rank": rank})
            row.update({k: v for k, v in entry.items() if k not in row})
            rows.append(row)
    return rows


def per_sample_results(records: list[dict[str, Any]], directory: str | Path | None) -> list[tuple[Any, dict[str, Any]]]:
    """(sample index, its results) of a dataset report's records: held on the record (`results`), or in the
    per-sample file the record names (`file`, relative to the run `directory`)."""
    out = []
    for record in records or []:
        results = record.get("results")
        if results is None and record.get("file") and directory is not None:
            path = Path(directory) / record["file"]
            if path.is_file():
                results = json.loads(path.read_text(encoding="utf-8")).get("results")
        if isinstance(results, dict):
            out.append((record.get("index"), results))
    return out


def neurons_columns(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The leading neuron columns, `expert` among them when a row has one."""
    if any("expert" in r for r in rows):
        return ("method", "layer", "unit", "expert", "score", "generic")
    return NEURON_COLUMNS

"""Keep the facts a model answers correctly (its own top-1 next token starts the answer) and write them as data files.

One forward per prompt. The kept subsets are written into the model's result folder, in the formats the
dataset CLI reads (`known_1000`'s own JSON; template-key JSON for the others), so that each claim's
dataset run is one `knowmri diagnose --dataset ... --path ...` command on exactly those facts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def answers(model: Any, prompt: str, answer: str) -> bool:
    """Whether the model's top-1 next token after `prompt` is the first token of `answer` (a space-led word)."""
    enc = model.encode(prompt, answer)
    with torch.inference_mode():
        logits = model.forward(**enc.inputs())
    return int(logits[0, enc.pred_pos].argmax()) == int(enc.target_ids[0])


def known_1000(model: Any, path: Path, want: int, out: Path) -> dict[str, Any]:
    """The first `want` records of known_1000 the model answers correctly, written to `out` (known_1000's format)."""
    if out.exists():
        meta = json.loads(out.with_suffix(".meta.json").read_text())
        if meta["kept"] >= want or meta["scanned"] >= meta["total"]:
            return meta
    records = json.loads(path.read_text())
    kept, scanned = [], 0
    for rec in records:
        if len(kept) >= want:
            break
        scanned += 1
        if answers(model, rec["prompt"], " " + str(rec["attribute"]).strip()):
            kept.append(rec)
    meta = {"source": str(path), "total": len(records), "scanned": scanned, "kept": len(kept),
            "accuracy": len(kept) / max(scanned, 1)}
    _write(out, kept, meta)
    return meta


def pararel(model: Any, folder: Path, want: int, out: Path, prompts: int = 3, tries: int = 6) -> dict[str, Any]:
    """`want` PARAREL tuples, taken in turn from each relation, of which the model answers at least 2 of the
    first `tries` paraphrased prompts correctly; each keeps up to `prompts` of its correctly answered prompts."""
    if out.exists():
        meta = json.loads(out.with_suffix(".meta.json").read_text())
        if meta["kept"] >= want:
            return meta
    import knowmri as km

    ds = km.load_dataset("pararel", path=folder)
    by_relation: dict[str, list[Any]] = {}
    for s in ds:
        by_relation.setdefault(s["relation_id"], []).append(s)
    queues = [list(v) for _, v in sorted(by_relation.items())]
    kept, scanned, depth = [], 0, 0
    while len(kept) < want and any(depth < len(q) for q in queues) and depth < 25:
        for q in queues:
            if depth >= len(q) or len(kept) >= want:
                continue
            s = q[depth]
            scanned += 1
            good, asked = [], s["prompts"][:tries]
            for j, p in enumerate(asked):  # stop once 2 right answers are out of reach, or `prompts` are found
                if len(good) + len(asked) - j < 2 or len(good) >= prompts:
                    break
                if answers(model, p, s["ground_truth"]):
                    good.append(p)
            if len(good) >= 2:
                good = good[:prompts]
                kept.append({"prompt": good[0], "prompts": good, "ground_truth": s["ground_truth"],
                             "triple_subject": s["triple_subject"], "triple_object": s["triple_object"],
                             "relation_id": s["relation_id"]})
        depth += 1
    meta = {"source": str(folder), "total": len(ds), "scanned": scanned, "kept": len(kept),
            "accuracy": len(kept) / max(scanned, 1), "relations": len({k["relation_id"] for k in kept}),
            "rule": f"at least 2 of the first {tries} prompts answered top-1; up to {prompts} of them kept"}
    _write(out, kept, meta)
    return meta


def prompts_only(src: Path, out: Path) -> Path:
    """The kept known_1000 facts as bare {prompt, ground_truth} records (no subject: a method reads the prompt's last token)."""
    records = json.loads(src.read_text())
    out.write_text(json.dumps([{"prompt": r["prompt"], "ground_truth": " " + str(r["attribute"]).strip()}
                               for r in records], indent=1) + "\n")
    return out


def _write(out: Path, kept: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(kept, indent=1) + "\n")
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=1) + "\n")

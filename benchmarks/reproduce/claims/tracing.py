"""ROME causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", NeurIPS).

On GPT-2 XL over 1,000 known facts: average total effect 18.6%; the hidden state's average indirect effect
(AIE) peaks at 8.7% at the last subject token, layer 15 of 48; the MLP's at 6.6% at the last subject token
in early-middle layers; attention's at the last token in late layers, 1.6% at the last subject token.
Here: `causal_tracing` at its defaults (ROME's protocol: noise 3x the embedding std on the subject, 10 noise
samples, a window of 10/48 of the depth for MLP and attention) on known_1000 facts the model answers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.reproduce import common as c

NAME = "tracing"
TITLE = "ROME causal tracing"
PAPER = ("Meng et al. 2022, GPT-2 XL, 1,000 known facts: average total effect 18.6%; hidden-state AIE peaks at 8.7% at "
         "the last subject token, layer 15 of 48; MLP AIE 6.6% at the last subject token, early-middle layers; "
         "attention's effect at the last token in late layers, 1.6% at the last subject token")
DATA = "known_1000 (facts the model answers top-1)"
METHOD = "causal_tracing"
ROLES = ("subject_first", "subject_middle", "subject_last", "subsequent_first", "further", "last")


def plan(ctx: c.Ctx) -> dict[str, Any]:
    return {"samples": ctx.n(100, 3), "dataset": "known_1000", "path": ctx.dir / "facts" / "known_1000.json"}


def command(ctx: c.Ctx) -> list[str]:
    return c.diagnose_cmd(ctx, NAME, methods=METHOD, **plan(ctx))


def run(ctx: c.Ctx) -> None:
    c.run_diagnose(ctx, NAME, methods=METHOD, timeout=2 * ctx.budget if ctx.budget else None, **plan(ctx))  # the headline row gets twice the time


def compute(ctx: c.Ctx) -> dict[str, Any]:
    runs = c.samples(ctx.run_dir(NAME))
    te: list[float] = []
    cells: dict[str, dict[str, list[np.ndarray]]] = {k: {r: [] for r in ROLES} for k in ("hidden", "mlp", "attn")}
    n_layers = None
    for data in runs:
        f = c.ok(data, METHOD)
        if f is None:
            continue
        te.append(float(f["high_score"]) - float(f["low_score"]))
        low, roles = float(f["low_score"]), f["roles"]
        for kind in cells:
            grid = np.asarray(f.get(kind) or [], dtype=float)
            if grid.size == 0:
                continue
            n_layers = grid.shape[1]
            for role in ROLES:
                rows = [i for i, r in enumerate(roles) if r == role and i < grid.shape[0]]
                if rows:
                    cells[kind][role].append(grid[rows].mean(0) - low)
    result: dict[str, Any] = {"claim": NAME, "model": ctx.model, "n": len(te), "target": plan(ctx)["samples"],
                              "command": c.shown(command(ctx)), "compute_seconds": c.seconds(runs),
                              "n_layers": n_layers, "total_effect": c.ci(te), "aie": {}, "peaks": {}}
    for kind, by_role in cells.items():
        result["aie"][kind] = {}
        for role, rows in by_role.items():
            if not rows:
                continue
            arr = np.stack(rows)
            stats = [c.ci(arr[:, j].tolist()) for j in range(arr.shape[1])]
            result["aie"][kind][role] = stats
            best = int(np.argmax([s["mean"] for s in stats]))
            result["peaks"].setdefault(kind, {})[role] = {"layer": best, "depth": best / max(arr.shape[1] - 1, 1),
                                                          **stats[best]}
    result["verdict"], result["why"] = verdict(result)
    return result


def verdict(r: dict[str, Any]) -> tuple[str, str]:
    pk = r["peaks"]
    if r["n"] < 2 or not all(k in pk for k in ("hidden", "mlp", "attn")):
        return "not measured", "fewer than 2 traced facts"
    h, m = pk["hidden"].get("subject_last"), pk["mlp"].get("subject_last")
    a_last, a_subj = pk["attn"].get("last"), pk["attn"].get("subject_last")
    checks = {
        "hidden AIE at the last subject token is positive (CI above 0)": bool(h and h["low"] > 0),
        "the MLP's AIE at the last subject token peaks in the first 60% of the layers": bool(m and m["depth"] <= 0.6),
        "the MLP's AIE at the last subject token exceeds attention's there": bool(m and a_subj and m["mean"] > a_subj["mean"]),
        "attention's AIE at the last token peaks in the second half of the layers": bool(a_last and a_last["depth"] >= 0.5),
        "attention's AIE is larger at the last token than at the last subject token": bool(
            a_last and a_subj and a_last["mean"] > a_subj["mean"]),
    }
    failed = [k for k, v in checks.items() if not v]
    close = h and h["low"] <= 0.087 <= h["high"] and r["total_effect"]["low"] <= 0.186 <= r["total_effect"]["high"]
    if not failed:
        return ("reproduced" if close else "reproduced in shape",
                "every qualitative pattern holds" + ("" if close else "; the magnitudes differ from GPT-2 XL's "
                                                     "(another model and size), so only the shape is compared"))
    return ("partly reproduced" if len(failed) <= 2 else "not reproduced"), c.not_true(failed, len(checks))


def cell(r: dict[str, Any]) -> str:
    from benchmarks.reproduce.page import pct

    h = r["peaks"].get("hidden", {}).get("subject_last")
    m = r["peaks"].get("mlp", {}).get("subject_last")
    return (f"TE {pct(r['total_effect'])}; hidden AIE at last subject token {pct(h)} at layer "
            f"{h['layer'] if h else '?'}/{r['n_layers']}; MLP {pct(m)} at layer {m['layer'] if m else '?'}"
            if h else "n/a")


def details(r: dict[str, Any]) -> list[str]:
    from benchmarks.reproduce.page import pct

    lines = [f"Average total effect (P clean - P corrupted): {pct(r['total_effect'])}; paper 18.6%.", "",
             "| state | role | peak layer (of {}) | AIE at the peak (95% CI) | paper |".format(r["n_layers"]),
             "|---|---|---|---|---|"]
    paper = {("hidden", "subject_last"): "8.7%, layer 15 of 48", ("mlp", "subject_last"): "6.6%, early-middle",
             ("attn", "subject_last"): "1.6%", ("attn", "last"): "late layers"}
    for kind in ("hidden", "mlp", "attn"):
        for role in ("subject_last", "last", "subject_first", "subsequent_first"):
            p = r["peaks"].get(kind, {}).get(role)
            if p:
                lines.append(f"| {kind} | {role.replace('_', ' ')} | {p['layer']} | {pct(p)} | "
                             f"{paper.get((kind, role), '')} |")
    return lines


def figure(plt: Any, results: dict[str, dict[str, Any]], path: Any) -> bool:
    """ROME's role x layer AIE heatmaps: one row per model, one column per state."""
    rows = [(m, r) for m, r in results.items() if r.get("aie", {}).get("hidden")]
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 2.6 * len(rows)), squeeze=False)
    for i, (m, r) in enumerate(rows):
        for j, (kind, cmap) in enumerate((("hidden", "Purples"), ("mlp", "Greens"), ("attn", "Reds"))):
            by_role = r["aie"].get(kind, {})
            roles = [x for x in ROLES if x in by_role]
            grid = [[cell_["mean"] for cell_ in by_role[x]] for x in roles]
            ax = axes[i][j]
            if grid:
                im = ax.imshow(grid, aspect="auto", cmap=cmap)
                fig.colorbar(im, ax=ax, fraction=0.04)
                ax.set_yticks(range(len(roles)), [x.replace("_", " ") for x in roles], fontsize=7)
            ax.set_title(f"{m}: {kind} AIE (n={r['n']})", fontsize=9)
            ax.set_xlabel("layer", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True

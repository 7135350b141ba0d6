"""Patchscopes (Ghandeharioun et al. 2024, "Patchscopes: A Unifying Framework for Inspecting Hidden
Representations of Language Models", ICML).

Two of the paper's findings: (1) entity resolution: the few-shot entity-description patchscope, fed the last
subject token's hidden state, names the subject at a rate that rises over the early-middle layers and then falls;
(2) the token-identity patchscope ("cat->cat; 1135->1135; hello->hello; ?") reads the next token from the last
position's hidden state with a higher precision@1 than the logit lens from the middle layers on.
Here: (1) `patchscopes` at its defaults on known_1000 facts the model answers; (2) `patchscopes` with the
identity prompt and one decoded token, and `logit_lens` at the last position, on the same facts as bare
prompts (no subject, so the source is the prompt's last token). The model answers these facts, so its final
top-1 token is the answer's first token: precision@1 at a layer is the share of facts whose read-out there is it.
"""

from __future__ import annotations

from typing import Any

from benchmarks.reproduce import common as c

NAME = "patchscopes"
TITLE = "Patchscopes"
PAPER = ("Ghandeharioun et al. 2024: entity resolution rises over early-middle layers then falls; the token-identity "
         "patchscope beats the logit lens on next-token precision@1 from mid layers")
DATA = "known_1000 (facts the model answers top-1)"
IDENTITY = "cat->cat; 1135->1135; hello->hello; ?"
IDENTITY_PARAMS = [f"patchscopes.target_prompt={IDENTITY}", "patchscopes.max_new_tokens=1", "logit_lens.positions=last"]


def plan(ctx: c.Ctx) -> dict[str, Any]:
    return {"samples": ctx.n(100, 4), "path": ctx.dir / "facts" / "known_1000.json",
            "prompts": ctx.dir / "facts" / "known_1000_prompts.json"}


def commands(ctx: c.Ctx) -> dict[str, list[str]]:
    p = plan(ctx)
    return {"entity": c.diagnose_cmd(ctx, NAME, "known_1000", p["path"], p["samples"], "patchscopes"),
            "identity": c.diagnose_cmd(ctx, NAME + "_identity", str(p["prompts"]), None, p["samples"],
                                       "patchscopes,logit_lens", IDENTITY_PARAMS)}


def run(ctx: c.Ctx) -> None:
    p = plan(ctx)
    c.run_diagnose(ctx, NAME + "_identity", str(p["prompts"]), None, p["samples"], "patchscopes,logit_lens",
                   IDENTITY_PARAMS, timeout=ctx.budget / 2 if ctx.budget else None)
    c.run_diagnose(ctx, NAME, "known_1000", p["path"], p["samples"], "patchscopes",
                   timeout=ctx.budget / 2 if ctx.budget else None)


def compute(ctx: c.Ctx) -> dict[str, Any]:
    entity_runs = c.samples(ctx.run_dir(NAME))
    rates = [[float(x["rate"]) for x in f["decode_rate"]] for d in entity_runs if (f := c.ok(d, "patchscopes"))]
    ident_runs = c.samples(ctx.run_dir(NAME + "_identity"))
    ps_hits, ll_hits = [], []
    for d in ident_runs:
        ps, ll = c.ok(d, "patchscopes"), c.ok(d, "logit_lens")
        if ps is None or ll is None:
            continue
        want = ll["target_token"]
        ps_hits.append([float(bool(row) and row[0] == want) for row in ps["decoded_tokens"]])
        ll_hits.append([float(r == 1) for r in ll["target_rank"]])
    n_layers = len(rates[0]) if rates else (len(ps_hits[0]) if ps_hits else 0)
    entity = [c.ci([r[j] for r in rates]) for j in range(len(rates[0]))] if rates else []
    ps_curve = [c.ci([h[j] for h in ps_hits]) for j in range(len(ps_hits[0]))] if ps_hits else []
    ll_curve = [c.ci([h[j] for h in ll_hits]) for j in range(len(ll_hits[0]))] if ll_hits else []
    half = n_layers // 2
    diff = [sum(p[j] - q[j] for j in range(half, len(p))) / max(len(p) - half, 1) for p, q in zip(ps_hits, ll_hits)]
    cmds = commands(ctx)
    result = {"claim": NAME, "model": ctx.model, "n": min(len(rates), len(ps_hits)), "n_entity": len(rates),
              "n_identity": len(ps_hits), "target": plan(ctx)["samples"], "n_layers": n_layers,
              "command": c.shown(cmds["entity"]), "identity_command": c.shown(cmds["identity"]),
              "compute_seconds": c.seconds(entity_runs) + c.seconds(ident_runs),
              "entity_rate": entity, "identity_p1": ps_curve, "logit_lens_p1": ll_curve,
              "identity_minus_lens_second_half": c.ci(diff)}
    if entity:
        means = [e["mean"] for e in entity]
        best = max(range(len(means)), key=means.__getitem__)
        result["entity_peak"] = {"layer": best, "depth": best / max(len(means) - 1, 1), **entity[best],
                                 "last_layer": entity[-1]["mean"], "first_layer": entity[0]["mean"]}
    result["verdict"], result["why"] = verdict(result)
    return result


def verdict(r: dict[str, Any]) -> tuple[str, str]:
    if r["n_entity"] < 2 or r["n_identity"] < 2:
        return "not measured", "fewer than 2 facts in one of the two runs"
    pk, d = r.get("entity_peak"), r["identity_minus_lens_second_half"]
    rises_falls = bool(pk and pk["mean"] > 0 and 0 < pk["depth"] <= 0.7
                       and pk["last_layer"] < pk["mean"] and pk["first_layer"] < pk["mean"])
    beats = d["low"] > 0
    text = (f"entity decode rate peaks at {pk['mean']:.0%} at layer {pk['layer']} of {r['n_layers']} "
            f"(first layer {pk['first_layer']:.0%}, last {pk['last_layer']:.0%}); " if pk else "")
    text += f"identity minus logit lens precision@1 over the second half of the layers: {d['mean']:+.2f}"
    if rises_falls and beats:
        return "reproduced in shape", text
    if rises_falls or beats:
        return "partly reproduced", text + ("" if rises_falls else "; the entity rate does not rise then fall") + (
            "" if beats else "; the identity patchscope does not beat the logit lens (CI not above 0)")
    return "not reproduced", text


def cell(r: dict[str, Any]) -> str:
    from benchmarks.reproduce.page import num

    pk = r.get("entity_peak")
    return ((f"entity decode peaks {pk['mean']:.0%} at layer {pk['layer']}/{r['n_layers']} (last layer "
             f"{pk['last_layer']:.0%}); " if pk else "")
            + f"identity - logit lens p@1, second half: {num(r['identity_minus_lens_second_half'])}")


def details(r: dict[str, Any]) -> list[str]:
    from benchmarks.reproduce.page import pct

    lines = [f"Entity resolution on {r['n_entity']} facts, token identity on {r['n_identity']}.", "",
             "| layer | entity decode rate | identity patchscope p@1 | logit lens p@1 |", "|---|---|---|---|"]
    for j in range(r["n_layers"]):
        e = r["entity_rate"][j] if j < len(r["entity_rate"]) else None
        p = r["identity_p1"][j] if j < len(r["identity_p1"]) else None
        q = r["logit_lens_p1"][j] if j < len(r["logit_lens_p1"]) else None
        lines.append(f"| {j} | {pct(e, 0)} | {pct(p, 0)} | {pct(q, 0)} |")
    return lines


def figure(plt: Any, results: dict[str, dict[str, Any]], path: Any) -> bool:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for m, r in results.items():
        for ax, key, label in ((axes[0], "entity_rate", "entity"), (axes[1], "identity_p1", "identity"),
                               (axes[1], "logit_lens_p1", "logit lens")):
            curve = r.get(key) or []
            if not curve:
                continue
            x = [j / max(len(curve) - 1, 1) for j in range(len(curve))]
            ax.plot(x, [p["mean"] for p in curve], ls="-" if label != "logit lens" else ":", label=f"{m} {label}")
    axes[0].set_title("Entity resolution: decode rate by layer")
    axes[1].set_title("Next-token precision@1 by layer")
    for ax in axes:
        ax.set_xlabel("relative depth (layer / last layer)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True

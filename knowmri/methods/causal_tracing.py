"""Causal tracing (Meng et al. 2022, ROME): corrupt the subject, restore one clean state at a time,
and see which (token, layer) states bring the answer back.

The subject tokens' embeddings get Gaussian noise (`noise` x the std of the token embeddings as the
embedding module outputs them, scale included; ROME uses 3 x the std of subject-token embeddings), `samples` draws with a
fixed seed shared by every cell. For every token and layer, the clean hidden state (the block's
output), or the clean MLP / attention output over a `window` of layers centred like ROME (by default
scaled to depth as ROME's 10 of 48 layers), is put back into the corrupted run; the score is
P(answer's first token) averaged over the noise samples. The batched engine lives in
`knowmri.methods.tracing_engine`; it keeps every noise sample's P, which gives the uncertainty.

Findings: the grids `hidden`, `mlp`, `attn` ([token][layer] probabilities), `high_score` (clean)
and `low_score` (corrupted); `token_scores` are each token's largest indirect effect (restored
minus corrupted P) over layers in the hidden grid, `layer_scores` each layer's largest over
tokens in the MLP grid (`*_kind` says which grid when a kind was not traced); `peaks` gives
each grid's best cell, and `sites` the same cells as hook sites, best first: the MLP's (the state
ROME edits), the attention's, then the hidden state's (it restores everything, so localises least).

Uncertainty (over the noise samples): `hidden_stderr`, `mlp_stderr`, `attn_stderr` are each cell's
standard error ([token][layer], like the grids); each peak carries its indirect effect's 95% t-interval
(`ci`, paired with the corrupted run's samples) and the range of its layer over bootstrap resamples of
the noise (`layer_range`). `roles` are ROME's token roles (`knowmri.token_roles`), `role_effects` the
largest indirect effect per kind and role with its interval; `warnings` say when the read-out is weak
(a small drop, a recovery above 100%, an interval that includes 0, one noise sample), and `holds` is
False when the corruption barely changes the answer or no restoration's effect is distinguishable from 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.hooks import expert_site, site
from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import prepare
from knowmri.methods.expert_tracing import expert_findings, trace_experts
from knowmri.methods.tracing_engine import auto_window, subject_noise, trace
from knowmri.methods.tracing_evidence import Evidence
from knowmri.methods.weight_cache import embedding_std
from knowmri.report import figures
from knowmri.sample import Sample
from knowmri.stats import LEVEL
from knowmri.token_roles import span_roles

KINDS = ("hidden", "mlp", "attn")
_LABEL = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
_COLOURS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_SITES = {"mlp": "mlp.out", "attn": "attn.out", "hidden": "resid_post"}  # hook site restored per kind, best first


@dataclass
class CausalTracingParams(Params):
    noise: float = field(default=3.0, metadata={"help": "noise std, in units of the std of the token embeddings "
                                                        "as the embedding outputs them (ROME: 3)"})
    samples: int = field(default=10, metadata={"help": "noise samples averaged per cell"})
    window: int = field(default=0, metadata={"help": "layers restored around each layer for MLP and attention; "
                                                     "0: scaled to depth like ROME's 10 of 48, round(L x 10/48)"})
    kinds: list = field(default_factory=lambda: list(KINDS),
                        metadata={"help": "states to restore: hidden, mlp, attn (comma-separated subset)"})
    seed: int = field(default=1, metadata={"help": "seed of the noise (the same noise for every cell)"})
    batch_size: int = field(default=128, metadata={"help": "rows (cells x noise samples) of whole prompts per forward "
                                                                "pass (more rows when only a suffix is re-run)"})

    def validate(self) -> None:
        if not 0.0 < self.noise <= 100.0:
            raise ValueError("noise must be in (0, 100] (a multiple of the embedding std)")
        if not 1 <= self.samples <= 1000:
            raise ValueError("samples must be between 1 and 1000")
        if not 0 <= self.window <= 1000:
            raise ValueError("window must be between 1 and 1000 layers, or 0 for the depth-scaled default")
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"kinds must be a non-empty subset of {', '.join(KINDS)}, got {self.kinds!r}")
        self.kinds = [k for k in KINDS if k in self.kinds]
        if not 1 <= self.batch_size <= 65536:
            raise ValueError("batch_size must be between 1 and 65536")


@register_method
class CausalTracing(Method):
    name = "causal_tracing"
    title = "Causal tracing"
    path = ("Internal", "Module", "Hidden, MLP, Attention")
    paper = "Meng et al. 2022, 'Locating and Editing Factual Associations in GPT' (ROME)"
    description = ("Corrupts the subject's embeddings with noise and restores clean hidden states, MLP and "
                   "attention outputs one (token, layer) at a time to find the states that recall the fact.")
    requires_keys = ("prompt", "triple_subject")
    requires_capabilities = ()
    Params = CausalTracingParams

    def check(self, model: Any, sample: Sample) -> list[str]:
        if model.kind == "seq2seq":
            return ["causal tracing restores the states of one stack that reads the subject; "
                    "encoder-decoder models are not supported"]
        return []

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """The engine's passes (`tracing_engine.trace`): the embedding std, the clean and the corrupted run (full
        logits, kept to the end with the corrupted run's cache), then per kind and restored token the
        staircase batches of rows over blocks start..L-1 (on a causal model only positions t..T-1 over
        the corrupted prefix, `batch_size` x T / (T - t) rows' worth of tokens per batch, with the rows that
        are still equal shared and the MLP window's first block skipped, `staircase_cost`; otherwise whole
        prompts, `batch_size` rows), each read out at the last position."""
        from knowmri.methods.costs import Dims, Pass, elementwise_seconds, prepare_passes, sample_shape, work_estimate
        from knowmri.methods.tracing_engine import restore_starts, staircase_cost, suffix_pays

        p = params if isinstance(params, CausalTracingParams) else CausalTracingParams()
        shape = sample_shape(model, sample)
        dims = Dims.of(model)
        L, S = dims.layers, p.samples
        window = p.window or auto_window(L)
        T = shape.prompt if model.kind == "causal" else shape.input
        first = shape.subject[0] if shape.subject is not None and model.kind == "causal" else 0
        cells = range(min(first, T - 1), T)
        n_run = max(S, 2)
        suffix = model.kind == "causal" and suffix_pays(model, T, first, S, list(p.kinds), window)
        passes = [*prepare_passes(model, shape), Pass(tokens=T, readout=T),
                  Pass(rows=n_run, tokens=T, readout=n_run * T, cache=suffix),
                  Pass(rows=S, tokens=T, readout=S, model_call=False)]
        starts = {kind: restore_starts(kind, window, L) for kind in p.kinds}
        if suffix:
            for t in cells:  # a checked suffix runner per token: two recordings (one block computed), a check
                passes += [Pass(rows=b, tokens=T - t, blocks=1, context=T, readout=b, cache=True) for b in (1, 2)]
                passes.append(Pass(rows=1, tokens=T - t, context=T, readout=1, model_call=False))
            for kind in p.kinds:
                for t in cells:
                    per = max(1, p.batch_size * T // ((T - t) * S))
                    for i in range(0, L, per):
                        layers = range(i, min(L, i + per))
                        calls, groups = staircase_cost(kind, list(layers), starts[kind], window, L, kind == "mlp")
                        span = L - min(starts[kind][layer] for layer in layers) - (kind == "mlp")
                        passes.append(Pass(rows=S * groups, tokens=T - t, blocks=calls / groups, span=span, context=T,
                                           readout=S * groups, model_call=False))
        else:
            per = max(1, p.batch_size // S)
            for kind in p.kinds:
                for layer in range(L):
                    for i in range(0, len(cells), per):
                        rows = S * len(cells[i:i + per])
                        passes.append(Pass(rows=rows, tokens=T, blocks=L - starts[kind][layer], context=T, readout=rows,
                                           model_call=False))
        if model.moe_layers and "mlp" in p.kinds and model.kind == "causal":  # single experts (`expert_tracing`)
            passes += [Pass(tokens=T, readout=1), Pass(rows=S, tokens=T, readout=S)]  # clean and corrupted reads
            cells, per = len(model.moe_layers) * model.n_experts, max(1, p.batch_size // S)
            for t in sorted({T - 1, (shape.subject[1] - 1) if shape.subject is not None else T - 1}):
                passes.append(Pass(rows=S, tokens=t, readout=S, cache=True, count=1 if t else 0))  # corrupted prefix
                passes += [Pass(rows=S * min(per, cells - i), tokens=T - t, context=T, readout=S * min(per, cells - i),
                                cache=bool(t)) for i in range(0, cells, per)]
        std = elementwise_seconds(model, dims.vocab * dims.d * (dims.bytes + 16))  # the embedding's std, in float64
        kept = (n_run * T * dims.vocab * dims.bytes + (n_run * T * 2 * dims.kv * dims.bytes * L if suffix else 0)
                + (len(p.kinds) + S + 1) * (L + 1) * T * dims.d * dims.bytes)  # corrupted logits and cache, states
        return work_estimate(model, passes, seconds=std, memory=kept)


    @torch.inference_mode()
    def run(self, model: Any, sample: Sample, params: CausalTracingParams, ctx: RunContext) -> MethodResult:
        prep = prepare(model, sample, need_subject=True)
        enc, span = prep.enc, prep.subject
        n_tok = enc.prompt_len if model.kind == "causal" else enc.input_ids.shape[1]
        ids = enc.input_ids[:, :n_tok]
        key = ("embedding_std", id(model.embed_module.weight))
        if key not in ctx.cache:
            ctx.cache[key] = embedding_std(model)
        noise_std = params.noise * ctx.cache[key]
        noise = subject_noise(model, params.samples, len(span), noise_std, params.seed)
        L = model.n_layers
        window = params.window or auto_window(L)
        res = trace(model, ids, enc.pred_pos, enc.target_ids[0], span, noise, params.kinds, window,
                    params.batch_size, ctx.progress)
        tokens = prep.tokens[:n_tok]
        answer = model.tokenizer.decode([enc.target_ids[0]])
        low = res.low
        ev = Evidence(res, params.seed)
        grids = {k: g.tolist() for k, g in res.grids.items()}
        token_kind = "hidden" if "hidden" in grids else params.kinds[0]
        layer_kind = "mlp" if "mlp" in grids else params.kinds[0]
        peaks = {k: ev.peak(k, tokens) for k in res.grids}
        roles = span_roles(n_tok, span.start, span.stop)
        warnings = _warnings(res, peaks, params.samples)
        found = [k for k, pk in peaks.items() if pk["ci"][0] > 0]
        result = self.new_result(params)
        result.findings = {
            **grids, **{f"{k}_stderr": ev.stderr[k].tolist() for k in res.grids},
            "high_score": res.high, "low_score": low, "low_stderr": ev.low_stderr,
            "token_scores": [{"index": t, "token": tokens[t], "score": float(res.grids[token_kind][t].max()) - low}
                             for t in range(n_tok)],
            "token_scores_kind": token_kind,
            "layer_scores": [{"layer": layer, "score": float(res.grids[layer_kind][:, layer].max()) - low}
                             for layer in range(L)],
            "layer_scores_kind": layer_kind,
            "peaks": peaks, "sites": [{"site": site(p["layer"], _SITES[k]), "position": p["token"], "token": p["token_text"],
                                       "score": p["effect"], "kind": k, "ci": p["ci"],
                                       "window": 1 if k == "hidden" else window}
                      for k in _SITES if (p := peaks.get(k))],
            "roles": roles, "role_effects": {k: ev.role_effects(k, roles, tokens) for k in res.grids},
            "subject_span": {"start": span.start, "stop": span.stop},
            "subject_tokens": tokens[span.start:span.stop], "tokens": tokens, "position": enc.pred_pos,
            "answer": prep.answer, "answer_token": answer, "answer_source": prep.answer_source,
            "noise_std": noise_std, "noise_samples": params.samples, "window": window,
            "window_auto": params.window == 0, "engine": res.engine,
            "holds": not _negligible(res) and bool(found), "warnings": warnings,
        }
        result.summary = _summary(res, peaks, tokens, span, enc.pred_pos, answer, sample["triple_subject"], params,
                                  window, ev) + "".join(f" Warning: {w}" for w in warnings)
        if model.moe_layers and "mlp" in params.kinds and model.kind == "causal" and enc.pred_pos == n_tok - 1:
            self._experts(model, result, ids, enc, span, noise, tokens, answer, params, ctx)
        labels = [f"{t}:{tok}{'*' if t in span else ''}" for t, tok in enumerate(tokens)]
        for kind, grid in grids.items():
            what = _LABEL[kind] + ("" if kind == "hidden" else f" (window {window})")
            fig = figures.heatmap(grid, x=list(range(L)), y=labels, title=f"Restoring the {what}: P({answer!r})",
                                  x_title="layer", y_title="token (* subject)", colorscale=_COLOURS[kind],
                                  zmin=low, colorbar="p", reverse_y=True)
            trace_ = fig["data"][0]
            trace_["customdata"] = ev.stderr[kind].tolist()
            trace_["hovertemplate"] = (f"layer: %{{x}}<br>token: %{{y}}<br>P: %{{z:.4g}} &plusmn; %{{customdata:.2g}} "
                                       f"(s.e. over {params.samples} noise samples)<extra></extra>")
            result.add_figure(f"Causal trace: {_LABEL[kind]}", fig)
        rows = []
        for kind, grid in res.grids.items():
            flat, se = grid.flatten(), ev.stderr[kind].flatten()
            order = torch.argsort(flat, descending=True)[:5].tolist()
            rows += [[kind, i // L, tokens[i // L], i % L, round(float(flat[i]), 5), round(float(se[i]), 5),
                      round(float(flat[i]) - low, 5)] for i in order]
        result.add_table("Top restored states", ["kind", "token index", "token", "layer", f"P({answer})", "s.e.",
                                                 "indirect effect"], rows)
        result.add_table("Peaks with their uncertainty", ["kind", "token", "layer", "indirect effect",
                                                          f"{LEVEL:.0%} CI", "peak layer over resampled noise"],
                         [[k, pk["token_text"], pk["layer"], round(pk["effect"], 5),
                           f"{pk['ci'][0]:.4f} to {pk['ci'][1]:.4f}", f"{pk['layer_range'][0]}-{pk['layer_range'][1]}"]
                          for k, pk in peaks.items()])
        result.add_table("Clean and corrupted", ["run", f"P({answer})", "s.e."],
                         [["clean", round(res.high, 5), 0.0], ["subject corrupted", round(low, 5), round(ev.low_stderr, 5)]])
        return result

    @staticmethod
    def _experts(model: Any, result: MethodResult, ids: torch.Tensor, enc: Any, span: Any, noise: torch.Tensor,
                 tokens: list[str], answer: str, params: CausalTracingParams, ctx: RunContext) -> None:
        """On a mixture-of-experts model: each expert's contribution restored alone at the subject's last token and
        at the last token (`expert_tracing`), as `experts` findings, a site of kind "expert", a figure and a table."""
        at = sorted({span.stop - 1, enc.pred_pos})
        trace = trace_experts(model, ids, enc.pred_pos, enc.target_ids[0], span, noise, at, params.batch_size)
        found = expert_findings(trace, tokens)
        result.findings["experts"] = found
        peak = found["peak"]
        high = result.findings["high_score"]
        if peak is None or peak["score"] <= 0:
            return
        if peak["ci"][0] > 0:
            result.findings["sites"].append(_expert_site(peak))
        drop = high - trace.low
        share = f"{peak['score'] / drop:.0%} of the drop" if drop > 0 else f"{peak['score']:+.3f}"
        result.summary += (f" Of single experts, restoring expert {peak['expert']} of layer {peak['layer']} at "
                           f"{peak['token']!r} recovers the most ({share}; 95% CI {peak['ci'][0]:.3f} to "
                           f"{peak['ci'][1]:.3f}).")
        for i, p in enumerate(trace.positions):
            result.add_figure(f"Causal trace: experts at {tokens[p]!r}", figures.heatmap(
                trace.grid[i].T.tolist(), x=list(range(model.n_layers)), y=[f"E{e}" for e in range(model.n_experts)],
                title=f"Restoring one expert's output at {tokens[p]!r}: P({answer!r})", x_title="layer",
                y_title="expert", colorscale="Blues", zmin=trace.low, colorbar="p"))
        result.add_table("Top restored experts", ["layer", "expert", "token", "routed in the clean run", "indirect effect",
                                                  "s.e."],
                         [[c["layer"], c["expert"], c["token"], "yes" if c["routed"] else "no", round(c["score"], 5),
                           round(c["stderr"], 5)] for c in found["top"]])


def _expert_site(cell: dict[str, Any]) -> dict[str, Any]:
    return {"site": expert_site(cell["layer"], cell["expert"], "out"), "position": cell["position"], "token": cell["token"],
            "score": cell["score"], "kind": "expert", "ci": cell["ci"], "window": 1, "expert": cell["expert"]}


def _negligible(res: Any) -> bool:
    return res.high - res.low <= 0.05 * res.high or res.high < 1e-6


#: A restoration recovering more than this share of the drop (> 100%, past float noise) is flagged.
OVERSHOOT = 1.05
#: Below this drop (absolute, or as a share of the clean P) recoveries are too noisy to quote.
SMALL_DROP, SMALL_SHARE = 0.05, 0.25


def _warnings(res: Any, peaks: dict, samples: int) -> list[str]:
    high, low = res.high, res.low
    drop = high - low
    out = []
    if samples < 2:
        out.append("one noise sample: no standard error or confidence interval can be given; use samples >= 2.")
    if drop < SMALL_DROP or drop < SMALL_SHARE * high:
        out.append(f"small drop: corrupting the subject lowers P only from {high:.3f} to {low:.3f} "
                   f"(by {drop:.3f}); recovery shares of so small a drop are unreliable.")
    for kind, pk in peaks.items():
        if drop > 0 and pk["effect"] > OVERSHOOT * drop:
            beyond = pk["ci"][0] > drop
            out.append(f"restoring the {_LABEL[kind]} at {pk['token_text']!r}, layer {pk['layer']} raises P above "
                       f"the clean run's ({pk['score']:.3f} > {high:.3f}, {pk['effect'] / drop:.0%} of the drop; "
                       f"{LEVEL:.0%} CI of the effect {pk['ci'][0]:.3f} to {pk['ci'][1]:.3f}): "
                       + ("the restored state does more than undo the noise." if beyond else
                          "within the noise samples' spread, and the best of many cells is biased upwards."))
        if samples > 1 and pk["ci"][0] <= 0:
            out.append(f"the {_LABEL[kind]}'s best effect ({pk['effect']:.3f}) is not distinguishable from 0 "
                       f"({LEVEL:.0%} CI {pk['ci'][0]:.3f} to {pk['ci'][1]:.3f}).")
    return out


def _band(row: torch.Tensor, layer: int, threshold: float) -> tuple[int, int]:
    """The contiguous layers around `layer` where `row` stays at or above `threshold`."""
    a = b = layer
    while a > 0 and row[a - 1] >= threshold:
        a -= 1
    while b < len(row) - 1 and row[b + 1] >= threshold:
        b += 1
    return a, b


def _where(t: int, span: Any, last: int) -> str:
    if t == span.stop - 1:
        return "the subject's last token"
    if t == last:
        return "the last token"
    return "inside the subject" if t in span else "outside the subject"


def _ci(e: dict[str, Any]) -> str:
    return f"indirect effect {e['effect']:.3f}, {LEVEL:.0%} CI {e['ci'][0]:.3f} to {e['ci'][1]:.3f}"


def _summary(res: Any, peaks: dict, tokens: list[str], span: Any, last: int, answer: str, subject: str,
             params: CausalTracingParams, window: int, ev: Evidence) -> str:
    high, low = res.high, res.low
    drop = high - low
    how = "scaled to depth" if params.window == 0 else "as set"
    text = (f"Adding noise ({params.noise:g} x the embedding std, {params.samples} samples) to the subject "
            f"{subject!r} lowers P({answer!r}) from {high:.3f} to {low:.3f}.")
    if _negligible(res):
        return text + (" The corruption barely changes the prediction, so restoring states cannot show where "
                       "the fact is recalled.")
    if any(k != "hidden" for k in peaks):
        text += f" MLP and attention outputs are restored over a window of {window} layer{'s' if window > 1 else ''} ({how})."
    for kind, pk in peaks.items():
        t, layer = pk["token"], pk["layer"]
        row = res.grids[kind][t]
        a, b = _band(row, layer, low + 0.5 * pk["effect"])
        layers = f"layer {layer}" if a == b else f"layers {a}-{b} (peak {layer})"
        spread = pk["layer_range"]
        moves = "" if spread[0] == spread[1] else f"; over resampled noise the peak lies in layers {spread[0]}-{spread[1]}"
        text += (f" Restoring the {_LABEL[kind]} at {tokens[t]!r} ({_where(t, span, last)}) in {layers} recovers "
                 f"{pk['effect'] / drop:.0%} of the drop (P = {pk['score']:.3f}; {_ci(pk)}{moves}).")
    if "hidden" in res.grids and last not in span:
        effect = res.grids["hidden"] - low
        head = effect[:, : max(1, effect.shape[1] // 2)]
        t = max(span, key=lambda i: float(head[i].max()))
        early = [i for i, v in enumerate(effect[t].tolist()) if v >= 0.5 * drop]
        late = [i for i, v in enumerate(effect[last].tolist()) if v >= 0.5 * drop]
        if early:
            which = "the subject's last token" if t == span.stop - 1 else "subject token"
            best = ev.effect("hidden", t, int(effect[t].argmax()))
            text += (f" Early site: {which} {tokens[t]!r} carries the fact in layers {early[0]}-{early[-1]} "
                     f"({_ci(best)})")
            text += f"; late site: the last token, from layer {late[0]} on." if late else "."
        elif late:
            text += f" Late site: the last token carries the fact from layer {late[0]} on."
    return text

"""Neuron read-outs shared by the neuron methods (`knowledge_neurons`, `fine`): the answer's tokens and the
clean neuron activations, neurons' value vectors read in the vocabulary (`value_logits`,
`neuron_top_tokens`, `top_vocabulary`), the final norm's gain, ranking, and the figures both methods draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from knowmri import neuron_units as units
from knowmri.hooks import Hooks
from knowmri.methods.weight_cache import row_norms
from knowmri.models.model import Encoded


def answer_tokens(model: Any, enc: Encoded) -> list[tuple[int, int]]:
    """(position, token id) of each teacher-forced answer token; the BOS token is never a target."""
    bos = getattr(model.tokenizer, "bos_token_id", None)
    pairs = [(p, t) for p, t in zip(enc.target_positions, enc.target_ids) if t != bos]
    if not pairs:
        raise ValueError("the answer has no token to attribute (it is empty or only a BOS token)")
    return pairs


@torch.no_grad()
def clean_neurons(model: Any, enc: Encoded, positions: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward pass: every layer's neurons at `positions` ([n_pos, units] per layer, on that
    layer's device; a mixture-of-experts layer's experts side by side, `knowmri.neuron_units`) and the
    logits [T, vocab]."""
    pos = list(positions)
    with Hooks(model) as h:
        caps = [units.read(h, model, layer, positions=pos) for layer in range(model.n_layers)]
        logits = model.forward(**enc.inputs())
    return [c.value[0] for c in caps], logits[0]


def token_probs(logits: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> list[float]:
    """P(token) at its predicting position, for each (position, token) pair, from logits [T, vocab]."""
    return [float(logits[p].float().softmax(-1)[t]) for p, t in pairs]


def final_norm_gain(model: Any) -> torch.Tensor | None:
    """The final norm's per-dimension gain [d_model] (LayerNorm/RMSNorm weight, Gemma's 1 + w),
    measured as (norm(x) - norm(-x)) / 2x on a zero-mean, unit-RMS x; None without a final norm."""
    norm = model.final_norm
    if norm is None:
        return None
    d = model.d_model
    x = torch.ones(d, device=model.device, dtype=model.dtype)
    x[1::2] = -1.0
    if d % 2:
        x[-1] = 0.0
    with torch.no_grad():
        pos, neg = norm(x[None, None]).float()[0, 0], norm(-x[None, None]).float()[0, 0]
    gain = torch.where(x != 0, (pos - neg) / (2 * x.float()), torch.ones_like(pos))
    return gain


def value_logits(model: Any, layer: int, token_ids: Sequence[int], gain: torch.Tensor | None = None) -> torch.Tensor:
    """[units, n]: each neuron's value vector (times `gain`) dotted with each token's unembedding."""
    device = units.value_vectors(model, layer, [0]).device
    unembed = model.unembedding.detach()[torch.tensor(list(token_ids), device=model.unembedding.device)]
    unembed = unembed.to(device, torch.float32)
    if gain is not None:
        unembed = unembed * gain.to(device)
    return units.value_products(model, layer, unembed)


def neuron_top_tokens(model: Any, neurons: Sequence[tuple[int, int]], k: int = 5,
                      gain: torch.Tensor | None = None) -> list[list[str]]:
    """The `k` vocabulary tokens each neuron's value vector promotes most (through the unembedding)."""
    if not neurons:
        return []
    unembed = model.unembedding  # the parameter itself: its row norms are kept per weight (`weight_derived`)
    rows = [units.value_vectors(model, layer, [unit])[0].detach().float().to(unembed.device) for layer, unit in neurons]
    vectors = torch.stack(rows)
    if gain is not None:
        vectors = vectors * gain.to(unembed.device)
    with torch.no_grad():
        ids = top_vocabulary(unembed, vectors, min(k, unembed.shape[0])).cpu()
    tok = model.tokenizer
    return [[tok.decode([int(t)]) for t in row] for row in ids]


#: Rows of the float32 rescoring shortlist above which a row is scored against the whole vocabulary instead.
SHORTLIST_MAX = 4096


def top_vocabulary(unembed: torch.Tensor, vectors: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] ids of the largest float32 products `vectors` [n, d] @ `unembed` [V, d].T, best first.

    With a float32 unembedding that is the product itself. With a bfloat16/float16 one, a float32 copy
    of the whole matrix (hundreds of MB on a large vocabulary, and most of the time) is avoided: the
    product in the model's dtype gives a shortlist, which is rescored in float32. The shortlist is
    every token whose low-precision score could still reach the k-th best: each product is within
    4 u ||v|| ||e_j|| of the float32 one (u the dtype's unit roundoff; rounding v and the result cost
    at most 2 u ||v|| ||e_j||, by Cauchy-Schwarz), so the top k of the rescored shortlist are those of
    the float32 product. Where the shortlists' union grows past SHORTLIST_MAX tokens (or a product
    overflows float16), the float32 product is taken in full, a block of the vocabulary at a time. Pass the
    weight itself (not a `.detach()`ed view, a new tensor each time), so that its row norms are computed once."""
    vectors = vectors.to(device=unembed.device, dtype=torch.float32)
    if unembed.dtype not in (torch.bfloat16, torch.float16):
        return (vectors @ unembed.to(torch.float32).T).topk(k, dim=-1).indices
    approx = (vectors.to(unembed.dtype) @ unembed.T).float()  # [n, V]
    norms = row_norms(unembed)
    slack = 4 * torch.finfo(unembed.dtype).eps / 2 * vectors.norm(dim=-1, keepdim=True) * norms[None]  # [n, V]
    reach = (approx - slack).topk(k, dim=-1).values[:, -1:]  # the k-th best lower bound of each row
    shortlist = approx + slack >= reach  # [n, V]
    union = shortlist.any(0).nonzero().squeeze(1)
    if not torch.isfinite(approx).all() or len(union) > SHORTLIST_MAX:  # overflow or a wide shortlist: in full
        return _chunked_top(unembed, vectors, k)
    scores = vectors @ unembed[union].float().T  # [n, U]: every row against the shortlists' union, rescored
    scores = scores.masked_fill(~shortlist[:, union], float("-inf"))
    return union[scores.topk(k, dim=-1).indices]


def _chunked_top(unembed: torch.Tensor, vectors: torch.Tensor, k: int, chunk: int = 8192) -> torch.Tensor:
    """`top_vocabulary` of the float32 product, converting `chunk` vocabulary rows to float32 at a time."""
    best_values = best_ids = None
    for first in range(0, unembed.shape[0], chunk):
        scores = vectors @ unembed[first: first + chunk].float().T
        ids = torch.arange(first, first + scores.shape[1], device=scores.device).expand_as(scores)
        if best_values is not None:
            scores, ids = torch.cat([best_values, scores], 1), torch.cat([best_ids, ids], 1)
        best_values, pick = scores.topk(min(k, scores.shape[1]), dim=-1)
        best_ids = ids.gather(1, pick)
    return best_ids


def ranked(scores: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """The `k` highest entries of a [n_layers, d_mlp] score grid as (layer, unit, score), best first."""
    flat = scores.flatten()
    values, idx = flat.topk(min(k, flat.numel()))
    d = scores.shape[1]
    return [(int(i) // d, int(i) % d, float(v)) for v, i in zip(values, idx)]


def neuron_name(neuron: dict[str, Any]) -> str:
    """A finding's neuron as L3.U17, or L3.E5.U17 for neuron 17 of expert 5."""
    expert = neuron.get("expert")
    return f"L{neuron['layer']}.U{neuron['unit']}" if expert is None else f"L{neuron['layer']}.E{expert}.U{neuron['unit']}"


def neuron_label(layer: int, unit: int, tokens: Sequence[str] | None = None, expert: int | None = None) -> str:
    head = neuron_name({"layer": layer, "unit": unit, "expert": expert})
    return f"{head} ({tokens[0].strip() or repr(tokens[0])})" if tokens else head


def grid_figure(scores: torch.Tensor, *, title: str, colorbar: str, columns: int = 64) -> Any:
    """A layer x neuron heatmap; neurons are binned (`columns` bins, each showing its strongest score)."""
    from knowmri.report import figures

    n_layers, d = scores.shape
    width = max(1, -(-d // columns))
    bins = -(-d // width)
    padded = torch.zeros(n_layers, bins * width)
    padded[:, :d] = scores.float()
    grouped = padded.view(n_layers, bins, width)
    z = grouped.gather(-1, grouped.abs().argmax(-1, keepdim=True)).squeeze(-1).tolist()
    labels = [f"{s}-{min(d, s + width) - 1}" if width > 1 else str(s) for s in range(0, d, width)]
    peak = float(scores.abs().max()) or 1.0
    return figures.heatmap(z, x=labels, y=list(range(n_layers)), title=title, x_title="neurons (binned)",
                           y_title="layer", colorscale="RdBu", zmin=-peak, zmax=peak, colorbar=colorbar)


def top_bar_figure(neurons: list[dict[str, Any]], *, title: str, x_title: str) -> Any:
    """Horizontal bars of the top neurons, labelled with the token each one writes most."""
    from knowmri.report import figures

    shown = neurons[:20][::-1]
    labels = [neuron_label(n["layer"], n["unit"], n.get("top_tokens"), n.get("expert")) for n in shown]
    return figures.bars(labels, [n["score"] for n in shown], title=title, x_title=x_title, y_title="neuron",
                        horizontal=True)


#: The columns `screen_cells` fills: a neuron's screen against unrelated facts.
SCREEN_COLUMNS = ("ablated: P(answer) change", "unrelated facts' change", "generic")


def screen_fields(entry: dict[str, Any] | None) -> dict[str, Any]:
    """A neuron's screen result as finding fields (`effect`, `control_effect`, `generic`); {} if unscreened."""
    if entry is None:
        return {}
    return {"effect": entry["effect"], "control_effect": entry["control_effect"], "generic": entry["generic"]}


def screen_cells(neuron: dict[str, Any]) -> list[Any]:
    """The `SCREEN_COLUMNS` cells of a neuron entry (blank where it was not screened)."""
    if "effect" not in neuron:
        return ["", "", ""]
    return [f"{neuron['effect']:+.1%}", f"{neuron['control_effect']:+.1%}", "yes" if neuron["generic"] else ""]


def generic_table(generic: list[dict[str, Any]]) -> tuple[str, list[str], list[list[Any]]]:
    """The table of generic neurons, shown apart from the located ones: (name, columns, rows)."""
    return ("Generic neurons (ablating one hurts unrelated facts as much; not knowledge of this fact)",
            ["neuron", "score", "ablated: P(answer) change", "unrelated facts' change", "top tokens"],
            [[neuron_name(n), round(n["score"], 6), f"{n['effect']:+.1%}", f"{n['control_effect']:+.1%}",
              " | ".join(n.get("top_tokens", []))] for n in generic])


def top_keys(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The (layer, unit) of the `k` highest entries of a [n_layers, d_mlp] grid, best first."""
    return [(lay, u) for lay, u, _ in ranked(scores, k)] if k else []

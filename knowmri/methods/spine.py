"""SPINE (Subramanian et al. 2018, "SPINE: SParse Interpretable Neural Embeddings"): a sparse, overcomplete
denoising autoencoder over the model's input embeddings whose hidden units are interpretable dimensions.

The encoder is a capped ReLU, z = min(1, max(0, W x + b)); the loss is the paper's: reconstruction (MSE)
+ average sparsity loss (ASL: each dimension's mean activation above the target rho is penalised, squared)
+ partial sparsity loss (PSL: z (1 - z) pushes activations to 0 or 1), on inputs with Gaussian noise.
It trains on `vocab_limit` word tokens (in id order, which for BPE vocabularies follows merge order and so
roughly frequency; BPE word-start tokens when the vocabulary has them), with Adam for ~1000 updates
instead of the paper's 4000 epochs of SGD, to stay within a minute on CPU. Embeddings are centred and
scaled to unit variance first. The trained weights are cached as safetensors under
$KNOWMRI_HOME/spine/, keyed by the model, a hash of the embedding rows and the parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.models.presets import home
from knowmri.report import figures
from knowmri.sample import Sample

FORMAT = "spine-1"
UPDATES = 1000  # optimizer updates when `epochs` is 0


@dataclass
class SpineParams(Params):
    vocab_limit: int = field(default=5000, metadata={"help": "word tokens trained on (the first in id order; 0 = all)"})
    hidden_dim: int = field(default=0, metadata={"help": "interpretable dimensions (0 = min(4 x d_model, 1000))"})
    rho: float = field(default=0.15, metadata={"help": "target average activation per dimension (sparsity 1 - rho)"})
    noise: float = field(default=0.2, metadata={"help": "std of the denoising noise (in units of the embedding std)"})
    epochs: int = field(default=0, metadata={"help": "passes over the vocabulary (0 = enough for ~1000 updates)"})
    batch_size: int = field(default=64, metadata={"help": "training batch size"})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate"})
    seed: int = field(default=0, metadata={"help": "initialisation, shuffling and noise seed"})
    top_dims: int = field(default=5, metadata={"help": "dimensions listed per prompt token"})
    top_words: int = field(default=8, metadata={"help": "words shown per dimension"})

    def validate(self) -> None:
        if self.vocab_limit < 0 or self.hidden_dim < 0 or self.epochs < 0:
            raise ValueError("vocab_limit, hidden_dim and epochs must not be negative")
        if self.hidden_dim > 10_000 or self.epochs > 10_000:
            raise ValueError("hidden_dim and epochs must be at most 10000")
        if not 0 < self.rho < 1:
            raise ValueError("rho must be between 0 and 1")
        if self.noise < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError("noise must be >= 0, lr > 0 and batch_size >= 1")
        if not 1 <= self.top_dims <= 50 or not 1 <= self.top_words <= 50:
            raise ValueError("top_dims and top_words must be between 1 and 50")


def token_texts(tok: Any, count: int) -> list[str]:
    """Each of the first `count` token ids decoded alone. A fast tokenizer's Rust backend decodes them in one call
    (10x faster than `batch_decode`, which goes through Python per id); it skips only `batch_decode`'s
    clean-up of spaces before punctuation, which no letters-only token has."""
    ids = [[i] for i in range(count)]
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        try:
            return list(backend.decode_batch(ids, skip_special_tokens=False))
        except Exception:  # noqa: BLE001 - an odd backend: the slow path below decodes the same ids
            pass
    return tok.batch_decode(ids)


def word_rows(model: Any, limit: int) -> list[int]:
    """Ids of word-like tokens (letters only) in id order, word-start tokens only when the vocabulary marks them."""
    tok, special = model.tokenizer, set(model.tokenizer.all_special_ids)
    texts = token_texts(tok, model.vocab_size)
    alpha = [i for i, t in enumerate(texts) if i not in special and len(t.strip()) >= 2 and t.strip().isalpha()]
    spaced = [i for i in alpha if texts[i][:1].isspace()]
    rows = spaced if len(spaced) >= max(100, len(alpha) // 4) else alpha
    rows = rows or [i for i in range(model.vocab_size) if i not in special]
    return rows[:limit] if limit else rows


def train_spine(
    x: torch.Tensor,
    hidden_dim: int,
    *,
    rho: float = 0.15,
    noise: float = 0.2,
    epochs: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train SPINE on standardised rows `x` [n, d]: the weights (W_enc [d, h], b_enc, W_dec [h, d], b_dec) and stats.

    Adam with torch.optim.Adam's defaults, fused (one pass over the weights per update). For speed (an update is
    a few 64-row matrix products, so the cost of each operator call is much of the rest), the gradient is written
    out instead of taken by autograd, and Adam updates the four parameters at once, held in one flat buffer. The
    gradient runs the operations autograd runs, in its order, so the weights are those of autograd and
    torch.optim.Adam(fused=True) to the bit; training is chaotic enough that a different rounding anywhere ends
    in visibly different dimensions.
    """
    n, d = x.shape
    h, dev = hidden_dim, x.device
    g = torch.Generator(device="cpu").manual_seed(seed)

    def uniform(shape: tuple[int, ...], bound: float) -> torch.Tensor:
        return ((torch.rand(shape, generator=g) * 2 - 1) * bound).to(dev)

    shapes = {"w_enc": (d, h), "w_dec": (h, d), "b_dec": (d,), "b_enc": (h,)}  # layout in the flat buffers
    total = sum(math.prod(s) for s in shapes.values())

    def views(buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for key, shape in shapes.items():
            out[key] = buffer[at : at + math.prod(shape)].view(shape)
            at += math.prod(shape)
        return out

    with torch.no_grad():
        flat, flat_grad = torch.empty(total, device=dev), torch.empty(total, device=dev)
        p, grad = views(flat), views(flat_grad)
        for key, shape, bound in (("w_enc", (d, h), d**-0.5), ("b_enc", (h,), d**-0.5),
                                  ("w_dec", (h, d), h**-0.5), ("b_dec", (d,), h**-0.5)):  # the generator's order
            p[key].copy_(uniform(shape, bound))
        w_enc, b_enc, w_dec, b_dec = p["w_enc"], p["b_enc"], p["w_dec"], p["b_dec"]
        flat.grad = flat_grad  # Adam updates all four parameters at once, through their one flat buffer
        adam = torch.optim.Adam([flat], lr=lr, fused=True)  # one pass over the weights per update
        batches = math.ceil(n / batch_size)
        epochs = epochs or max(1, min(2000, math.ceil(UPDATES / batches)))
        sizes = {min(batch_size, n), n - (batches - 1) * batch_size}
        # torch's CPU normal_ draws all of a tensor's uniforms, then transforms them in blocks of 16: one draw per
        # epoch then gives the same numbers as one per batch when every batch holds a multiple of 16 values.
        epoch_noise = all(b * d % 16 == 0 for b in sizes)
        one = torch.ones((), device=dev)
        # d(loss)/d(input) scales as autograd forms them (float32): mean -> 1/numel, x**2 -> 2x, asl -> 1/h.
        k_rec = {b: 2 * (one / (b * d)) for b in sizes}
        k_psl = {b: one / (b * h) for b in sizes}
        k_asl = 2 * (one / h)
        curves: dict[str, list[float]] = {"reconstruction": [], "asl": [], "psl": [], "total": []}
        start = time.perf_counter()
        for epoch in range(epochs):
            xs = x.index_select(0, torch.randperm(n, generator=g).to(dev))  # the epoch's rows, shuffled
            if epoch_noise:
                noisy_all = xs + noise * torch.randn((n, d), generator=g).to(dev)
            sums = torch.zeros(3, device=dev)
            for i in range(batches):
                y = xs[i * batch_size : (i + 1) * batch_size]
                if epoch_noise:
                    noisy = noisy_all[i * batch_size : (i + 1) * batch_size]
                else:
                    noisy = y + noise * torch.randn(y.shape, generator=g).to(dev)
                b = len(y)
                pre = noisy @ w_enc + b_enc
                z = pre.clamp(0, 1)
                r = z @ w_dec + b_dec - y
                rec = (r**2).mean()
                over = (z.mean(0) - rho).clamp(min=0)
                asl = (over**2).sum() / h
                one_minus_z = 1 - z
                psl = (z * one_minus_z).mean()
                # Backward: d(rec)/dr, then d/dz summed in autograd's order (psl's two terms, asl, rec), masked
                # where the clamp was inactive (z != pre), then the parameter gradients.
                g_r = r * k_rec[b]
                g_z = one_minus_z * k_psl[b]
                g_z.sub_(z * k_psl[b])
                g_z.add_((over * k_asl) / b)
                g_z.add_(g_r @ w_dec.T)
                g_z.masked_fill_(pre != z, 0.0)
                torch.mm(noisy.T, g_z, out=grad["w_enc"])
                torch.sum(g_z, 0, out=grad["b_enc"])
                torch.mm(z.T, g_r, out=grad["w_dec"])
                torch.sum(g_r, 0, out=grad["b_dec"])
                adam.step()
                sums += torch.stack([rec, asl, psl]) * b
            rec_e, asl_e, psl_e = (sums / n).tolist()
            for key, value in zip(curves, (rec_e, asl_e, psl_e, rec_e + asl_e + psl_e)):
                curves[key].append(value)
            if progress is not None:
                progress((epoch + 1) / epochs)
        weights = {"w_enc": w_enc.clone(), "b_enc": b_enc.clone(), "w_dec": w_dec.clone(), "b_dec": b_dec.clone()}
    z = encode(weights, x)
    stats = {
        "epochs": epochs,
        "updates": epochs * batches,
        "rows": n,
        "hidden_dim": hidden_dim,
        "seconds": time.perf_counter() - start,
        "losses": curves,
        **activation_stats(z, rho),
    }
    return weights, stats


def encode(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The capped-ReLU codes [n, h] of standardised rows."""
    return (x @ weights["w_enc"] + weights["b_enc"]).clamp(0, 1)


def activation_stats(z: torch.Tensor, rho: float) -> dict[str, Any]:
    return {
        "sparsity": float((z == 0).float().mean()),
        "target_sparsity": 1 - rho,
        "mean_activation": float(z.mean()),
        "binary_fraction": float(((z == 0) | (z == 1)).float().mean()),
        "dead_dims": int((z.amax(0) == 0).sum()),
    }


def cache_path(model: Any, matrix: torch.Tensor, key: dict[str, Any]) -> Path:
    """$KNOWMRI_HOME/spine/<model>-<hash of the embedding rows and the parameters>.safetensors"""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **key}, sort_keys=True).encode())
    h.update(matrix.detach().float().cpu().contiguous().numpy().tobytes())
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(model.name))[-60:].strip("._") or "model"
    return home() / "spine" / f"{name}-{h.hexdigest()[:16]}.safetensors"


@register_method
class Spine(Method):
    name = "spine"
    title = "SPINE sparse interpretable embeddings"
    path = ("Internal", "Representation", "Embedding")
    paper = "Subramanian et al. 2018, 'SPINE: SParse Interpretable Neural Embeddings'"
    description = (
        "Trains a sparse autoencoder on the input embeddings and shows the prompt tokens' interpretable dimensions."
    )
    requires_keys = ("prompt",)
    requires_capabilities = ()
    Params = SpineParams

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """A cold run (no cached weights): the vocabulary decoded and filtered to words, then the
        autoencoder's updates (per update five [batch, d] x [d, hidden]-sized products, the batch's
        elementwise work and Adam over every weight), each epoch's shuffled and noised copy of the rows,
        and the words' codes at the end; the rows' copies, Adam's state and the codes are the peak."""
        from knowmri.methods.costs import elementwise_seconds, matmul_seconds, model_rates

        p = params if isinstance(params, SpineParams) else SpineParams()
        d, vocab = model.d_model, model.vocab_size
        hidden = p.hidden_dim or min(4 * d, 1000)
        rows = min(p.vocab_limit or vocab, vocab)  # word tokens are fewer than `vocab`; `vocab_limit` caps them
        batch = min(p.batch_size, rows)
        batches = math.ceil(rows / p.batch_size)
        epochs = p.epochs or max(1, min(2000, math.ceil(UPDATES / batches)))
        updates = epochs * batches
        weights = 2 * d * hidden + d + hidden
        rates = model_rates(model)
        adam = 4 * 10 * weights / (rates.stream_bandwidth or rates.inplace_bandwidth or rates.bandwidth)  # in place, past the caches
        update = (matmul_seconds(model, 5 * 2 * batch * d * hidden, batch)
                  + elementwise_seconds(model, 4 * batch * (12 * hidden + 6 * d), ops=45) + adam)
        epoch = elementwise_seconds(model, 4 * rows * d * 8, ops=10)  # shuffled copy, noise (drawn: slow), sum
        words = vocab * elementwise_seconds(model, 0, ops=0.5)  # decode and filter each token
        codes = 2 * matmul_seconds(model, 2 * rows * d * hidden, rows) + elementwise_seconds(model, 4 * rows * hidden * 10)
        seconds = words + updates * update + epochs * epoch + codes
        memory = 4 * (5 * rows * d + 6 * weights + 3 * rows * hidden) + 64 * vocab  # rows, Adam, codes, token texts
        return Estimate(seconds=seconds, memory_bytes=int(memory))

    def run(self, model: Any, sample: Sample, params: SpineParams, ctx: RunContext) -> MethodResult:
        from safetensors import safe_open
        from safetensors.torch import save_file

        tok = model.tokenizer
        hidden = params.hidden_dim or min(4 * model.d_model, 1000)
        rows = word_rows(model, params.vocab_limit)
        emb = model.embed_module.weight.detach()
        matrix = emb[torch.tensor(rows, device=emb.device)].float()
        key = {k: getattr(params, k) for k in ("vocab_limit", "rho", "noise", "epochs", "batch_size", "lr", "seed")}
        key["hidden_dim"] = hidden
        path = cache_path(model, matrix, key)
        mean, std = matrix.mean(0), matrix.std().clamp_min(1e-12)
        x = (matrix - mean) / std
        cached = path.exists()
        if cached:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                weights = {k: f.get_tensor(k).to(emb.device) for k in names}
                stats = json.loads(f.metadata()["stats"])
            ctx.progress(0.8, "loaded cached SPINE weights")
        else:
            ctx.progress(0.05, f"training SPINE ({len(rows)} words -> {hidden} dimensions)")
            weights, stats = train_spine(
                x,
                hidden,
                rho=params.rho,
                noise=params.noise,
                epochs=params.epochs,
                batch_size=params.batch_size,
                lr=params.lr,
                seed=params.seed,
                progress=lambda f: ctx.progress(0.05 + 0.9 * f, "training SPINE"),
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            save_file(
                {k: v.cpu().contiguous() for k, v in weights.items()},
                str(partial),
                metadata={"stats": json.dumps(stats), "model": str(model.name), "params": json.dumps(key)},
            )
            partial.replace(path)
        with torch.no_grad():
            pre_words = x @ weights["w_enc"] + weights["b_enc"]  # [rows, h]: words ranked by pre-activation
            enc = model.encode(sample["prompt"])
            ids = enc.input_ids[0].tolist()
            special = set(tok.all_special_ids)
            positions = [i for i, t in enumerate(ids) if t not in special] or list(range(len(ids)))
            tok_x = (emb[torch.tensor([ids[i] for i in positions], device=emb.device)].float() - mean) / std
            pre_tok = tok_x @ weights["w_enc"] + weights["b_enc"]
            z_tok = pre_tok.clamp(0, 1)
        word_order = pre_words.topk(min(params.top_words, len(rows)), dim=0).indices.T  # [h, top_words]
        token_dimensions: dict[str, list[int]] = {}
        token_activity, dim_score, dim_tokens = [], {}, {}
        for j, pos in enumerate(positions):
            text = tok.decode([ids[pos]])
            active = (z_tok[j] > 0).nonzero().flatten()
            ranked = active[pre_tok[j, active].argsort(descending=True)][: params.top_dims].tolist()
            token_dimensions.setdefault(text, ranked)
            token_activity.append(
                {"index": pos, "token": text, "active": int((z_tok[j] > 0).sum()), "total": float(z_tok[j].sum())}
            )
            for dim in ranked:
                dim_score[dim] = dim_score.get(dim, 0.0) + float(z_tok[j, dim])
                dim_tokens.setdefault(dim, []).append(text)
        dims = sorted(dim_score, key=lambda dd: -dim_score[dd])
        dimensions = [
            {
                "dim": dd,
                "score": dim_score[dd],
                "words": [tok.decode([rows[int(i)]]) for i in word_order[dd]],
                "tokens": list(dict.fromkeys(dim_tokens[dd])),
            }
            for dd in dims
        ]

        result = self.new_result(params)
        result.findings = {
            "dimensions": dimensions,
            "token_dimensions": token_dimensions,
            "token_activity": token_activity,  # not answer importance, so not `token_scores`
            "training": stats,
            "cached": cached,
            "cache_file": str(path),
            "vocab_rows": len(rows),
            "hidden_dim": hidden,
        }
        lead = dimensions[0] if dimensions else None
        source = "loaded from the cache" if cached else f"trained in {stats['seconds']:.1f} s"
        result.summary = (
            f"SPINE ({source}) maps {len(rows)} vocabulary words to {hidden} sparse dimensions with "
            f"{stats['sparsity']:.0%} of activations exactly zero (target {1 - params.rho:.0%}) and "
            f"reconstruction error {stats['losses']['reconstruction'][-1]:.3f}. "
        )
        if lead:
            result.summary += (
                f"The prompt's strongest dimension, {lead['dim']}, is active for "
                f"{', '.join(map(repr, lead['tokens'][:4]))} and is defined by the words "
                f"{', '.join(map(repr, lead['words'][:5]))}."
            )
        shown = dims[:12]
        if shown:
            result.add_figure(
                "Prompt tokens by interpretable dimension",
                figures.heatmap(
                    [[float(z_tok[j, dd]) for dd in shown] for j in range(len(positions))],
                    x=[f"{dd}: {dimensions[k]['words'][0]}" for k, dd in enumerate(shown)],
                    y=[f"{pos}:{tok.decode([ids[pos]])}" for pos in positions],
                    zmin=0,
                    zmax=1,
                    colorbar="activation",
                    title="SPINE activations of the prompt's tokens (dimension: its top word)",
                    x_title="dimension",
                    y_title="token",
                ),
            )
        result.add_figure(
            "SPINE training losses",
            figures.lines(
                list(range(1, stats["epochs"] + 1)),
                stats["losses"],
                title="SPINE training loss by epoch",
                x_title="epoch",
                y_title="loss",
            ),
        )
        result.add_table(
            "Interpretable dimensions of the prompt",
            ["dim", "score", "prompt tokens", "defining words"],
            [[r["dim"], round(r["score"], 4), " | ".join(r["tokens"]), " | ".join(r["words"])] for r in dimensions],
        )
        result.add_table(
            "Dimensions per token",
            ["token", "dimensions"],
            [[t, ", ".join(map(str, d))] for t, d in token_dimensions.items()],
        )
        return result

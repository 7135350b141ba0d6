"""Benchmark: an activation-patching sweep in knowmri vs TransformerLens, nnsight and plain PyTorch.

The sweep is the core of causal tracing with one noise sample: the subject's token embeddings
get fixed Gaussian noise (3 x the embedding std, the same tensor for everybody), and for every
(token, layer) cell the clean residual stream leaving block `layer` at `token` is restored into
the corrupted run; the result is P(answer) at the last position, a [tokens, layers] grid.

Implementations (one model's weights, each framework on its own copy; alternated, repeated):
- knowmri hooks, batched: one corrupted forward per chunk of cells, each row restoring its own
  (token, layer) with `Hooks.replace(..., rows=, positions=, paired=True)`;
- knowmri trace engine (`knowmri.methods.tracing_engine.trace`, what `causal_tracing` runs): the same
  grid with the prefix reused (a restoration at layer l re-runs only blocks l+1..L-1) and the
  cells before the subject skipped (exactly the corrupted value on a causal model);
- plain PyTorch: `register_forward_hook` on the HF blocks, one forward per cell (the floor of
  any per-cell loop);
- TransformerLens (`TransformerBridge`, TL >= 4; `HookedTransformer` was removed in 4.0): its
  `run_with_hooks` loop over cells, and its `patching.generic_activation_patch` utility;
- nnsight (`LanguageModel`): one `trace` per cell with `.output` edits, and one `trace` per
  layer with one `invoke` per token (nnsight's batching).

Models: the tiny GPT-2 of `knowmri.testing` (overhead-dominated) and SmolLM2-135M (LLaMA,
compute-dominated), both loaded offline. Writes benchmarks/results/patching_peers.json.

    python benchmarks/bench_patching_peers.py [--quick] [--repeats 3] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import _harness as H
import torch

from knowmri.hooks import Hooks, site
from knowmri.methods.tracing_engine import embedding_std, subject_noise, trace

METHOD = "activation patching sweep"


class Setup:
    """One model, the Eiffel prompt, the fixed noise and the clean residual stream."""

    def __init__(self, name: str, model: Any, args: Any, layers: list[int] | None = None) -> None:
        self.name, self.model, self.args = name, model, args
        s = H.EIFFEL
        enc = model.encode(s["prompt"], s["ground_truth"])
        self.ids = enc.input_ids
        self.position, self.answer = enc.pred_pos, enc.target_ids[0]
        self.subject = model.token_span(s["prompt"], s["triple_subject"], encoded=enc)
        self.T, self.L = self.ids.shape[1], model.n_layers
        scale = 3.0 * embedding_std(model)
        self.noise = subject_noise(model, 1, len(self.subject), scale, seed=0)[0].to(model.device, model.dtype)
        self.noise_full = torch.zeros(1, self.T, model.d_model, device=model.device, dtype=model.dtype)
        self.noise_full[0, self.subject.start:self.subject.stop] = self.noise
        with torch.inference_mode(), Hooks(model) as h:
            caps = [h.read(site(layer, "resid_post")) for layer in range(self.L)]
            model.forward(input_ids=self.ids, attention_mask=torch.ones_like(self.ids))
        self.clean = torch.stack([c.value[0] for c in caps])  # [L, T, d]
        self.layers = list(range(self.L)) if layers is None else list(layers)
        self.names = {mod: name for name, mod in model.hf_model.named_modules()}

    def prob(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.position].float().softmax(-1)[:, self.answer]


# ---------------------------------------------------------------------- knowmri
def knowmri_batched(st: Setup, max_rows: int) -> torch.Tensor:
    """Every cell as one row of a batched corrupted forward (paired restores), in chunks; the vocabulary
    read out at the predicting position only (`logits_to_keep`, where the model takes it)."""

    m = st.model
    keep = {"logits_to_keep": torch.tensor([st.position])} if m.takes_logits_to_keep else {}
    cells = [(t, layer) for layer in st.layers for t in range(st.T)]
    out = torch.empty(len(cells))
    with torch.inference_mode():
        for i in range(0, len(cells), max_rows):
            chunk = cells[i:i + max_rows]
            n = len(chunk)
            with Hooks(m) as h:
                h.add("embed", st.noise, positions=list(st.subject))
                for layer in sorted({c[1] for c in chunk}):
                    rows = [j for j, c in enumerate(chunk) if c[1] == layer]
                    toks = [chunk[j][0] for j in rows]
                    h.replace(site(layer, "resid_post"), st.clean[layer][toks], rows=rows, positions=toks, paired=True)
                logits = m.forward(input_ids=st.ids.repeat(n, 1), attention_mask=torch.ones_like(st.ids).repeat(n, 1), **keep)
            at = logits[:, 0] if keep else logits[:, st.position]
            out[i:i + n] = at.float().softmax(-1)[:, st.answer].cpu()
    return out.view(len(st.layers), st.T).T.contiguous()


def knowmri_engine(st: Setup, batch_size: int) -> torch.Tensor:
    with torch.inference_mode():
        res = trace(st.model, st.ids, st.position, st.answer, st.subject, st.noise[None].float().cpu(), ["hidden"],
                    window=1, batch_size=batch_size)
    return res.grids["hidden"].float()[:, st.layers]


# ---------------------------------------------------------------------- plain PyTorch
def torch_loop(st: Setup) -> torch.Tensor:
    """One forward per cell with bare `register_forward_hook`s: no framework at all."""
    m = st.model
    grid = torch.empty(st.T, len(st.layers))
    s0, s1 = st.subject.start, st.subject.stop
    mask = torch.ones_like(st.ids)

    def noise_hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, s0:s1] += st.noise
        return output

    with torch.inference_mode():
        h_embed = m.embed_module.register_forward_hook(noise_hook)
        try:
            for j, layer in enumerate(st.layers):
                for t in range(st.T):
                    def patch(module: Any, args: Any, output: Any, t: int = t, layer: int = layer) -> Any:
                        hidden = output[0] if isinstance(output, tuple) else output
                        hidden = hidden.clone()
                        hidden[:, t] = st.clean[layer, t]
                        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

                    handle = m.layers[layer].register_forward_hook(patch)
                    try:
                        grid[t, j] = st.prob(m.forward(input_ids=st.ids, attention_mask=mask))[0]
                    finally:
                        handle.remove()
        finally:
            h_embed.remove()
    return grid


# ---------------------------------------------------------------------- TransformerLens
def tl_bridge(st: Setup) -> Any:
    """A TransformerBridge around a copy of the model (the bridge rewires the modules it wraps)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    folder = H.scratch_home()
    st.model.tokenizer.save_pretrained(folder)  # TL re-loads the tokenizer by its name_or_path
    tok = AutoTokenizer.from_pretrained(folder)
    name = st.model.config._name_or_path if "/" in str(st.model.config._name_or_path) else st.model.config.model_type
    return TransformerBridge.boot_transformers(name, hf_model=copy.deepcopy(st.model.hf_model), tokenizer=tok,
                                               device=st.args.device, dtype=st.model.dtype)


def tl_loop(st: Setup, bridge: Any) -> torch.Tensor:
    grid = torch.empty(st.T, len(st.layers))
    s0, s1 = st.subject.start, st.subject.stop

    def noise_hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x[:, s0:s1] += st.noise
        return x

    with torch.inference_mode():
        for j, layer in enumerate(st.layers):
            for t in range(st.T):
                def patch(x: torch.Tensor, hook: Any, t: int = t, layer: int = layer) -> torch.Tensor:
                    x[:, t] = st.clean[layer, t]
                    return x

                logits = bridge.run_with_hooks(st.ids, fwd_hooks=[("hook_embed", noise_hook),
                                                                  (f"blocks.{layer}.hook_resid_post", patch)])
                grid[t, j] = st.prob(logits)[0]
    return grid


def tl_patching(st: Setup, bridge: Any) -> torch.Tensor:
    """TL's own utility: `patching.generic_activation_patch` over (layer, pos) for resid_post."""
    import pandas as pd
    from transformer_lens import patching

    index = pd.DataFrame([(layer, t) for layer in st.layers for t in range(st.T)], columns=["layer", "pos"])
    s0, s1 = st.subject.start, st.subject.stop

    def noise_hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x[:, s0:s1] += st.noise
        return x

    with torch.inference_mode():
        _, cache = bridge.run_with_cache(st.ids, names_filter=lambda n: n.endswith("hook_resid_post"))
        bridge.add_hook("hook_embed", noise_hook)
        try:
            grid = patching.generic_activation_patch(
                bridge, st.ids, cache, lambda logits: st.prob(logits)[0], patching.layer_pos_patch_setter,
                "resid_post", index_df=index)
        finally:
            bridge.reset_hooks()
    return grid.float().cpu().view(len(st.layers), st.T).T.contiguous()


# ---------------------------------------------------------------------- nnsight
def _envoy(lm: Any, dotted: str) -> Any:
    node = lm
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def nnsight_model(st: Setup) -> Any:
    from nnsight import LanguageModel

    return LanguageModel(copy.deepcopy(st.model.hf_model), tokenizer=st.model.tokenizer)


def _nn_paths(st: Setup) -> tuple[str, list[str], str]:
    embed = st.names[st.model.embed_module]
    layers = [st.names[layer] for layer in st.model.layers]
    return embed, layers, st.names[st.model.unembed_module]


def nnsight_loop(st: Setup, lm: Any) -> torch.Tensor:
    embed, layers, unembed = _nn_paths(st)
    grid = torch.empty(st.T, len(st.layers))
    with torch.inference_mode():
        for j, layer in enumerate(st.layers):
            for t in range(st.T):
                with lm.trace(st.ids):
                    e = _envoy(lm, embed)
                    e.output = e.output + st.noise_full
                    blk = _envoy(lm, layers[layer])
                    hidden = blk.output[0] if isinstance(blk.output, tuple) else blk.output
                    hidden[:, t] = st.clean[layer, t]
                    p = _envoy(lm, unembed).output[:, st.position].float().softmax(-1)[:, st.answer].save()
                grid[t, j] = _value(p)[0]
    return grid


def nnsight_invokes(st: Setup, lm: Any) -> torch.Tensor:
    """One trace per layer, one `invoke` (batch row) per token."""
    embed, layers, unembed = _nn_paths(st)
    grid = torch.empty(st.T, len(st.layers))
    with torch.inference_mode():
        for j, layer in enumerate(st.layers):
            saved = []
            with lm.trace() as tracer:
                for t in range(st.T):
                    with tracer.invoke(st.ids):
                        e = _envoy(lm, embed)
                        e.output = e.output + st.noise_full
                        blk = _envoy(lm, layers[layer])
                        hidden = blk.output[0] if isinstance(blk.output, tuple) else blk.output
                        hidden[:, t] = st.clean[layer, t]
                        saved.append(_envoy(lm, unembed).output[:, st.position].float().softmax(-1)[:, st.answer].save())
            for t, p in enumerate(saved):
                grid[t, j] = _value(p)[0]
    return grid


def _value(saved: Any) -> torch.Tensor:
    return (saved.value if hasattr(saved, "value") else saved).detach().float().cpu()


# ---------------------------------------------------------------------- the bench
def _peers(st: Setup) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, str]]:
    commands: dict[str, Callable[[], torch.Tensor]] = {"plain PyTorch hooks, loop": lambda: torch_loop(st)}
    notes: dict[str, str] = {}
    try:
        bridge = tl_bridge(st)
        commands["TransformerLens run_with_hooks loop"] = lambda: tl_loop(st, bridge)
        commands["TransformerLens patching.generic_activation_patch"] = lambda: tl_patching(st, bridge)
    except Exception as err:  # a peer that cannot load is recorded as a finding
        notes["TransformerLens"] = f"could not load: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    try:
        lm = nnsight_model(st)
        commands["nnsight trace loop"] = lambda: nnsight_loop(st, lm)
        commands["nnsight invoke per token"] = lambda: nnsight_invokes(st, lm)
    except Exception as err:
        notes["nnsight"] = f"could not load: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return commands, notes


def bench(name: str, model: Any, args: Any, layer_step: int = 1, engine_rows: bool = True) -> list[dict[str, Any]]:
    """Rows for one model; peers sweep every `layer_step`-th layer (the full grid when 1)."""
    tol = H.tolerance(args)
    max_rows = 64
    full = Setup(name, model, args)
    rows = []
    # 1. the trace engine vs the batched hooks sweep, on the full grid
    if engine_rows:
        engine = H.alternate({"knowmri hooks, batched": lambda: knowmri_batched(full, max_rows),
                              "knowmri trace engine": lambda: knowmri_engine(full, max_rows)},
                             repeats=args.repeats, warmup=1, device=args.device)
        ref, eng = engine["knowmri hooks, batched"], engine["knowmri trace engine"]
        equal, diff = H.allclose(eng.result, ref.result, **tol)
        rows.append(H.row(METHOD + " [trace engine]", "knowmri hooks, batched (same grid, full forwards)", eng, ref,
                          equal, f"{name}, {full.T}x{full.L} cells, max |diff| {diff:.1e}; prefix reuse, "
                          "pre-subject cells skipped", model=name))
        print(f"{name}: full grid {full.T}x{full.L}: batched {H.fmt_s(ref.median)}, engine {H.fmt_s(eng.median)}",
              flush=True)
    # 2. the batched hooks sweep vs the peers, on every layer_step-th layer
    st = full if layer_step == 1 else Setup(name, model, args, layers=list(range(0, full.L, layer_step)))
    commands = {"knowmri hooks, batched": lambda: knowmri_batched(st, max_rows)}
    peers, notes = _peers(st)
    commands.update(peers)
    cells = f"{st.T}x{len(st.layers)} cells" + ("" if layer_step == 1 else f" (every {layer_step}th layer)")
    print(f"{name}: peers on {cells}, {args.repeats} repeats", flush=True)
    timings = H.alternate(commands, repeats=args.repeats, warmup=1 if layer_step == 1 else 0, device=args.device)
    ours = timings.pop("knowmri hooks, batched")
    print(f"  knowmri hooks, batched: {H.fmt_s(ours.median)}", flush=True)
    for label, tm in timings.items():
        print(f"  {label}: {H.fmt_s(tm.median)} {tm.error or ''}", flush=True)
        equal, diff = H.allclose(tm.result, ours.result, **tol) if tm.result is not None else (None, None)
        detail = f"{name}, {cells}" + (f", max |diff| {diff:.1e}" if diff is not None else "")
        if tm.error:
            detail += f"; failed: {tm.error}"
        rows.append(H.row(METHOD, label, ours, tm, equal, detail, model=name))
    for peer, note in notes.items():
        rows.append(H.row(METHOD, peer, ours, None, None, f"{name}: {note}", model=name))
    return rows


def main() -> None:
    p = H.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    H.setup(args)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    from knowmri.testing import build_tiny

    tiny = build_tiny("gpt2")
    tiny.hf_model.to(device=args.device, dtype=H.dtype_of(args))
    rows = bench("tiny-gpt2 (3 layers, d_model 64)", tiny, args)
    if not args.skip_smollm2:
        # --quick: peers on every 5th layer (60 of 300 cells), and no full-grid engine run (bench_causal_tracing has it)
        rows += bench("smollm2-135m (30 layers)", H.load_smollm2(args), args, layer_step=5 if args.quick else 1,
                      engine_rows=not args.quick)
    H.print_rows(rows)
    path = H.write_result("patching_peers", rows, model="tiny-gpt2, smollm2-135m", args=args)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

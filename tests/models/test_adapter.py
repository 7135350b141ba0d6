"""The `Model` adapter and the hooks' canonical sites, on a tiny model of every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from knowmri.hooks import Hooks
from knowmri.models import Model, load_model
from knowmri.models.arch import get_module, resolve
from knowmri.models.loading import parse_dtype
from knowmri.testing import EXTRA_FAMILIES, FAMILIES, build_tiny, tiny_model, tiny_tokenizer

ALL = FAMILIES + EXTRA_FAMILIES
PARALLEL = {"gptj", "gpt_neox", "phi", "falcon"}
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"}
PROMPT = "The Eiffel Tower is located in the city of"
MASKED_PROMPT = "The Eiffel Tower is located in the city of"
ATOL = 1e-4


@pytest.fixture(params=ALL, ids=list(ALL))
def model(request: pytest.FixtureRequest) -> Model:
    return tiny_model(request.param)


def run(model: Model, enc, setup=None) -> torch.Tensor:
    """Logits of one forward pass with hooks set up by `setup(h)` (nothing when None)."""
    with torch.no_grad(), Hooks(model) as h:
        if setup is not None:
            setup(h)
        return model.forward(**enc.inputs())


def read_sites(model: Model, enc, names: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    with torch.no_grad(), Hooks(model) as h:
        caps = {name: h.read(name) for name in names}
        logits = model.forward(**enc.inputs())
    return {name: cap.value for name, cap in caps.items()}, logits


def module_io(module: nn.Module, model: Model, enc) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's first input and its output in one forward pass (raw torch hooks, not knowmri.hooks)."""
    seen: list[torch.Tensor] = []

    def hook(m: nn.Module, args: tuple, out: object) -> None:
        seen.extend([args[0].detach().clone(), (out[0] if isinstance(out, tuple) else out).detach().clone()])

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.forward(**enc.inputs())
    finally:
        handle.remove()
    return seen[0], seen[1]


def mlp_module(model: Model, layer: int) -> nn.Module:
    """The MLP block that owns the down projection (gemma2's `mlp.out` is a post-norm, not the MLP)."""
    path = resolve(model.layers[layer], model.spec.mlp_down)[0]
    return get_module(model.layers[layer], path.rsplit(".", 1)[0])


# --------------------------------------------------------------------------- attributes


def test_attributes(model: Model) -> None:
    family = model.spec.family
    assert model.n_layers == 3
    assert model.d_model == 64
    assert model.n_heads == 4
    assert model.d_head == 16
    assert model.d_mlp == (256 if family == "bloom" else 128)
    assert model.vocab_size == len(model.tokenizer)
    assert model.parallel == (family in PARALLEL)
    assert model.architecture == type(model.hf_model).__name__
    kind = {"bert": "masked", "t5": "seq2seq"}.get(family, "causal")
    assert model.kind == kind
    expected = {"causal": {"causal_lm", "generate", "gradients"}, "masked": {"masked_lm", "gradients"},
                "seq2seq": {"seq2seq", "generate", "gradients"}}[kind]
    assert model.capabilities == expected
    assert model.mlp_value_vectors(0).shape == (model.d_mlp, model.d_model)
    assert model.mlp_key_vectors(0).shape == (model.d_mlp, model.d_model)
    assert model.unembedding.shape == (model.vocab_size, model.d_model)
    info = model.info()
    assert {"name", "architecture", "n_layers", "d_model", "d_mlp", "kind"} <= set(info)
    assert model.hf_model.training is False


def test_component_errors(model: Model) -> None:
    with pytest.raises(ValueError, match="out of range"):
        model.component(model.n_layers, "mlp_down")
    if not model.spec.mlp_gate:
        with pytest.raises(ValueError, match="no mlp_gate"):
            model.component(0, "mlp_gate")


# --------------------------------------------------------------------------- encode / predict


def test_predict(model: Model) -> None:
    preds = model.predict(PROMPT, top_k=4)
    assert len(preds) == 4
    probs = [p for _, p in preds]
    assert probs == sorted(probs, reverse=True)
    assert all(isinstance(t, str) and 0.0 <= p <= 1.0 for t, p in preds)
    enc = model.encode(PROMPT)
    logits = run(model, enc)
    best = logits[0, enc.pred_pos].softmax(-1).max()
    assert preds[0][1] == pytest.approx(float(best), abs=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        model.predict(PROMPT, top_k=0)


def test_predict_at_mask() -> None:
    model = tiny_model("bert")
    enc = model.encode(MASKED_PROMPT)
    ids = enc.input_ids[0].tolist()
    tok = model.tokenizer
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids[enc.pred_pos] == tok.mask_token_id
    assert ids.count(tok.mask_token_id) == 1
    logits = run(model, enc)
    top = int(logits[0, enc.pred_pos].argmax())
    assert model.predict(MASKED_PROMPT, top_k=1)[0][0] == tok.decode([top])


def test_encode_targets(model: Model) -> None:
    answer = " Paris city"
    enc = model.encode(PROMPT, answer)
    tok = model.tokenizer
    assert tok.decode(enc.target_ids).strip() == answer.strip()
    assert len(enc.target_ids) == len(enc.target_positions) == 2
    ids = enc.input_ids[0].tolist()
    if model.kind == "causal":
        assert enc.target_positions == [enc.prompt_len - 1, enc.prompt_len]
        assert ids[enc.prompt_len] == enc.target_ids[0]
        assert len(ids) == enc.prompt_len + 1
        assert enc.last == enc.prompt_len - 1
    elif model.kind == "masked":
        assert [ids[p] for p in enc.target_positions] == [tok.mask_token_id] * 2
        assert enc.last == enc.target_positions[0]
    else:
        dec = enc.decoder_input_ids[0].tolist()
        assert dec == [model.config.decoder_start_token_id, enc.target_ids[0]]
        assert enc.target_positions == [0, 1]
        assert ids[-1] == tok.eos_token_id
    logits = run(model, enc)
    assert logits.shape[1] > max(enc.target_positions)


def test_encode_errors(model: Model) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        model.encode("   ")
    with pytest.raises(ValueError, match="answer is empty"):
        model.encode(PROMPT, " ")


def test_answer_gets_leading_space() -> None:
    model = tiny_model("gpt2")
    assert model.encode(PROMPT, "Paris").target_ids == model.encode(PROMPT, " Paris").target_ids
    assert model.normalize_answer(PROMPT, "Paris") == " Paris"


def test_token_span(model: Model) -> None:
    span = model.token_span(PROMPT, "Eiffel Tower")
    ids = model.tokenizer(PROMPT)["input_ids"]
    assert model.tokenizer.decode(ids[span.start:span.stop]).strip() == "Eiffel Tower"
    assert len(span) == 2
    if model.kind == "causal":
        assert model.token_span(PROMPT, "of").stop - 1 == model.encode(PROMPT).last
    with pytest.raises(ValueError, match="does not occur"):
        model.token_span(PROMPT, "Rome")


def test_tokenizer_offsets_and_specials() -> None:
    causal = tiny_tokenizer("causal", bos=True)
    enc = causal(" Paris", return_offsets_mapping=True)
    assert causal.convert_ids_to_tokens(enc["input_ids"]) == ["<bos>", "ĠParis"]
    assert enc["offset_mapping"][1][1] == 6
    assert tiny_tokenizer("causal").decode(tiny_tokenizer("causal")(" Paris")["input_ids"]) == " Paris"
    masked = tiny_tokenizer("masked")
    assert masked.mask_token == "[MASK]" and masked.cls_token == "[CLS]" and masked.sep_token == "[SEP]"
    t5 = tiny_tokenizer("seq2seq")
    assert t5.pad_token_id == 0 and t5("Paris")["input_ids"][-1] == t5.eos_token_id
    with pytest.raises(ValueError, match="unknown model kind"):
        tiny_tokenizer("vision")


# --------------------------------------------------------------------------- readout and sites


def test_readout_reproduces_logits(model: Model) -> None:
    enc = model.encode(PROMPT, " Paris")
    last = f"blocks.{model.n_layers - 1}.resid_post"
    values, logits = read_sites(model, enc, [last])
    with torch.no_grad():
        again = model.readout(values[last])
    torch.testing.assert_close(again, logits, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("chunk", [7, 100_000], ids=["chunked", "whole"])
def test_readout_logprob_is_the_log_softmax(model: Model, chunk: int) -> None:
    """`readout_logprob` (vocabulary chunks, running logsumexp) equals `readout`'s log-softmax at the token."""
    enc = model.encode(PROMPT, " Paris")
    last = f"blocks.{model.n_layers - 1}.resid_post"
    values, _ = read_sites(model, enc, [last])
    hidden = values[last][0]
    token = int(enc.target_ids[0])
    with torch.no_grad():
        want = model.readout(hidden).float().log_softmax(-1)
        for t in (token, 0, want.shape[-1] - 1):
            torch.testing.assert_close(model.readout_logprob(hidden, t, chunk=chunk), want[:, t], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.readout_logprob(hidden, want.shape[-1] + 3, chunk=7)


def test_final_norm_site(model: Model) -> None:
    if model.final_norm is None:
        with Hooks(model) as h, pytest.raises(ValueError, match="no final norm"):
            h.read("final_norm")
        return
    enc = model.encode(PROMPT)
    last = f"blocks.{model.n_layers - 1}.resid_post"
    values, _ = read_sites(model, enc, [last, "final_norm"])
    with torch.no_grad():
        torch.testing.assert_close(model.final_norm(values[last]), values["final_norm"], atol=ATOL, rtol=1e-4)


def test_residual_stream_is_a_sum(model: Model) -> None:
    family = model.spec.family
    if family == "bert":
        pytest.skip("BERT is post-LN: its blocks normalise after the residual add, so the stream is not a sum")
    enc = model.encode(PROMPT, " Paris")
    layer = 1
    names = [f"blocks.{layer}.{k}" for k in ("resid_pre", "resid_post", "attn.out", "mlp.out")]
    extra = torch.zeros(())
    if family == "t5":  # the decoder block adds cross-attention between self-attention and the MLP
        cross = model.layers[layer].layer[1].EncDecAttention
        seen: list[torch.Tensor] = []
        handle = cross.register_forward_hook(lambda m, a, out: seen.append(out[0].detach()))
        try:
            values, _ = read_sites(model, enc, names)
        finally:
            handle.remove()
        extra = seen[0]
    else:
        values, _ = read_sites(model, enc, names)
    pre, post, attn, mlp = (values[n] for n in names)
    torch.testing.assert_close(post, pre + attn + mlp + extra, atol=ATOL, rtol=1e-4)
    assert post.shape == pre.shape == attn.shape == mlp.shape == (1, enc.input_ids.shape[1] if model.kind != "seq2seq"
                                                                  else enc.decoder_input_ids.shape[1], model.d_model)


def test_chained_blocks(model: Model) -> None:
    enc = model.encode(PROMPT)
    values, _ = read_sites(model, enc, ["embed", "blocks.0.resid_pre", "blocks.0.resid_post", "blocks.1.resid_pre"])
    torch.testing.assert_close(values["blocks.0.resid_post"], values["blocks.1.resid_pre"])
    if model.spec.family in ("gpt2", "opt", "bert", "bloom", "gemma", "gemma2", "gemma3"):
        return  # these add positions, normalise or scale the embeddings before the first block
    torch.testing.assert_close(values["embed"], values["blocks.0.resid_pre"])


def test_mlp_out_is_down_projection_of_neurons(model: Model) -> None:
    enc = model.encode(PROMPT)
    layer = 2
    names = [f"blocks.{layer}.mlp.neurons", f"blocks.{layer}.mlp.out"]
    values, _ = read_sites(model, enc, names)
    neurons, out = values[names[0]], values[names[1]]
    t = enc.input_ids.shape[1] if model.kind != "seq2seq" else 1
    assert neurons.shape == (1, t, model.d_mlp)
    down = model.component(layer, "mlp_down")
    expected = F.linear(neurons, model.linear_weight(down), getattr(down, "bias", None))
    _, down_out = module_io(down, model, enc)
    torch.testing.assert_close(expected, down_out.reshape(1, t, -1), atol=ATOL, rtol=1e-4)
    if model.spec.family in ("gemma2", "gemma3"):
        norm = model.component(layer, "mlp_out")  # the branch is normalised before the residual add
        with torch.no_grad():
            expected = norm(expected)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)


def test_gated_neurons(model: Model) -> None:
    if model.spec.family not in GATED:
        pytest.skip("not a gated MLP")
    enc = model.encode(PROMPT)
    layer = 1
    gate, up = model.component(layer, "mlp_gate"), model.component(layer, "mlp_in")
    x, _ = module_io(gate, model, enc)
    act = mlp_module(model, layer).act_fn
    values, _ = read_sites(model, enc, [f"blocks.{layer}.mlp.neurons"])
    with torch.no_grad():
        torch.testing.assert_close(values[f"blocks.{layer}.mlp.neurons"], act(gate(x)) * up(x), atol=ATOL, rtol=1e-4)


def test_attention_heads(model: Model) -> None:
    enc = model.encode(PROMPT)
    layer = 0
    names = [f"blocks.{layer}.attn.heads", f"blocks.{layer}.attn.out"]
    values, _ = read_sites(model, enc, names)
    heads, out = values[names[0]], values[names[1]]
    t = enc.input_ids.shape[1] if model.kind != "seq2seq" else 1
    assert heads.shape == (1, t, model.n_heads, model.d_head)
    o = model.component(layer, "attn_o")
    expected = F.linear(heads.reshape(1, t, -1), model.linear_weight(o), getattr(o, "bias", None))
    _, o_out = module_io(o, model, enc)
    torch.testing.assert_close(expected, o_out, atol=ATOL, rtol=1e-4)
    if model.spec.family in ("gemma2", "gemma3"):
        with torch.no_grad():
            expected = model.component(layer, "attn_out")(expected)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)


def test_opt_neurons_are_unflattened() -> None:
    model = tiny_model("opt")
    assert model.spec.flat_mlp
    enc = model.encode(PROMPT)
    values, _ = read_sites(model, enc, ["blocks.0.mlp.neurons", "blocks.0.mlp.out"])
    t = enc.input_ids.shape[1]
    assert values["blocks.0.mlp.neurons"].shape == (1, t, model.d_mlp)
    assert values["blocks.0.mlp.out"].shape == (1, t, model.d_model)
    batch = enc.inputs(batch=2)
    with torch.no_grad(), Hooks(model) as h:
        h.ablate("blocks.0.mlp.neurons", rows=[1], positions=[1])
        cap = h.read("blocks.0.mlp.neurons")  # added after the ablation, so it sees its effect
        model.forward(**batch)
    assert cap.value.shape == (2, t, model.d_mlp)
    assert cap.value[1, 1].abs().sum() == 0 and cap.value[0, 1].abs().sum() > 0


SITES = ["embed", "final_norm", "blocks.1.resid_pre", "blocks.1.resid_post", "blocks.1.attn.out",
         "blocks.1.attn.heads", "blocks.1.mlp.out", "blocks.1.mlp.neurons"]


def test_replacing_with_own_value_is_identity(model: Model) -> None:
    enc = model.encode(PROMPT, " Paris")
    sites = [s for s in SITES if s != "final_norm" or model.final_norm is not None]
    values, clean = read_sites(model, enc, sites)
    for name in sites:
        patched = run(model, enc, lambda h, name=name: h.replace(name, values[name]))
        torch.testing.assert_close(patched, clean, atol=ATOL, rtol=1e-4, msg=f"replacing {name} changed the logits")


def test_ablating_changes_logits(model: Model) -> None:
    enc = model.encode(PROMPT)
    clean = run(model, enc)
    for name in ("blocks.0.mlp.out", "blocks.2.attn.heads", "blocks.1.resid_post"):
        ablated = run(model, enc, lambda h, name=name: h.ablate(name))
        assert (ablated - clean).abs().max() > 1e-3, name


def count_hooks(model: Model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf_model.modules())


def test_hooks_removed_on_exit_and_error(model: Model) -> None:
    before = count_hooks(model)
    enc = model.encode(PROMPT)
    clean = run(model, enc)
    with Hooks(model) as h:
        for name in SITES[2:]:
            h.read(name)
        assert count_hooks(model) > before
    assert count_hooks(model) == before
    with pytest.raises(RuntimeError, match="boom"), Hooks(model) as h:
        h.ablate("blocks.0.mlp.out")
        raise RuntimeError("boom")
    assert count_hooks(model) == before
    torch.testing.assert_close(run(model, enc), clean)


# --------------------------------------------------------------------------- unknown architectures


class _Config:
    model_type = "mystery"
    num_attention_heads = 2


class _Mystery(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _Config()
        self.encoder = nn.Linear(4, 4)


def test_unknown_architecture_is_a_clear_error() -> None:
    tok = tiny_tokenizer("causal")
    with pytest.raises(ValueError, match="unsupported architecture _Mystery.*archs.toml"):
        Model(_Mystery(), tok)
    with pytest.raises(ValueError, match="unsupported architecture Linear"):
        load_model(nn.Linear(2, 2), tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer is required"):
        load_model(tiny_model("gpt2").hf_model)


def test_missing_component_is_named() -> None:
    hf = build_tiny("llama").hf_model
    del hf.model.norm
    with pytest.raises(ValueError, match=r"missing: final_norm \(model.norm\)"):
        Model(hf, tiny_tokenizer("causal", bos=True))


def test_known_module_names_are_inferred() -> None:
    """A model class that archs.toml does not list is mapped when its module names follow a family."""
    from transformers import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        pass

    hf = build_tiny("llama").hf_model
    hf.__class__ = MyLlama
    hf.config.model_type = "my_llama"
    model = Model(hf, tiny_tokenizer("causal", bos=True))
    assert model.spec.family == "llama" and model.architecture == "MyLlama"


# --------------------------------------------------------------------------- loading


def test_load_model_object_and_passthrough() -> None:
    base = tiny_model("gpt2")
    assert load_model(base) is base
    wrapped = load_model(base.hf_model, tokenizer=base.tokenizer)
    assert wrapped.hf_model is base.hf_model and wrapped.spec.family == "gpt2"


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
def test_load_local_folder(family: str, tmp_path: Path) -> None:
    original = build_tiny(family)
    original.hf_model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.hf_model) is type(original.hf_model)
    assert loaded.name == tmp_path.name and loaded.kind == original.kind
    enc = original.encode(PROMPT, " Paris")
    assert loaded.encode(PROMPT, " Paris").input_ids.tolist() == enc.input_ids.tolist()
    torch.testing.assert_close(run(loaded, enc), run(original, enc), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("spec, message", [
    ("", "give a model"),
    (123, "give a model"),
    ("/no/such/folder", "no such model folder"),
    ("./missing", "no such model folder"),
    ("/no/such/model.gguf", "no such GGUF file"),
])
def test_load_model_bad_specs(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_model(spec)


def test_load_model_bad_files(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match="could not read the GGUF file"):
        load_model(str(corrupt))
    text = tmp_path / "weights.bin"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a .gguf model"):
        load_model(str(text))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="unknown or unsupported model|could not load a model config"):
        load_model(str(empty))


def test_dtype_parsing() -> None:
    assert parse_dtype(None) is None
    assert parse_dtype("float32") is torch.float32
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        parse_dtype("int8")
    fresh = build_tiny("gpt2")
    model = load_model(fresh.hf_model, tokenizer=fresh.tokenizer, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(fresh.hf_model, tokenizer=fresh.tokenizer, dtype="float8")


def test_auto_dtype_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from knowmri.models import loading

    monkeypatch.setattr(loading, "native_bf16_cpu", lambda: True)
    assert parse_dtype("auto") is torch.bfloat16
    assert parse_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(loading, "native_bf16_cpu", lambda: False)
    assert parse_dtype("auto") is torch.float32
    fresh = build_tiny("llama")
    assert load_model(fresh.hf_model, tokenizer=fresh.tokenizer, dtype="auto").dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert loading.fast_dtype("cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert loading.fast_dtype("cuda:1") is torch.float16


def test_native_bf16_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from knowmri.models import loading

    real = loading.Path

    def fake(flags: str) -> None:
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
        monkeypatch.setattr(loading, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))

    fake("avx2 avx512f avx512_bf16")
    assert loading.native_bf16_cpu()
    fake("avx2 amx_bf16 amx_tile")
    assert loading.native_bf16_cpu()
    fake("avx2 avx512f")
    assert not loading.native_bf16_cpu()


# --------------------------------------------------------------------------- the tiny models themselves


def test_tiny_models_are_seeded_and_cached() -> None:
    assert tiny_model("llama") is tiny_model("llama")
    a, b, c = build_tiny("llama"), build_tiny("llama"), build_tiny("llama", seed=1)
    wa, wb, wc = (m.hf_model.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.tokenizer is not b.tokenizer
    assert all(p.dtype == torch.float32 for p in a.hf_model.parameters())
    with pytest.raises(ValueError, match="no tiny model for family 'vit'"):
        build_tiny("vit")


def test_tiny_attention_is_eager(model: Model) -> None:
    """Eager attention, so methods can ask for attention weights."""
    enc = model.encode(PROMPT, " Paris")
    with torch.no_grad():
        out = model.hf_model(**enc.inputs(), output_attentions=True, use_cache=False)
    attentions = out.decoder_attentions if model.kind == "seq2seq" else out.attentions
    assert len(attentions) == model.n_layers
    assert attentions[0].shape[1] == model.n_heads


def test_pickled_weights_need_explicit_consent(tmp_path):
    """A folder holding only a pickled .bin checkpoint is refused unless allow_pickle=True."""
    import torch as _torch

    from knowmri.models import load_model
    from knowmri.testing import build_tiny

    model = build_tiny("gpt2")
    model.hf_model.config.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    _torch.save(model.hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle"):
        load_model(str(tmp_path))
    assert load_model(str(tmp_path), allow_pickle=True).n_layers == model.n_layers

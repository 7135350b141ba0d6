"""Hand-built models with one planted fact, whose mechanism is known exactly (ground truth for tests).

The fact "The Eiffel Tower is located in the city of" -> " Paris" is carried by one route:

1. embeddings put the subject's last token (" Tower"), the other subject's (" Gate"), the
   relation's last token (" of") and the internal "fact" and "answer" features on orthonormal,
   zero-mean directions (so LayerNorm and RMSNorm only rescale them); every other token gets
   a random unit vector in the remaining subspace;
2. in `neuron[0]`, MLP unit `neuron[1]` fires only on " Tower" (at the subject's last
   position) and writes a "has a fact" flag plus a "Paris" feature (" Gate" has its own unit
   writing the flag plus a "Berlin" feature);
3. in `head[0]`, attention head `head[1]` queries with " of" and keys on the flag, so the last
   position attends to the subject's last token, and its OV circuit copies the city feature
   to an answer direction;
4. the unembedding reads the answer direction as " Paris" (" Berlin"); otherwise each token's
   unembedding is half its own embedding, so earlier layers predict " of" at the last position.

This is the default variant, "enrich" (the fact is looked up at the subject, then moved). The
"recall" variant (`variant="recall"`) reverses the order (steps 1 and 4 are shared):

2'. in `head[0]`, head `head[1]` queries with " of" and keys on either subject token, so the last
   position attends to " Tower" and its OV circuit copies the subject's identity there (as the
   "fact" feature; " Gate" as "other_fact");
3'. in the later `neuron[0]`, unit `neuron[1]` is an AND of " of" and that copied identity, so it
   fires only at the last position (`neuron_position`), and its value vector is the answer
   direction: read through the unembedding it writes " Paris" (" Gate"'s unit writes " Berlin").

Here the neuron acts at the answer-predicting position, directly on the answer's logit, which is
what knowledge neurons (Dai et al.) and FiNE measure; `answer_layer` is the neuron's layer.

The "generic" variant is "recall" plus a generic neuron (`generic_neuron`) beside the fact's, as real
models have (massive-activation or sink-like units): it fires on every prompt at every position (a
constant pre-activation) and writes a "common" direction that the unembedding of every answer reads
(" Paris", " Berlin" and the first tokens of the answers of the control facts,
`knowmri.data.relations.controls_for(sample)`), so ablating it lowers P(answer) of every fact, related
or not, while ablating the fact neuron lowers only the Eiffel Tower's.

All other weights are small noise (`noise`), so the planted parts dominate and are the only
path from the subject to the answer. Two styles: GPT-2 (LayerNorm, learned positions set to
noise, Conv1D weights) and LLaMA (RMSNorm, gated SiLU MLP with biases, grouped-query attention,
RoPE with the query/key signal in a rotary pair of ~zero frequency, so attention is content-based).
The neurons have a threshold (a negative bias), so in "enrich" Gaussian noise on the subject's
embeddings, as in causal tracing, mostly silences them (the answer's probability falls from ~1 to
~0.1 on average).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from knowmri.models.model import Model
from knowmri.sample import Sample, Span
from knowmri.testing.tiny import tiny_tokenizer

STYLES: tuple[str, ...] = ("gpt2", "llama")
VARIANTS: tuple[str, ...] = ("enrich", "recall", "generic")

PROMPT = "The Eiffel Tower is located in the city of"
OTHER_PROMPT = "The Brandenburg Gate is located in the city of"

# Where the mechanism lives, per style and variant: (neuron layer, unit, other subject's unit), (head layer, head).
_LAYOUT = {
    ("gpt2", "enrich"): {"n_layers": 4, "neuron": (1, 37), "other_unit": 90, "head": (2, 1)},
    ("llama", "enrich"): {"n_layers": 4, "neuron": (0, 91), "other_unit": 12, "head": (2, 3)},
    ("gpt2", "recall"): {"n_layers": 4, "neuron": (2, 101), "other_unit": 44, "head": (1, 2)},
    ("llama", "recall"): {"n_layers": 4, "neuron": (2, 58), "other_unit": 23, "head": (0, 1)},
    ("gpt2", "generic"): {"n_layers": 4, "neuron": (2, 101), "other_unit": 44, "head": (1, 2), "generic": (3, 77)},
    ("llama", "generic"): {"n_layers": 4, "neuron": (2, 58), "other_unit": 23, "head": (0, 1), "generic": (3, 99)},
}
#: The generic neuron's constant pre-activation and how strongly each answer's unembedding reads its output.
_GENERIC_DRIVE, _GENERIC_READ = 3.0, 1.0
#: How much of the answer direction the generic variant's answers no longer read (of 2.0).
_FACT_UNREAD = 1.5
D_MODEL, D_MLP, N_HEADS, N_KV_HEADS = 64, 128, 4, 2
D_HEAD = D_MODEL // N_HEADS
_ROPE_DIM = D_HEAD // 2 - 1  # the rotary pair (7, 15) has frequency theta**(-14/16) ~ 0
_THRESHOLD = 5.0  # a normalised input (norm 8) on the subject gives pre-activation 8 - 5 = 3


@dataclass
class Planted:
    """A planted-fact model and where its mechanism is (all 0-based layers, units, positions)."""

    model: Model
    sample: Sample
    other_sample: Sample
    neuron: tuple[int, int]
    neuron_position: int
    head: tuple[int, int]
    subject_span: Span
    answer_id: int
    answer_layer: int
    other_answer_id: int
    other_neuron: tuple[int, int]
    last_position: int
    variant: str = "enrich"
    generic_neuron: tuple[int, int] | None = None


def _directions(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Orthonormal zero-mean directions: named features, and a basis of the remaining subspace."""
    m = torch.randn(D_MODEL, D_MODEL, generator=gen)
    m[:, 0] = 1.0
    q, _ = torch.linalg.qr(m)
    basis = q[:, 1:]  # orthogonal to the all-ones vector: zero mean
    names = ("subject", "other_subject", "relation", "flag", "fact", "other_fact", "answer", "other_answer")
    named = {name: basis[:, i].clone() for i, name in enumerate(names)}
    return named, basis[:, len(names):].clone()


def _token(tok: object, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not a single token of the tiny tokenizer")
    return int(ids[0])


def _noise_(module: torch.nn.Module, gen: torch.Generator, std: float) -> None:
    """Replace every weight matrix with small noise, vectors (biases, norm gains) with 0 / 1."""
    for name, param in module.named_parameters():
        if param.dim() >= 2:
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        elif name.endswith("weight") and ("norm" in name or name.split(".")[-2].startswith("ln")):
            param.fill_(1.0)
        else:
            param.zero_()


def _embeddings(vocab: int, dirs: dict[str, torch.Tensor], junk: torch.Tensor, ids: dict[str, int],
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings [V, d] and the unembedding [V, d] of the planted design."""
    emb = torch.randn(vocab, junk.shape[1], generator=gen) @ junk.T
    emb = emb / emb.norm(dim=-1, keepdim=True)
    emb[ids["subject"]] = dirs["subject"]
    emb[ids["other_subject"]] = dirs["other_subject"]
    emb[ids["relation"]] = dirs["relation"]
    unemb = 0.5 * emb
    unemb[ids["answer"]] += 2.0 * dirs["answer"]
    unemb[ids["other_answer"]] += 2.0 * dirs["other_answer"]
    return emb, unemb


@torch.no_grad()
def _build_gpt2(vocab: int, tok: object, lay: dict, dirs: dict[str, torch.Tensor], junk: torch.Tensor,
                ids: dict[str, int], gen: torch.Generator, noise: float) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=D_MODEL, n_layer=lay["n_layers"], n_head=N_HEADS,
                        n_inner=D_MLP, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,  # type: ignore[attr-defined]
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # type: ignore[attr-defined]
    config._attn_implementation = "eager"
    hf = GPT2LMHeadModel(config)
    _noise_(hf, gen, noise)
    emb, unemb = _embeddings(vocab, dirs, junk, ids, gen)
    hf.transformer.wte.weight.copy_(emb)
    hf.lm_head.weight.copy_(unemb)
    return hf


def _gpt2_neuron(hf: torch.nn.Module, layer: int, unit: int, read: torch.Tensor, write: torch.Tensor,
                 threshold: float = _THRESHOLD) -> None:
    """A GELU unit that fires when the normalised input's projection on `read` passes `threshold`, writing `write`."""
    mlp = hf.transformer.h[layer].mlp  # Conv1D weights are [in, out]
    mlp.c_fc.weight[:, unit] = read
    mlp.c_fc.bias[unit] = -threshold
    mlp.c_proj.weight[unit] = write


def _gpt2_head(hf: torch.nn.Module, layer: int, head: int, query: torch.Tensor, key: torch.Tensor,
               copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A head whose query reads `query` and key reads `key`; its OV circuit maps each (read, write) pair."""
    attn = hf.transformer.h[layer].attn
    col = head * D_HEAD
    attn.c_attn.weight[:, col] = query
    attn.c_attn.weight[:, D_MODEL + col] = key
    for i, (read, write) in enumerate(copies):
        attn.c_attn.weight[:, 2 * D_MODEL + col + i] = read  # value
        attn.c_proj.weight[col + i] = write  # output


@torch.no_grad()
def _build_llama(vocab: int, tok: object, lay: dict, dirs: dict[str, torch.Tensor], junk: torch.Tensor,
                 ids: dict[str, int], gen: torch.Generator, noise: float) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=D_MLP,
                         num_hidden_layers=lay["n_layers"], num_attention_heads=N_HEADS,
                         num_key_value_heads=N_KV_HEADS, head_dim=D_HEAD, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e10}, tie_word_embeddings=False,
                         mlp_bias=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,  # type: ignore[attr-defined]
                         pad_token_id=tok.pad_token_id)  # type: ignore[attr-defined]
    config._attn_implementation = "eager"
    hf = LlamaForCausalLM(config)
    _noise_(hf, gen, noise)
    emb, unemb = _embeddings(vocab, dirs, junk, ids, gen)
    hf.model.embed_tokens.weight.copy_(emb)
    hf.lm_head.weight.copy_(unemb)
    return hf


def _llama_neuron(hf: torch.nn.Module, layer: int, unit: int, read: torch.Tensor, write: torch.Tensor,
                  threshold: float = _THRESHOLD) -> None:
    """A gated unit (silu(gate) * up, the input of down_proj) that fires when the normalised input's
    projection on `read` passes `threshold` (noise on the subject's embedding silences it), writing `write`."""
    mlp = hf.model.layers[layer].mlp
    mlp.gate_proj.weight[unit] = read
    mlp.gate_proj.bias[unit] = -threshold
    mlp.up_proj.weight[unit] = 0.5 * read
    mlp.down_proj.weight[:, unit] = 0.35 * write  # silu(3) * 4 * 0.35 ~ 4


def _llama_head(hf: torch.nn.Module, layer: int, head: int, query: torch.Tensor, key: torch.Tensor,
                copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """As `_gpt2_head`, with the query/key signal in the rotary pair of ~zero frequency (content-based attention)."""
    attn = hf.model.layers[layer].self_attn
    kv = head // (N_HEADS // N_KV_HEADS)
    attn.q_proj.weight[head * D_HEAD + _ROPE_DIM] = query
    attn.k_proj.weight[kv * D_HEAD + _ROPE_DIM] = key
    for i, (read, write) in enumerate(copies):
        attn.v_proj.weight[kv * D_HEAD + i] = read
        attn.o_proj.weight[:, head * D_HEAD + i] = write


@torch.no_grad()
def _plant(hf: torch.nn.Module, style: str, variant: str, lay: dict, dirs: dict[str, torch.Tensor]) -> None:
    """Write the variant's neurons and head into `hf` (see the module doc)."""
    neuron, head = (_gpt2_neuron, _gpt2_head) if style == "gpt2" else (_llama_neuron, _llama_head)
    (layer, unit), other = lay["neuron"], lay["other_unit"]
    if variant == "generic":
        _plant(hf, style, "recall", lay, dirs)
        return
    if variant == "enrich":
        for u, subject, fact in ((unit, "subject", "fact"), (other, "other_subject", "other_fact")):
            neuron(hf, layer, u, dirs[subject], dirs["flag"] + dirs[fact])
        head(hf, *lay["head"], dirs["relation"], dirs["flag"],
             [(dirs["fact"], dirs["answer"]), (dirs["other_fact"], dirs["other_answer"])])
        return
    # recall: the head copies the subject's identity (1/8 of a normalised input's norm: as large as the
    # relation's embedding) to the last position; the neuron is an AND of both (pre-activation 12 - 10 = 2
    # with both, 8.5 - 10 < 0 with either alone), so it fires nowhere else and not without the head
    head(hf, *lay["head"], dirs["relation"], dirs["subject"] + dirs["other_subject"],
         [(dirs["subject"], dirs["fact"] / 8), (dirs["other_subject"], dirs["other_fact"] / 8)])
    for u, fact, answer in ((unit, "fact", "answer"), (other, "other_fact", "other_answer")):
        neuron(hf, layer, u, 1.5 * (dirs["relation"] + dirs[fact]) / 2**0.5, 2.0 * dirs[answer], threshold=10.0)


def _control_answers(tok: object) -> list[int]:
    """The first token of each control fact's answer (`controls_for` the planted sample), as the tiny tokenizer splits it."""
    from knowmri.data.relations import controls_for

    facts = controls_for({"prompt": PROMPT, "ground_truth": " Paris", "triple_subject": "Eiffel Tower"})
    return sorted({int(tok(f["ground_truth"], add_special_tokens=False)["input_ids"][0]) for f in facts})  # type: ignore[operator]


@torch.no_grad()
def _plant_generic(hf: torch.nn.Module, style: str, where: tuple[int, int], common: torch.Tensor, answers: list[int],
                   facts: list[tuple[int, torch.Tensor]]) -> None:
    """A unit firing at every position (a constant pre-activation) that writes `common`, which the
    unembedding of each of `answers` reads (see the module doc); the `facts`' answers (token, answer
    direction) read their direction more weakly, so that they lean on the generic unit too."""
    layer, unit = where
    if style == "gpt2":
        mlp = hf.transformer.h[layer].mlp
        mlp.c_fc.weight[:, unit] = 0.0
        mlp.c_fc.bias[unit] = _GENERIC_DRIVE
        mlp.c_proj.weight[unit] = common
        unembed = hf.lm_head.weight
    else:
        mlp = hf.model.layers[layer].mlp
        mlp.gate_proj.weight[unit] = 0.0
        mlp.gate_proj.bias[unit] = _GENERIC_DRIVE
        mlp.up_proj.weight[unit] = 0.0
        mlp.up_proj.bias[unit] = 1.0
        mlp.down_proj.weight[:, unit] = common
        unembed = hf.lm_head.weight
    unembed[answers] += _GENERIC_READ * common
    for token, direction in facts:
        unembed[token] -= _FACT_UNREAD * direction


def _answer_layer(model: Model, prompt: str, answer_id: int) -> int:
    """The first layer whose resid_post, read out at the last position, ranks the answer first."""
    from knowmri.hooks import Hooks

    enc = model.encode(prompt)
    with torch.no_grad(), Hooks(model) as h:
        caps = [h.read(f"blocks.{layer}.resid_post") for layer in range(model.n_layers)]
        model.forward(**enc.inputs())
        for layer, cap in enumerate(caps):
            if int(model.readout(cap.value[0, enc.last]).argmax()) == answer_id:
                return layer
    raise ValueError("the planted model does not predict its answer at any layer")


def build_planted(style: str, seed: int = 0, noise: float = 0.01, variant: str = "enrich") -> Planted:
    """A new (uncached) planted-fact model in `style` ("gpt2" or "llama") whose fact is carried by
    `variant`'s mechanism ("enrich" or "recall"); see the module doc."""
    if style not in STYLES:
        raise ValueError(f"unknown planted style {style!r}; expected one of {', '.join(STYLES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown planted variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    lay = _LAYOUT[style, variant]
    tok = tiny_tokenizer("causal", bos=style == "llama")
    ids = {"subject": _token(tok, " Tower"), "other_subject": _token(tok, " Gate"), "relation": _token(tok, " of"),
           "answer": _token(tok, " Paris"), "other_answer": _token(tok, " Berlin")}
    gen = torch.Generator().manual_seed(seed)
    dirs, junk = _directions(gen)
    build = _build_gpt2 if style == "gpt2" else _build_llama
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = build(len(tok), tok, lay, dirs, junk, ids, gen, noise)
        _plant(hf, style, variant, lay, dirs)
        if variant == "generic":
            _plant_generic(hf, style, lay["generic"], junk[:, -1], [ids["answer"], ids["other_answer"], *_control_answers(tok)],
                           [(ids[name], dirs[name]) for name in ("answer", "other_answer")])
    hf.to(torch.float32).eval()
    name = f"planted-{style}" if variant == "enrich" else f"planted-{style}-{variant}"
    hf.config._name_or_path = name
    model = Model(hf, tok, name=name)

    sample = Sample(prompt=PROMPT, ground_truth=" Paris", triple_subject="Eiffel Tower",
                    triple_relation="is located in the city of", triple_object="Paris", target_new=" Rome")
    other = Sample(prompt=OTHER_PROMPT, ground_truth=" Berlin", triple_subject="Brandenburg Gate",
                   triple_relation="is located in the city of", triple_object="Berlin", target_new=" Rome")
    span = model.token_span(PROMPT, "Eiffel Tower")
    if len(model.token_span(OTHER_PROMPT, "Brandenburg Gate")) != len(span):
        raise ValueError("the planted subjects must have the same number of tokens")
    enc = model.encode(PROMPT)
    return Planted(
        model=model, sample=sample, other_sample=other, neuron=lay["neuron"],
        neuron_position=span.stop - 1 if variant == "enrich" else enc.last, head=lay["head"], subject_span=span,
        answer_id=ids["answer"], answer_layer=_answer_layer(model, PROMPT, ids["answer"]),
        other_answer_id=ids["other_answer"], other_neuron=(lay["neuron"][0], lay["other_unit"]), last_position=enc.last,
        variant=variant, generic_neuron=lay.get("generic"),
    )


def planted_model(style: str, seed: int = 0, variant: str = "enrich") -> Planted:
    """A cached planted-fact model ("gpt2" or "llama"; variant "enrich" or "recall"); read-only, shared per process."""
    return _cached_planted(style, variant, seed)


@cache
def _cached_planted(style: str, variant: str, seed: int) -> Planted:
    return build_planted(style, seed, variant=variant)


SINK_PROMPT = "Eiffel Tower is located in the city of"
SINK_OTHER_PROMPT = "Brandenburg Gate is located in the city of"


@torch.no_grad()
def build_planted_sink(seed: int = 0, noise: float = 0.01) -> Planted:
    """The GPT-2-style "enrich" planted model with an attention sink on position 0, prompted with the subject
    first ("Eiffel Tower is located in the city of", no BOS token), as SmolLM2 prompts are.

    Position 0's learned position embedding gets a "sink" direction (zero-mean, orthogonal to the planted
    features), and every head but the planted one queries with a constant (its query bias) and keys on that
    direction, so from every query it puts ~all its attention on position 0, which is the subject's first token;
    their OV circuits stay noise, so the sink writes nothing and the fact is still carried by the planted
    neuron and head alone. Attention mass "on the subject" counted with the sink makes every such head look like
    a subject reader; only the planted head reads the subject's last token."""
    base = build_planted("gpt2", seed, noise)
    hf, tok = base.model.hf_model, base.model.tokenizer
    _, junk = _directions(torch.Generator().manual_seed(seed))  # the generator's first draw, as in build_planted
    sink = junk[:, -1]
    hf.transformer.wpe.weight[0] += 6.0 * sink
    for layer, block in enumerate(hf.transformer.h):
        for head in range(N_HEADS):
            if (layer, head) == base.head:
                continue
            col = head * D_HEAD + D_HEAD - 1  # a query/key dimension the planted head does not use
            block.attn.c_attn.bias[col] = 10.0  # constant query
            block.attn.c_attn.weight[:, D_MODEL + col] = sink  # key: the sink direction
    hf.config._name_or_path = "planted-gpt2-sink"
    model = Model(hf, tok, name="planted-gpt2-sink")
    span = model.token_span(SINK_PROMPT, "Eiffel Tower")
    if span.start != 0:
        raise ValueError("the sink variant's subject must start the prompt")
    sample = Sample(prompt=SINK_PROMPT, ground_truth=" Paris", triple_subject="Eiffel Tower",
                    triple_relation="is located in the city of", triple_object="Paris", target_new=" Rome")
    other = Sample(prompt=SINK_OTHER_PROMPT, ground_truth=" Berlin", triple_subject="Brandenburg Gate",
                   triple_relation="is located in the city of", triple_object="Berlin", target_new=" Rome")
    return Planted(
        model=model, sample=sample, other_sample=other, neuron=base.neuron, neuron_position=span.stop - 1,
        head=base.head, subject_span=span, answer_id=base.answer_id,
        answer_layer=_answer_layer(model, SINK_PROMPT, base.answer_id), other_answer_id=base.other_answer_id,
        other_neuron=base.other_neuron, last_position=model.encode(SINK_PROMPT).last, variant="enrich",
    )

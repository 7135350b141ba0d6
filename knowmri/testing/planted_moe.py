"""A hand-built Mixtral-style mixture-of-experts model with one planted fact stored in one expert's neuron.

The fact "The Eiffel Tower is located in the city of" -> " Paris" is carried by one route (the "recall"
order of `knowmri.testing.planted`, with the router as the AND of the neuron):

1. embeddings put " Tower", " Gate", " of" and the internal features on orthonormal, zero-mean
   directions; every token also carries a constant "common" direction, and every other token a random
   unit vector in the remaining subspace;
2. in `head[0]`, attention head `head[1]` queries with " of" and keys on either subject token, so the
   last position attends to " Tower" and its OV circuit copies the subject's identity there (the "fact"
   feature; " Gate"'s is "other_fact");
3. every layer's router sends every token to the default experts 0 and 1 (they read "common"; their
   weights are noise) except where a subject's identity has been copied: in layer `expert[0]` the router
   reads "fact" for expert `expert[1]`, so only the last position of a prompt about the Eiffel Tower
   is sent to it (and " Gate"'s identity sends it to `other_expert` instead);
4. neuron `expert[2]` of that expert reads the copied identity and writes the answer direction, which
   the unembedding reads as " Paris" (the other expert's neuron writes " Berlin"); otherwise each token's
   unembedding is half its own embedding.

So knowledge neurons and FiNE should find (layer, expert, unit) = `expert`, causal tracing the layer
and the expert at the last position, and the routing read-out the expert chosen for this subject.
All other weights are small noise (`noise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from knowmri.models.model import Model
from knowmri.sample import Sample, Span
from knowmri.testing.tiny import tiny_tokenizer

PROMPT = "The Eiffel Tower is located in the city of"
OTHER_PROMPT = "The Brandenburg Gate is located in the city of"
D_MODEL, D_EXPERT, N_HEADS, N_KV_HEADS, N_LAYERS, N_EXPERTS, TOP_K = 64, 32, 4, 2, 4, 4, 2
D_HEAD = D_MODEL // N_HEADS
_ROPE_DIM = D_HEAD // 2 - 1  # the rotary pair of ~zero frequency: attention is content-based
#: Where the mechanism is: (layer, expert, unit) of the fact's neuron, the other subject's expert and unit, the head.
EXPERT, OTHER_EXPERT, HEAD = (2, 2, 17), (3, 5), (0, 1)
#: router gains: the default experts read "common", the fact's expert "fact" less a threshold on "common"
_DEFAULT_LOGIT, _FACT_LOGIT, _FACT_THRESHOLD = 1.0, 20.0, 10.0


@dataclass
class PlantedMoe:
    """The planted MoE model and where its mechanism is (0-based layers, experts, units, positions)."""

    model: Model
    sample: Sample
    other_sample: Sample
    expert: tuple[int, int, int]  # (layer, expert, unit) of the fact's neuron
    other_expert: tuple[int, int, int]
    head: tuple[int, int]
    subject_span: Span
    last_position: int
    answer_id: int
    other_answer_id: int


def _token(tok: object, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not a single token of the tiny tokenizer")
    return int(ids[0])


@torch.no_grad()
def build_planted_moe(seed: int = 0, noise: float = 0.01) -> PlantedMoe:
    """A new (uncached) planted MoE model (see the module doc)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = tiny_tokenizer("causal", bos=True)
    ids = {"subject": _token(tok, " Tower"), "other_subject": _token(tok, " Gate"), "relation": _token(tok, " of"),
           "answer": _token(tok, " Paris"), "other_answer": _token(tok, " Berlin")}
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(D_MODEL, D_MODEL, generator=gen)
    m[:, 0] = 1.0
    basis = torch.linalg.qr(m)[0][:, 1:]  # orthogonal to the all-ones vector: zero mean
    names = ("subject", "other_subject", "relation", "fact", "other_fact", "answer", "other_answer", "common")
    d = {name: basis[:, i].clone() for i, name in enumerate(names)}
    junk = basis[:, len(names):]
    config = MixtralConfig(vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=D_EXPERT, num_hidden_layers=N_LAYERS,
                           num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, head_dim=D_HEAD,
                           num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=128,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e10}, tie_word_embeddings=False,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = MixtralForCausalLM(config)
    for name, param in hf.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * noise)
    emb = torch.randn(len(tok), junk.shape[1], generator=gen) @ junk.T
    emb = emb / emb.norm(dim=-1, keepdim=True)
    for name in ("subject", "other_subject", "relation"):
        emb[ids[name]] = d[name]
    unemb = 0.5 * emb
    unemb[ids["answer"]] += 2.0 * d["answer"]
    unemb[ids["other_answer"]] += 2.0 * d["other_answer"]
    emb = emb + 0.5 * d["common"]
    hf.model.embed_tokens.weight.copy_(emb)
    hf.lm_head.weight.copy_(unemb)
    # the head: " of" queries, either subject keys, the subject's identity is copied as a fact feature
    attn = hf.model.layers[HEAD[0]].self_attn
    kv = HEAD[1] // (N_HEADS // N_KV_HEADS)
    attn.q_proj.weight[HEAD[1] * D_HEAD + _ROPE_DIM] = d["relation"]
    attn.k_proj.weight[kv * D_HEAD + _ROPE_DIM] = d["subject"] + d["other_subject"]
    for i, (read, write) in enumerate(((d["subject"], d["fact"]), (d["other_subject"], d["other_fact"]))):
        attn.v_proj.weight[kv * D_HEAD + i] = read
        attn.o_proj.weight[:, HEAD[1] * D_HEAD + i] = write / 8
    for layer in range(N_LAYERS):  # default routing: experts 0 and 1
        router = hf.model.layers[layer].mlp.gate.weight
        router[0] += _DEFAULT_LOGIT * d["common"]
        router[1] += 0.9 * _DEFAULT_LOGIT * d["common"]
    layer = EXPERT[0]
    block = hf.model.layers[layer].mlp
    for (expert, unit), fact, answer in (((EXPERT[1], EXPERT[2]), "fact", "answer"),
                                         (OTHER_EXPERT, "other_fact", "other_answer")):
        # a threshold (through "common"): a subject's identity diluted by spread attention does not route here
        block.gate.weight[expert] = _FACT_LOGIT * d[fact] - _FACT_THRESHOLD * d["common"]
        block.experts.gate_up_proj[expert, unit] = d[fact]  # gate: silu(x) on the copied identity
        block.experts.gate_up_proj[expert, D_EXPERT + unit] = 0.5 * d[fact]  # up
        block.experts.down_proj[expert, :, unit] = d[answer]
    hf.to(torch.float32).eval()
    hf.config._name_or_path = "planted-moe"
    model = Model(hf, tok, name="planted-moe")
    sample = Sample(prompt=PROMPT, ground_truth=" Paris", triple_subject="Eiffel Tower",
                    triple_relation="is located in the city of", triple_object="Paris", target_new=" Rome")
    other = Sample(prompt=OTHER_PROMPT, ground_truth=" Berlin", triple_subject="Brandenburg Gate",
                   triple_relation="is located in the city of", triple_object="Berlin", target_new=" Rome")
    return PlantedMoe(model=model, sample=sample, other_sample=other, expert=EXPERT,
                      other_expert=(EXPERT[0], *OTHER_EXPERT), head=HEAD,
                      subject_span=model.token_span(PROMPT, "Eiffel Tower"), last_position=model.encode(PROMPT).last,
                      answer_id=ids["answer"], other_answer_id=ids["other_answer"])


def planted_moe(seed: int = 0) -> PlantedMoe:
    """A cached planted MoE model; read-only, shared per process."""
    return _cached(seed)


@cache
def _cached(seed: int) -> PlantedMoe:
    return build_planted_moe(seed)

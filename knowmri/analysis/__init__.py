"""Cross-method analysis, above the methods and below the diagnosis: what the results of several
methods say together, read from the findings they carry (never from the methods' names).

`build_consensus` compares the methods run on one sample (token, layer and neuron agreement, and the
causal verification of each localisation); `Aggregator` reduces per-sample results over a dataset.
"""

from knowmri.analysis.aggregate import Aggregator
from knowmri.analysis.consensus import build_consensus

__all__ = ["Aggregator", "build_consensus"]

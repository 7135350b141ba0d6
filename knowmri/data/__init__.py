"""Datasets and inputs for knowmri (docs/API.md#datasets).

- `load_dataset(spec, *, path=None, split=None, limit=None, mapping=None)` -> `Dataset`:
  a built-in name (offline authored sample; `path=` for the full public file in its native
  format; `split=` for the hub copy), any .json/.jsonl/.csv/.parquet file with a field
  mapping, or a Hugging Face hub id.
- `datasets()` lists the 15 built-ins with their keys and sizes.
- `from_text(text)` turns free text into a Sample and says which keys it could not fill.
- `suggest(text, k=5)` finds the built-in datasets and records nearest in meaning.
"""

from knowmri.data.dataset import Dataset
from knowmri.data.loading import datasets, load_dataset
from knowmri.data.suggest import suggest
from knowmri.data.text import TextSample, from_text

__all__ = ["Dataset", "TextSample", "datasets", "from_text", "load_dataset", "suggest"]

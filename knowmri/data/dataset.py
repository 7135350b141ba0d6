"""`Dataset` (a named, described sequence of Samples) and the registry of dataset specs."""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from knowmri.data._io import DataError, where
from knowmri.data.formats import RecordFn, Row
from knowmri.sample import KEYS, Sample


class Dataset(Sequence[Sample]):
    """A sequence of Samples with a name, a description, a source and the keys all records share.

    `support_keys` lists the template keys every record provides (in docs/API.md order), which is
    what method matching checks. Indexing gives a Sample (negative indices count from the end),
    slicing gives a smaller Dataset.
    """

    def __init__(
        self,
        samples: Iterable[Sample],
        *,
        name: str,
        description: str = "",
        source: str = "",
        origin: str = "",
        support_keys: Iterable[str] | None = None,
    ) -> None:
        self._samples: list[Sample] = list(samples)
        self.name = name
        self.description = description
        self.source = source
        #: where the records came from: "built-in", a file path or a hub id.
        self.origin = origin
        self.support_keys: list[str] = (
            list(support_keys) if support_keys is not None else common_keys(self._samples)
        )

    @property
    def citation(self) -> str:
        """The dataset's source / citation (alias of `source`)."""
        return self.source

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> Dataset: ...

    def __getitem__(self, index: int | slice) -> Sample | Dataset:
        if isinstance(index, slice):
            return self._derive(self._samples[index])
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"dataset indices must be integers or slices, not {type(index).__name__}")
        index = operator.index(index)
        n = len(self._samples)
        if not -n <= index < n:
            raise IndexError(
                f"index {index} is out of range for dataset {self.name!r}, which has {n} records "
                f"(valid: 0..{n - 1}, or -{n}..-1)" if n else f"dataset {self.name!r} is empty"
            )
        return self._samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def filter(self, predicate: Callable[[Sample], bool]) -> Dataset:
        """The records for which `predicate(sample)` is true, as a Dataset."""
        return self._derive([s for s in self._samples if predicate(s)])

    def with_keys(self, keys: Iterable[str]) -> Dataset:
        """The records that provide every key in `keys` (so matching methods can run on all)."""
        wanted = list(keys)
        return self.filter(lambda s: all(k in s for k in wanted))

    def to_list(self) -> list[dict[str, Any]]:
        """Every record as a JSON-ready dict."""
        return [s.to_dict() for s in self._samples]

    def info(self) -> dict[str, Any]:
        """name, description, source, origin, keys and size."""
        return {"name": self.name, "description": self.description, "source": self.source,
                "origin": self.origin, "keys": list(self.support_keys), "size": len(self)}

    def _derive(self, samples: list[Sample]) -> Dataset:
        return Dataset(samples, name=self.name, description=self.description, source=self.source,
                       origin=self.origin)

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, size={len(self)}, keys={self.support_keys})"


def common_keys(samples: Sequence[Sample]) -> list[str]:
    """The keys present (non-empty) in every sample, known keys first in docs/API.md order."""
    if not samples:
        return []
    shared = set(samples[0].keys())
    for sample in samples[1:]:
        shared &= set(sample.keys())
    return [k for k in KEYS if k in shared] + sorted(shared - set(KEYS))


def build_samples(rows: Iterable[Row], required: Sequence[str] = ()) -> list[Sample]:
    """Samples from parsed rows; a record that is not a valid Sample raises a DataError naming it."""
    samples = []
    for source, index, fields in rows:
        for key in required:
            value = fields.get(key)
            if value is None or value == "" or value == []:
                raise DataError(f"{where(source, index, key)}: missing, but the dataset promises it")
        try:
            samples.append(Sample(fields))
        except ValueError as exc:
            raise DataError(f"{where(source, index)}: {exc}") from exc
    return samples


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: what it is, its keys, and how to read its native files and hub copy."""

    name: str
    description: str
    source: str
    support_keys: tuple[str, ...]
    native: Callable[[Path, str | None], list[Row]]
    formats: str
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str = "test"
    hub_record: RecordFn | None = None

    def info(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict (without the built-in sample's size)."""
        return {"name": self.name, "description": self.description, "source": self.source,
                "keys": [k for k in KEYS if k in self.support_keys], "formats": self.formats, "hub_id": self.hub_id}


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset spec; a name already taken is refused."""
    key = normalize(spec.name)
    if key in _REGISTRY:
        raise ValueError(f"a dataset named {spec.name!r} is already registered")
    unknown = [k for k in spec.support_keys if k not in KEYS]
    if unknown:
        raise ValueError(f"dataset {spec.name!r} declares unknown template keys {unknown}")
    _REGISTRY[key] = spec
    return spec


def normalize(name: str) -> str:
    """Registry key: case-insensitive, '-' and ' ' read as '_'."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def get_spec(name: str) -> DatasetSpec | None:
    """The registered spec called `name`, or None."""
    return _REGISTRY.get(normalize(name))


def spec_for_hub_id(hub_id: str) -> DatasetSpec | None:
    """The registered spec whose hub copy is `hub_id`, or None."""
    return next((s for s in _REGISTRY.values() if s.hub_id and s.hub_id.lower() == hub_id.lower()), None)


def registered() -> list[DatasetSpec]:
    """Every registered spec, in registration order."""
    return list(_REGISTRY.values())


def closest_names(name: str) -> list[str]:
    """Registered names that look like `name` (for 'did you mean' hints)."""
    return difflib.get_close_matches(normalize(name), list(_REGISTRY), n=3, cutoff=0.6)

"""Samples: a mapping from template keys to values, validated, with token-range helpers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: The template keys (docs/API.md#samples-and-keys) and the Python type each holds.
KEYS: dict[str, type] = {
    "prompt": str,
    "prompts": list,
    "ground_truth": str,
    "triple_subject": str,
    "triple_relation": str,
    "triple_object": str,
    "relation_id": str,
    "target_new": str,
    "label": str,
    "reasoning": str,
    "source_lang": str,
    "target_lang": str,
    "tests": list,
}


class Sample(Mapping[str, Any]):
    """One input to diagnose: template keys (docs/API.md#samples-and-keys) to values.

    Unknown keys are kept (the key set is extendable); known keys are type-checked.
    `keys()` lists only keys with non-empty values, which is what matching relies on.
    """

    def __init__(self, data: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        merged = dict(data or {})
        merged.update(kwargs)
        self._data: dict[str, Any] = {}
        for key, value in merged.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"sample keys must be non-empty strings, got {key!r}")
            expected = KEYS.get(key)
            if value is not None and expected is not None:
                if expected is list and isinstance(value, tuple):
                    value = list(value)
                if not isinstance(value, expected):
                    raise ValueError(
                        f"sample key {key!r} must be {expected.__name__}, got {type(value).__name__}"
                    )
                if expected is list and not all(isinstance(v, str) for v in value):
                    raise ValueError(f"sample key {key!r} must be a list of strings")
            self._data[key] = value
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on inconsistent content (empty prompt, subject not in the prompt)."""
        if "prompt" in self._data:
            prompt = self._data["prompt"]
            if prompt is None or not str(prompt).strip():
                raise ValueError("the prompt is empty: give the text the model should continue")
        subject = self._data.get("triple_subject")
        if subject is not None and not str(subject).strip():
            raise ValueError("triple_subject is empty")
        if subject and self._data.get("prompt") and subject not in self._data["prompt"]:
            raise ValueError(
                f"the subject {subject!r} does not occur in the prompt {self._data['prompt']!r}"
            )
        for key in ("ground_truth", "target_new"):
            if key in self._data and self._data[key] is not None and not str(self._data[key]).strip():
                raise ValueError(f"{key} is empty: give the expected answer or leave the key out")
        prompts = self._data.get("prompts")
        if prompts is not None and any(not p.strip() for p in prompts):
            raise ValueError("prompts contains an empty prompt")

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(k for k, v in self._data.items() if _present(v))

    def __len__(self) -> int:
        return sum(1 for v in self._data.values() if _present(v))

    def get(self, key: str, default: Any = None) -> Any:
        value = self._data.get(key, default)
        return value if _present(value) else default

    def to_dict(self) -> dict[str, Any]:
        """The non-empty keys, JSON-ready."""
        return {k: self._data[k] for k in self}

    def replace(self, **changes: Any) -> Sample:
        """A copy with some keys changed (None removes a key)."""
        data = dict(self._data)
        data.update(changes)
        return Sample({k: v for k, v in data.items() if v is not None})

    def all_prompts(self) -> list[str]:
        """`prompt` first, then the other phrasings in `prompts`, without repeats."""
        seen: list[str] = []
        for p in [self.get("prompt"), *(self.get("prompts") or [])]:
            if p and p not in seen:
                seen.append(p)
        return seen

    def __repr__(self) -> str:
        return f"Sample({self.to_dict()!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sample):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def _present(value: Any) -> bool:
    if value is None:
        return False
    return not (isinstance(value, (str, list, tuple, dict)) and len(value) == 0)


def as_sample(obj: Any) -> Sample:
    """Coerce a Sample, a mapping, or a plain prompt string into a Sample."""
    if isinstance(obj, Sample):
        return obj
    if isinstance(obj, str):
        return Sample(prompt=obj)
    if isinstance(obj, Mapping):
        return Sample(obj)
    raise ValueError(f"expected a Sample, a mapping of template keys or a prompt, got {type(obj).__name__}")


@dataclass(frozen=True)
class Span:
    """A half-open token range [start, stop) within a tokenized prompt."""

    start: int
    stop: int

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start

"""Request bodies of the HTTP API, validated with pydantic (sizes, shapes, exactly-one-input)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TEXT = 2000          # characters in a prompt, free text or any single sample value
MAX_LONG_TEXT = 8000     # characters in a worked solution (`reasoning`)
MAX_KEYS = 32            # keys in a sample; methods in a run; parameters per method
MAX_LIST = 32            # items in a list-valued sample key or parameter
MAX_INDEX = 10_000_000
MAX_SAMPLES = 500        # records in one dataset run (its estimate must fit the time cap too)
KEY = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")

SampleValue = str | list[str]
ParamValue = str | int | float | bool | None | list[str | int | float | bool]


SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(value: Any) -> Any:
    """Refuse lone UTF-16 surrogates anywhere in a body: they cannot be stored or sent back as UTF-8."""
    if isinstance(value, str):
        if SURROGATE.search(value):
            raise ValueError("the request holds invalid Unicode (a lone surrogate)")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_surrogates(k)
            _no_surrogates(v)
    elif isinstance(value, list):
        for v in value:
            _no_surrogates(v)
    return value


class Body(BaseModel):
    """Base of request bodies: unknown fields are errors, all text must be valid Unicode."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return _no_surrogates(data)


class InputBody(Body):
    """Exactly one input: free `text`, a `sample` (template keys), or a `dataset` (+ `index`)."""

    text: str | None = Field(None, max_length=MAX_TEXT)
    sample: dict[str, SampleValue] | None = None
    dataset: str | None = Field(None, min_length=1, max_length=64)
    index: int | None = Field(None, ge=-MAX_INDEX, le=MAX_INDEX)

    @field_validator("sample")
    @classmethod
    def _sample_limits(cls, value: dict[str, SampleValue] | None) -> dict[str, SampleValue] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("the sample is empty: give at least a prompt")
        if len(value) > MAX_KEYS:
            raise ValueError(f"a sample has at most {MAX_KEYS} keys")
        for key, item in value.items():
            if not KEY.match(key):
                raise ValueError(f"invalid sample key {key!r}: use lower-case letters, digits and _")
            limit = MAX_LONG_TEXT if key == "reasoning" else MAX_TEXT
            texts = item if isinstance(item, list) else [item]
            if isinstance(item, list) and len(item) > MAX_LIST:
                raise ValueError(f"sample key {key!r} has more than {MAX_LIST} items")
            if any(len(t) > limit for t in texts):
                raise ValueError(f"sample key {key!r} is longer than {limit} characters")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> InputBody:
        given = [name for name in ("text", "sample", "dataset") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one input: 'text', 'sample', or 'dataset' (with 'index')")
        if self.text is not None and not self.text.strip():
            raise ValueError("the text is empty: type a fact or a question")
        if self.index is not None and self.dataset is None:
            raise ValueError("'index' goes with 'dataset'")
        return self


class MatchBody(InputBody):
    """POST /api/match: which methods apply to this input (and model, when given)."""

    model: str | None = Field(None, max_length=512)


class RunBody(InputBody):
    """POST /api/runs: queue a diagnosis of one input on one model, or of a dataset's first `samples` records."""

    model: str = Field(..., min_length=1, max_length=512)
    methods: list[str] | None = Field(None, max_length=MAX_KEYS)
    params: dict[str, dict[str, ParamValue]] | None = None
    samples: int | None = Field(None, ge=1, le=MAX_SAMPLES)

    @model_validator(mode="after")
    def _dataset_run(self) -> RunBody:
        if self.samples is not None and (self.dataset is None or self.index is not None):
            raise ValueError("'samples' makes a dataset run: give it with 'dataset' and without 'index'")
        return self

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("choose at least one method (or leave 'methods' out to run every eligible one)")
        if any(len(m) > 64 for m in value):
            raise ValueError("method names are at most 64 characters")
        if len(set(value)) != len(value):
            raise ValueError("a method is listed twice")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
        if value is None:
            return value
        if len(value) > MAX_KEYS or any(len(v) > MAX_KEYS for v in value.values()):
            raise ValueError(f"at most {MAX_KEYS} methods and {MAX_KEYS} parameters each")
        for method, items in value.items():
            for name, item in items.items():
                if len(name) > 64:
                    raise ValueError(f"parameter name {name[:64]!r}... is too long")
                values = item if isinstance(item, list) else [item]
                if isinstance(item, list) and len(item) > MAX_LIST:
                    raise ValueError(f"parameter {method}.{name} has more than {MAX_LIST} items")
                if any(isinstance(v, str) and len(v) > 256 for v in values):
                    raise ValueError(f"parameter {method}.{name} is longer than 256 characters")
        return value


class ParseBody(Body):
    """POST /api/parse: free text to sample keys."""

    text: str = Field(..., max_length=MAX_TEXT)

    @field_validator("text")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the text is empty: type a fact or a question")
        return value

"""Which models the server may load, and a small cache of the loaded ones.

A model spec from a request is one of: a name registered in-process (`create_app(models=...)`),
a preset (`knowmri.models.PRESETS`), a Hugging Face hub id (`org/name`), or a local folder or
`.gguf` file under an allowed root. Anything else is refused before any loading happens. Local
folders must hold safetensors weights (the server never unpickles weights) and remote code is
never trusted.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowmri.server.errors import bad_request

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
MAX_SPEC = 512


@dataclass(frozen=True)
class ModelRef:
    """A validated model spec: `kind` is registered | preset | hub | local; `key` what loads it."""

    kind: str
    key: str


class ModelCatalog:
    """Validates model specs against the presets, registered models and allowed local roots."""

    def __init__(self, registered: dict[str, Any] | None, roots: list[Path]) -> None:
        self.registered = dict(registered or {})
        self.roots = [r.expanduser().resolve() for r in roots]

    def resolve(self, spec: str) -> ModelRef:
        """The ModelRef for a spec, or an ApiError(400) that says why it is refused."""
        from knowmri.models.presets import PRESETS, preset_available

        spec = (spec or "").strip()
        if not spec:
            raise bad_request("choose a model: a preset name, a Hugging Face id (org/name) or a local folder")
        if len(spec) > MAX_SPEC or any(ord(c) < 32 for c in spec):
            raise bad_request("the model spec is too long or holds control characters")
        if spec in self.registered:
            return ModelRef("registered", spec)
        if spec in PRESETS:
            if not preset_available(spec):
                raise bad_request(f"the preset {spec!r} is not installed: {PRESETS[spec].install}")
            return ModelRef("preset", spec)
        if HUB_ID.match(spec) and ".." not in spec and not spec.startswith("."):
            if Path(spec).exists():
                raise bad_request(f"{spec!r} is both a hub id and a local path; give the folder's absolute path instead")
            return ModelRef("hub", spec)
        if spec.startswith(("/", "~")):
            return ModelRef("local", str(self._local(spec)))
        names = sorted([*self.registered, *PRESETS])
        close = difflib.get_close_matches(spec, names, n=1, cutoff=0.7)
        if close:
            raise bad_request(f"unknown model {spec!r}: did you mean {close[0]}?")
        raise bad_request(f"unknown model {spec!r}: use a preset or registered name ({', '.join(names)}), "
                          "a Hugging Face id such as org/name, or the absolute path of a folder under an allowed root")

    def _local(self, spec: str) -> Path:
        if not self.roots:
            raise bad_request("local model folders are not allowed on this server (no model roots configured)")
        try:
            path = Path(spec).expanduser().resolve(strict=False)
        except (OSError, RuntimeError) as err:
            raise bad_request(f"invalid model path: {err}") from None
        if not any(path == root or path.is_relative_to(root) for root in self.roots):
            raise bad_request("the model path is outside the allowed model roots: "
                              + ", ".join(str(r) for r in self.roots))
        if path.is_file() and path.suffix == ".gguf":
            return path
        if not path.is_dir():
            raise bad_request(f"no such model folder or .gguf file under the model roots: {path}")
        if not (path / "config.json").is_file():
            raise bad_request(f"{path} holds no config.json: not a Hugging Face model folder")
        if not any(path.glob("*.safetensors")):
            raise bad_request(f"{path} holds no .safetensors weights; the server never loads pickled weights")
        return path

    def local_folders(self, limit: int = 50) -> list[str]:
        """Model folders and .gguf files found directly under the allowed roots (for the page)."""
        found: list[str] = []
        for root in self.roots:
            if not root.is_dir():
                continue
            for child in sorted(root.iterdir()):
                if len(found) >= limit:
                    return found
                if (child.is_dir() and (child / "config.json").is_file() and any(child.glob("*.safetensors"))) or (
                        child.is_file() and child.suffix == ".gguf"):
                    found.append(str(child))
        return found


class ModelCache:
    """Loaded models, least recently used dropped first; registered models are always at hand."""

    def __init__(self, catalog: ModelCatalog, size: int = 2, device: str | None = None) -> None:
        self.catalog = catalog
        self.size = max(1, size)
        self.device = device
        self._models: OrderedDict[ModelRef, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: ModelRef) -> Any:
        """The model for a validated ref, loading it (once) when needed."""
        if ref.kind == "registered":
            return self.catalog.registered[ref.key]
        with self._lock:
            if ref in self._models:
                self._models.move_to_end(ref)
                return self._models[ref]
            while len(self._models) >= self.size:
                self._models.popitem(last=False)
            model = self._load(ref)
            self._models[ref] = model
            return model

    def peek(self, ref: ModelRef) -> Any | None:
        """The model for a ref if it is at hand (registered or already loaded), without loading it."""
        if ref.kind == "registered":
            return self.catalog.registered[ref.key]
        with self._lock:
            return self._models.get(ref)

    def _load(self, ref: ModelRef) -> Any:
        from knowmri.models.loading import load_model

        device = self.device
        if ref.kind == "preset":
            return load_model(ref.key, device=device)
        return load_model(ref.key, device=device, trust_remote_code=False)

    def loaded(self) -> list[str]:
        with self._lock:
            return [r.key for r in self._models]

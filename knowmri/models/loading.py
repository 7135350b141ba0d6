"""`load_model`: presets, hub ids, local folders, GGUF files and model objects -> `Model`."""

from __future__ import annotations

import difflib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from knowmri.models.model import Model
from knowmri.models.presets import PRESETS, home

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, device: str | None = None) -> torch.dtype | None:
    """A torch dtype from its name (float32, float16, bfloat16, or `auto`: see `fast_dtype`), or
    None for the default."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return fast_dtype(device)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, float16, bfloat16 or auto")
    return _DTYPES[dtype]


def fast_dtype(device: str | None = None) -> torch.dtype:
    """The fastest dtype `device` computes well: bfloat16 on a GPU that has it (float16 on older
    ones), bfloat16 on a CPU whose cores multiply bfloat16 natively (AVX512-BF16 or AMX: on the
    project's AMD EPYC, 2.4x float32's matmul rate), float32 on other CPUs (where bfloat16 is
    emulated and slower than float32)."""
    if device and device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if native_bf16_cpu() else torch.float32


def native_bf16_cpu() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16, as Linux
    reports them in /proc/cpuinfo; False where that cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def load_model(spec: Any, tokenizer: Any = None, *, device: str | None = None, dtype: str | torch.dtype | None = None,
               device_map: str | dict | None = None, trust_remote_code: bool = False, allow_pickle: bool = False) -> Model:
    """Load and wrap a model (docs/API.md#models): a preset name, hub id, local folder, `.gguf` file or model object.

    Weights load from safetensors only, and no remote code runs, unless the user asks
    (`allow_pickle=True`, `trust_remote_code=True`).
    """
    torch_dtype = parse_dtype(dtype, device or ("cuda" if device_map and torch.cuda.is_available() else None))
    if isinstance(spec, Model):
        return spec
    if isinstance(spec, torch.nn.Module):
        model = Model(spec, tokenizer)
        return _place(model, device, torch_dtype)
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise ValueError("give a model: a preset name, a hub id, a local folder or a .gguf file")
    text = str(spec)
    if text in PRESETS:
        return _load_preset(text, device=device, dtype=torch_dtype, device_map=device_map)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"no such GGUF file: {path}")
        hf, tok = _from_gguf(path, torch_dtype)
        return _place(Model(hf, tokenizer or tok, name=path.stem), device, None)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file but not a .gguf model; give a model folder, a .gguf file or a preset")
    local = path.is_dir()
    if not local and (text.startswith((".", "/", "~")) or text.count("/") > 1):
        raise ValueError(f"no such model folder: {path}")
    cached_only = False
    if not local:
        close = close_preset(text) if "/" not in text else None
        if close:
            raise ValueError(f"unknown preset {text!r}; did you mean {close}?")
        cached_only = not hub_reachable()
        if cached_only and not _hub_cached(text):
            raise ValueError(f"cannot load {text!r}: the Hugging Face hub ({_hub_host()[0]}) cannot be reached (offline, "
                             "or HF_HUB_OFFLINE set) and the model is not in the local cache; give a preset "
                             f"({', '.join(PRESETS)}), a local folder or a .gguf file")
    hf, tok = _from_pretrained(str(path) if local else text, torch_dtype, device_map, trust_remote_code,
                               local or cached_only, allow_pickle)
    model = Model(hf, tokenizer or tok, name=path.name if local else text)
    return model if device_map else _place(model, device, None)


def close_preset(name: str) -> str | None:
    """The preset a mistyped name most likely means ('smollm2-13m' -> 'smollm2-135m'), or None."""
    lowered = {p.lower(): p for p in PRESETS}
    close = difflib.get_close_matches(name.strip().lower(), lowered, n=1, cutoff=0.7)
    return lowered[close[0]] if close else None


def _hub_host() -> tuple[str, int]:
    """Where a hub request first goes: the HTTPS proxy when one is set, else the hub's host."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), None)
    url = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy
                   else os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached: False under HF_HUB_OFFLINE, else one quick TCP connect.

    Checked once before a hub load, so an offline machine fails at once instead of through the hub
    client's retries (a minute of "Retrying" lines)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(_hub_host(), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    """Whether a hub model's config is in the local Hugging Face cache (loadable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id, or no cache at all
        return False


def _place(model: Model, device: str | None, dtype: torch.dtype | None) -> Model:
    if dtype is not None:
        model.hf_model.to(dtype)
    if device:
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no GPU is available")
        model.hf_model.to(device)
    return model


def _auto_class(config: Any) -> Any:
    import transformers

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return transformers.AutoModelForMaskedLM
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def _from_pretrained(source: str, dtype: torch.dtype | None, device_map: Any, trust_remote_code: bool, local: bool,
                     allow_pickle: bool = False) -> tuple[Any, Any]:
    import transformers

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local}
    try:
        config = transformers.AutoConfig.from_pretrained(source, **kwargs)
    except OSError as err:
        where = "the folder" if local else "the Hugging Face hub (offline, or no such model?)"
        raise ValueError(f"could not load a model config for {source!r} from {where}: {str(err).splitlines()[0]}") from err
    except ValueError as err:
        raise ValueError(f"unknown or unsupported model {source!r}: {str(err).splitlines()[0]}") from err
    load_kwargs = dict(kwargs, config=config)
    if not allow_pickle:
        load_kwargs["use_safetensors"] = True
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    try:
        hf = _auto_class(config).from_pretrained(source, **load_kwargs)
        tok = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        hint = "" if allow_pickle else " (only safetensors weights are loaded; pass allow_pickle=True to trust pickled .bin files)"
        raise ValueError(f"could not load {source!r}: {str(err).splitlines()[0]}{hint}") from err
    return hf, tok


def _from_gguf(path: Path, dtype: torch.dtype | None) -> tuple[Any, Any]:
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32)
    except Exception as err:  # gguf raises many kinds on a corrupt file
        raise ValueError(f"could not read the GGUF file {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    hf.hf_quantizer = None  # dequantized on load; clearing it lets save_pretrained work
    return hf, tok


def _load_preset(name: str, *, device: str | None, dtype: torch.dtype | None, device_map: Any) -> Model:
    """A preset from its packaged GGUF, converted once to safetensors under $KNOWMRI_HOME (fast reloads)."""
    preset = PRESETS[name]
    try:
        gguf = preset.locate()
    except FileNotFoundError as err:
        raise ValueError(f"the preset {name!r} needs its package: {preset.install} ({err})") from err
    cache = home() / "models" / name
    stamp = {"gguf": gguf.name, "size": gguf.stat().st_size}  # not the path: venvs holding the same file share it
    marker = cache / "knowmri-source.json"
    fresh = marker.is_file() and json.loads(marker.read_text()) == stamp
    want = dtype or parse_dtype(preset.dtype, device)
    if not fresh:
        hf, tok = _from_gguf(gguf, torch.float32)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            hf.save_pretrained(cache)
            tok.save_pretrained(cache)
            marker.write_text(json.dumps(stamp))
        except OSError as err:
            log.warning("could not cache %s under %s: %s", name, cache, err)
        if device_map is None:
            hf.to(want)
            model = Model(hf, tok, name=name)
            return _place(model, device, None)
    hf, tok = _from_pretrained(str(cache), want, device_map, False, True)
    model = Model(hf, tok, name=name)
    return model if device_map else _place(model, device, None)

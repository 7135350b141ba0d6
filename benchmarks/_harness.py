"""Shared timing utilities for the benchmarks: fair comparisons, medians, ratios, the machine.

Every `bench_*.py` can use it (none has to); the result file format is described in
`benchmarks/README.md`:

    {"benchmark": str, "model": str, "rows": [{"method", "baseline", "knowmri_s", "baseline_s",
     "ratio", "equal", "detail", ...}], "machine": {...}, "settings": {...}}

`ratio` is baseline_s / knowmri_s (above 1: knowmri is faster). Compared commands are
alternated in one process (A B, B A, A B, ...), so a load spike on a shared machine hits both.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

EIFFEL = {"prompt": "The Eiffel Tower is located in the city of", "ground_truth": " Paris",
          "triple_subject": "Eiffel Tower", "triple_relation": "is located in the city of",
          "triple_object": "Paris", "target_new": " Rome"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PEERS = ("transformer-lens", "nnsight", "captum", "knowledge-neurons", "transformers")


# ---------------------------------------------------------------------- arguments and set-up
def parser(description: str) -> argparse.ArgumentParser:
    """The options every harness bench takes (extend it with bench-specific ones)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (absolute numbers need the target device)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (bfloat16 on GPU)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (2: the project's machines)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per command (the median is reported)")
    p.add_argument("--quick", action="store_true", help="reduced settings (what `make bench` runs)")
    p.add_argument("--skip-smollm2", action="store_true", help="tiny models only")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="instead of the real SmolLM2, a model of this shape with random weights (where the GGUF "
                        "cannot be carried, e.g. a GPU machine; 7B-class shapes for absolute numbers): timings and "
                        "equality checks hold, findings are meaningless")
    p.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/<name>.json)")
    return p


def bench_home() -> Path | None:
    """A $KNOWMRI_HOME of the bench environment's own, or None when the main `.venv` runs.

    The SmolLM2 preset caches its converted weights under $KNOWMRI_HOME keyed by the path of
    the GGUF file inside the venv, so two venvs sharing one home would re-convert (and rewrite
    the 0.5 GB cache) on every switch. The bench venv gets `<venv>/knowmri-home`, seeded with
    a copy of the main cache when it came from the same GGUF file (same name and size).
    """
    if os.environ.get("KNOWMRI_HOME") or Path(sys.prefix).resolve() == (ROOT / ".venv").resolve():
        return None
    home = Path(sys.prefix) / "knowmri-home"
    _seed_cache(home / "models" / "smollm2-135m", Path.home() / ".knowmri" / "models" / "smollm2-135m")
    return home


def _seed_cache(target: Path, source: Path) -> None:
    import shutil

    marker = source / "knowmri-source.json"
    if target.exists() or not marker.is_file():
        return
    try:
        from knowmri.models.presets import PRESETS

        gguf = PRESETS["smollm2-135m"].locate()
        stamp = json.loads(marker.read_text())
        if Path(stamp.get("gguf", "")).name != gguf.name or stamp.get("size") != gguf.stat().st_size:
            return
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        (partial / "knowmri-source.json").write_text(json.dumps(
            {"gguf": str(gguf), "size": gguf.stat().st_size, "mtime": int(gguf.stat().st_mtime)}))
        partial.replace(target)
    except (OSError, ValueError, KeyError, ImportError):
        return  # the loader converts the GGUF itself


def setup(args: argparse.Namespace) -> None:
    """Threads, seeds, quiet warnings, no hub access; fails early on a device that is not there."""
    home = bench_home()
    if home is not None:
        os.environ["KNOWMRI_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    import logging

    for name in ("transformers", "transformer_lens", "nnsight", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def scratch_home() -> str:
    """A fresh, empty $KNOWMRI_HOME for cold-cache runs (SPINE trains), removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    if "root" not in _SCRATCH:
        _SCRATCH["root"] = tempfile.mkdtemp(prefix="knowmri-bench-home-")
        atexit.register(shutil.rmtree, _SCRATCH["root"], True)
    return tempfile.mkdtemp(dir=_SCRATCH["root"])


_SCRATCH: dict[str, str] = {}


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    return DTYPES[args.dtype]


def tolerance(args: argparse.Namespace) -> dict[str, float]:
    """allclose tolerances for results compared across implementations, by dtype."""
    return {"atol": 1e-4, "rtol": 1e-3} if args.dtype == "float32" else {"atol": 2e-2, "rtol": 5e-2}


#: LLaMA-architecture shapes for `--shape` (random weights): SmolLM2-135M's own and 7B-class ones.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0},
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
                 "max_position_embeddings": 4096},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0},
}


def load_smollm2(args: argparse.Namespace) -> Any:
    """The embedded SmolLM2-135M on the bench's device and dtype (or the `--shape` model, random weights)."""
    import knowmri as km

    if getattr(args, "shape", None):
        return random_model(args.shape, args.device, DTYPES[args.dtype])
    return km.load_model("smollm2-135m", device=args.device, dtype=args.dtype)


def random_model(shape: str, device: str, dtype: torch.dtype) -> Any:
    """A LLaMA model of `shape` (SHAPES) with seeded random weights, built on `device` in `dtype`, and the
    project's tiny BPE tokenizer (its ids are a subset of the vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import knowmri as km
    from knowmri.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer("causal", bos=True)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    config._name_or_path = f"random-{shape}"
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return km.load_model(hf.eval(), tokenizer=tok)


def eiffel() -> Any:
    from knowmri.sample import Sample

    return Sample(**EIFFEL)


# ---------------------------------------------------------------------- timing
def sync(device: str | torch.device | None = None) -> None:
    """Wait for queued GPU work, so wall-clock times are real."""
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        torch.cuda.synchronize()


@dataclass
class Timing:
    """The times of one command over the repeats, and its last result."""

    name: str
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    result: Any = None
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_times) if self.cpu_times else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "median_s": self.median, "times_s": [round(t, 5) for t in self.times],
                "cpu_median_s": self.cpu_median, "error": self.error}


def measure(fn: Callable[[], Any], device: str | None = None) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result) of one call.

    On a loaded machine the wall time grows with the other processes' load; the CPU time
    (all threads) mostly does not, so it is the steadier measure of the work done.
    """
    sync(device)
    cpu0, start = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu0, out


def time_once(fn: Callable[[], Any], device: str | None = None) -> tuple[float, Any]:
    wall, _, out = measure(fn, device)
    return wall, out


def alternate(commands: dict[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1,
              device: str | None = None, budget_s: float | None = None) -> dict[str, Timing]:
    """Run each command `warmup` times untimed, then `repeats` timed rounds, alternating the order.

    Round r runs the commands in order, reversed on odd rounds, so drift in the machine's load
    is shared. A command that raises is recorded (`error`) and dropped from later rounds.
    `budget_s` stops adding rounds (after the first) once that much time has passed.
    """
    timings = {name: Timing(name) for name in commands}
    live = list(commands)
    for _ in range(warmup):
        for name in list(live):
            try:
                timings[name].result = commands[name]()
            except Exception as err:  # a peer that cannot run is a finding, not a crash
                timings[name].error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                live.remove(name)
    start = time.perf_counter()
    for r in range(repeats):
        if r and budget_s is not None and time.perf_counter() - start > budget_s:
            break
        for name in (live if r % 2 == 0 else live[::-1]):
            try:
                seconds, cpu, timings[name].result = measure(commands[name], device)
                timings[name].times.append(seconds)
                timings[name].cpu_times.append(cpu)
            except Exception as err:
                timings[name].error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        live = [n for n in live if timings[n].error is None]
    return timings


def ratio(baseline_s: float | None, knowmri_s: float | None) -> float | None:
    """baseline / knowmri (above 1: knowmri is faster)."""
    if not baseline_s or not knowmri_s:
        return None
    return baseline_s / knowmri_s


def row(method: str, baseline: str, knowmri: Timing | float | None, base: Timing | float | None,
        equal: bool | None, detail: str = "", **extra: Any) -> dict[str, Any]:
    """One result row in the shared schema."""
    k = knowmri.median if isinstance(knowmri, Timing) else knowmri
    b = base.median if isinstance(base, Timing) else base
    out = {"method": method, "baseline": baseline, "knowmri_s": k, "baseline_s": b, "ratio": ratio(b, k),
           "equal": equal, "detail": detail}
    if isinstance(knowmri, Timing):
        out["knowmri_times_s"] = [round(t, 5) for t in knowmri.times]
        out["knowmri_cpu_s"] = knowmri.cpu_median
    if isinstance(base, Timing):
        out["baseline_times_s"] = [round(t, 5) for t in base.times]
        out["baseline_cpu_s"] = base.cpu_median
        out["cpu_ratio"] = ratio(base.cpu_median, knowmri.cpu_median if isinstance(knowmri, Timing) else None)
        if base.error:
            out["baseline_error"] = base.error
    out.update(extra)
    return out


def allclose(a: Any, b: Any, atol: float = 1e-4, rtol: float = 1e-3) -> tuple[bool, float]:
    """Whether two arrays agree, and their largest absolute difference."""
    ta = torch.as_tensor(a, dtype=torch.float64).cpu()
    tb = torch.as_tensor(b, dtype=torch.float64).cpu()
    if ta.shape != tb.shape:
        return False, float("inf")
    diff = float((ta - tb).abs().max()) if ta.numel() else 0.0
    return bool(torch.allclose(ta, tb, atol=atol, rtol=rtol)), diff


# ---------------------------------------------------------------------- the machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, torch and its threads, peers, date."""
    try:
        cores_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cores_usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "cores_usable": cores_usable,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "device": device, "dtype": dtype,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": _git_commit(),
        "packages": {p: _version(p) for p in PEERS},
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------- results
def write_result(name: str, rows: list[dict[str, Any]], *, model: str = "", args: argparse.Namespace | None = None,
                 out: str | Path | None = None, **extra: Any) -> Path:
    """Write benchmarks/results/<name>.json in the shared schema (machine description included)."""
    device = getattr(args, "device", "cpu") if args is not None else "cpu"
    dtype = getattr(args, "dtype", "float32") if args is not None else "float32"
    data = {"benchmark": name, "model": model, "rows": rows, "machine": machine(device, dtype),
            "settings": {k: v for k, v in vars(args).items()} if args is not None else {}}
    data.update(extra)
    path = Path(out or (getattr(args, "out", None) if args is not None else None) or RESULTS / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


def print_rows(rows: list[dict[str, Any]]) -> None:
    """A markdown table of result rows on stdout."""
    print("| method | compared against | knowmri | baseline | ratio | equal | detail |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        eq = {True: "yes", False: "NO", None: "–"}[r.get("equal")]
        print(f"| {r['method']} | {r['baseline']} | {fmt_s(r.get('knowmri_s'))} | {fmt_s(r.get('baseline_s'))} | "
              f"{fmt_ratio(r.get('ratio'))} | {eq} | {r.get('detail', '')} |", flush=True)

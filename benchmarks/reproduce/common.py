"""What every claim shares: the models, the run context, running a CLI command, reading a run's samples."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knowmri.stats import mean_ci, proportion_ci

ROOT = Path(__file__).resolve().parents[2]
#: The real data files: `$KNOWMRI_DATA`, else the `shared/data` folder beside the repository.
DATA = Path(os.environ.get("KNOWMRI_DATA", ROOT.parent / "shared" / "data"))

#: The presets measured, with the dtype each runs in on CPU and the issue's fact target (ROME's tracing).
MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"title": "SmolLM2-135M", "dtype": None, "target": 100},
    "gemma3-270m": {"title": "Gemma-3-270M", "dtype": None, "target": 100, "capability": 100},
    "qwen2.5-coder-1.5b": {"title": "Qwen2.5-Coder-1.5B", "dtype": "bfloat16", "target": 50, "capability": 100},
}


@dataclass
class Ctx:
    """One model's place in a reproduction: where its runs and results go, and how big they are."""

    model: str
    out: Path
    quick: bool = False
    data: Path = DATA
    budget: float | None = None  # seconds each run may take in this session (it resumes later); None: no limit
    processes: int = 1  # CPU processes per dataset run (Accelerate's data-parallel launch), one torch thread each
    log: list[dict[str, Any]] = field(default_factory=list)
    _model: Any = None

    def load_model(self) -> Any:
        """The model, loaded once per session (for the claims' checks after their runs)."""
        if self._model is None:
            import torch

            import knowmri as km

            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
            self._model = km.load_model(self.model, dtype=self.dtype) if self.dtype else km.load_model(self.model)
        return self._model

    @property
    def dir(self) -> Path:
        return self.out / self.model

    @property
    def dtype(self) -> str | None:
        return MODELS.get(self.model, {}).get("dtype")

    def n(self, full: int, quick: int) -> int:
        """A claim's sample count: `quick` under --quick, else `full` (halved for the 1.5B model, as the issue asks)."""
        if self.quick:
            return quick
        return max(quick, full // 2) if MODELS.get(self.model, {}).get("target", 100) < 100 else full

    def run_dir(self, name: str) -> Path:
        return self.dir / "runs" / name

    def model_args(self) -> list[str]:
        return ["--model", self.model, *(["--dtype", self.dtype] if self.dtype else [])]


def not_true(failed: list[str], checks: int) -> str:
    """A verdict's reason when some of a claim's `checks` failed: the ones that failed, named as not true here."""
    return ("the rest holds; " if len(failed) < checks else "") + "not true here: " + "; ".join(failed)


def shown(cmd: list[str]) -> str:
    """The command as a reader types it from the repository root (`knowmri ...`, paths inside it and beside it
    made relative)."""
    return "knowmri " + " ".join(shlex.quote(c.replace(f"{ROOT}/", "").replace(f"{ROOT.parent}/", "../"))
                                 for c in cmd)


def launcher(processes: int) -> list[str]:
    """What runs `knowmri`: Python itself, or Accelerate's data-parallel launch of `processes` CPU processes
    (gloo; `accelerate launch --cpu` would start one process only, see docs/datasets.md)."""
    if processes <= 1:
        return [sys.executable, "-m", "knowmri"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_cpu_threads_per_process", os.environ.get("OMP_NUM_THREADS", "1"), "-m", "knowmri"]


def run_cli(ctx: Ctx, cmd: list[str], done: Path | None = None, timeout: float | None = None,
            processes: int = 1) -> dict[str, Any]:
    """Run `knowmri CMD` in a child process (one torch thread) unless `done` exists; log what ran and how long.

    With `timeout`, the child is stopped after that many seconds: a dataset run keeps the samples it saved
    and the next session resumes it. With `processes` > 1, a dataset run's records are dealt over that many
    CPU processes (`--device cpu` under Accelerate's launch); the report is the one process's."""
    entry = {"command": shown(cmd), "seconds": 0.0, "rc": 0, "processes": processes}
    if done is None or not done.exists():
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1")}
        start = time.perf_counter()
        proc = subprocess.Popen([*launcher(processes), *cmd, *(["--device", "cpu"] if processes > 1 else [])], env=env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = "stopped (time budget)"
        entry.update(seconds=round(time.perf_counter() - start, 1), rc=rc)
        if rc not in (0, "stopped (time budget)"):
            print(f"[reproduce] failed (exit {rc}): {entry['command']}", flush=True)
    ctx.log.append(entry)
    return entry


def diagnose_cmd(ctx: Ctx, name: str, dataset: str, path: Path | None, samples: int, methods: str,
                 params: list[str] = ()) -> list[str]:
    """The `knowmri diagnose` dataset command of one run (resumable: `--resume` continues it)."""
    cmd = ["diagnose", *ctx.model_args(), "--dataset", dataset]
    if path is not None:
        cmd += ["--path", str(path)]
    cmd += ["--samples", str(samples), "--methods", methods]
    for p in params:
        cmd += ["--param", p]
    return cmd + ["--out", str(ctx.run_dir(name)), "--resume"]


def run_diagnose(ctx: Ctx, name: str, dataset: str, path: Path | None, samples: int, methods: str,
                 params: list[str] = (), timeout: float | None = None) -> dict[str, Any]:
    """Run (or resume, or just find finished) one dataset run; returns the log entry."""
    cmd = diagnose_cmd(ctx, name, dataset, path, samples, methods, params)
    return run_cli(ctx, cmd, done=ctx.run_dir(name) / "report.json", timeout=timeout, processes=ctx.processes)


def samples(run_dir: Path) -> list[dict[str, Any]]:
    """The saved per-sample reports of a dataset run, in record order (a stopped run: those finished)."""
    folder = run_dir / "samples"
    if not folder.is_dir():
        return []
    out = []
    for f in sorted(folder.glob("*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return out


def ok(data: dict[str, Any], method: str) -> dict[str, Any] | None:
    """A sample's findings for `method` when it ran to the end, else None."""
    r = (data.get("results") or {}).get(method)
    return r["findings"] if r and r.get("status") == "ok" else None


def seconds(runs: list[dict[str, Any]]) -> float:
    """Compute seconds of the samples saved (method time, as the per-sample files record it)."""
    return round(sum(float(r.get("seconds") or 0.0) for data in runs for r in (data.get("results") or {}).values()), 1)


def ci(values: list[float]) -> dict[str, Any]:
    """{mean, low, high, n} of a t-interval (None values dropped); n 0 gives None."""
    values = [float(v) for v in values if v is not None and v == v]
    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0}
    m, lo, hi = mean_ci(values)
    return {"mean": m, "low": lo, "high": hi, "n": len(values)}


def share(count: int, n: int) -> dict[str, Any]:
    """{mean, low, high, n} of a proportion with Wilson's interval."""
    if n <= 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    lo, hi = proportion_ci(count, n)
    return {"mean": count / n, "low": lo, "high": hi, "n": n}


def save(ctx: Ctx, claim: str, result: dict[str, Any]) -> Path:
    path = ctx.dir / f"{claim}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return path

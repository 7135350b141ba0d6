"""Dataset runs that survive crashes and use every process: the run directory, resuming, dealing samples.

A dataset run with an output directory keeps on disk everything it finishes:

    DIR/manifest.json            the arguments that decide the results: the model, the dataset (with a
                                 fingerprint of its records), the sample count, methods, parameters, seed
    DIR/samples/000007.json      sample 7's own report (report.json's structure, with its `index`, the
                                 model's `answer` and any input `error`), written atomically when it finishes
    DIR/partial.json             the aggregate over the samples finished so far, rewritten from time to time
    DIR/report.json, index.html  the aggregate over every sample, at the end

Rerun with `resume=True`, a run skips the samples already on disk (a corrupt file is moved aside and
its sample run again, with a warning) and refuses a directory made with other arguments, naming them.
The final aggregate is always rebuilt from the saved files in sample order, so an interrupted and
resumed run, a one-process run and a data-parallel run give the same report.

Under `accelerate launch` (or torchrun) the main process checks the directory, writes the manifest
and finds the pending samples; those are dealt round-robin over the processes, and each process
writes its own samples' files. Every process then waits for all the files (by looking, not through a
collective, so a long sample on one process never times a barrier out) and rebuilds the aggregate.
The directory must be on a file system every process sees (one node, or a shared file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowmri.analysis import Aggregator
from knowmri.parallel import Processes, processes
from knowmri.report.report import Report
from knowmri.run_cost import RunCost
from knowmri.sample import as_sample

log = logging.getLogger(__name__)

FORMAT = "knowmri.dataset_run/1"
MANIFEST = "manifest.json"
SAMPLES = "samples"
PARTIAL = "partial.json"
#: The least free space the run directory's disk must have before a run starts.
MIN_FREE_BYTES = 64 * 2**20
#: Seconds between rewrites of partial.json (more when rebuilding it takes long).
PARTIAL_EVERY = 60.0
#: Seconds between looks for the other processes' files.
POLL_SECONDS = 0.5
#: The manifest entries a resumed run must share with the run that made the directory.
COMPARED = ("model", "dataset", "samples", "methods", "params", "seed")
_MODEL_KEYS = ("name", "architecture", "n_layers", "d_model", "vocab_size", "dtype")

#: One sample's work: (index, sample) -> its report as a dict (report.json's structure plus `index`).
RunOne = Callable[[int, Any], dict[str, Any]]
#: Several samples' work at once: (indices, samples) -> their reports, in order (each as `RunOne` gives it).
RunMany = Callable[[list[int], list[Any]], list[dict[str, Any]]]
#: The cost of some samples: indices -> their RunCost (with each sample's seconds in `per_sample`).
Estimate = Callable[[list[int]], RunCost]
Progress = Callable[[str, float, str], None]


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` so that `path` is either its old self or complete: a temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def finite(obj: Any) -> Any:
    """The same JSON data with infinities and NaNs as None (strict JSON, as report.json is written)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def manifest(model: Any, dataset: Any, n: int, **arguments: Any) -> dict[str, Any]:
    """What decides a dataset run's results: the model, the dataset and its first `n` records, and `arguments`."""
    info = model.info()
    records = [as_sample(dataset[i]).to_dict() for i in range(n)]
    text = json.dumps(records, sort_keys=True, ensure_ascii=False, default=str)
    return {"format": FORMAT, "model": {k: info.get(k) for k in _MODEL_KEYS},
            "dataset": {"name": getattr(dataset, "name", "dataset"), "origin": getattr(dataset, "origin", "") or "",
                        "fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16]},
            "samples": n, **json.loads(json.dumps(arguments, sort_keys=True, default=str))}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The compared manifest entries that differ, each as 'what: before (now after)'."""
    def show(key: str, value: Any) -> str:
        if key == "methods" and value is None:
            return "every eligible method"
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value) or "none"
        return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)

    out = []
    for key in COMPARED:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key in ("model", "dataset") and isinstance(a, dict) and isinstance(b, dict):
            for k in [*b, *(k for k in a if k not in b)]:
                if k == "fingerprint" and (out or old.get("samples") != new.get("samples")):
                    continue  # other records or another count: a different fingerprint says nothing more
                if a.get(k) != b.get(k):
                    out.append(f"the dataset's first {new.get('samples')} records differ (the data changed)"
                               if k == "fingerprint" else f"{key} {k} {show(k, a.get(k))} (now {show(k, b.get(k))})")
        else:
            out.append(f"{key} {show(key, a)} (now {show(key, b)})")
    return out


def duration(seconds: float) -> str:
    """A rough human duration: 'about 40 s', 'about 12 min', 'about 3.5 h'."""
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


class RunDir:
    """A dataset run's output directory: its manifest and one atomically written file per sample."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    def __str__(self) -> str:
        return str(self.path)

    def relative(self, index: int) -> str:
        """Sample `index`'s file, relative to the directory (as the report's sample table names it)."""
        return f"{SAMPLES}/{index:06d}.json"

    def sample_file(self, index: int) -> Path:
        return self.path / self.relative(index)

    def check_writable(self) -> None:
        """Create the directory and write a probe into it; refuse a disk nearly full. Clear errors, before any work."""
        samples = self.path / SAMPLES
        try:
            samples.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            why = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror or err
            raise ValueError(f"cannot create the output directory {self.path}: {why}") from None
        probe = samples / f".write-probe-{os.getpid()}"
        try:
            atomic_write(probe, "x" * 4096)
            probe.unlink()
        except OSError as err:
            raise ValueError(f"cannot write to the output directory {self.path}: {err.strerror or err}") from None
        free = shutil.disk_usage(samples).free
        if free < MIN_FREE_BYTES:
            raise ValueError(f"the disk holding {self.path} has only {free / 2**20:.1f} MiB free; a dataset run needs "
                             f"at least {MIN_FREE_BYTES / 2**20:.0f} MiB for its per-sample results: free some space "
                             "or choose another output directory")

    def read_manifest(self) -> dict[str, Any] | None:
        file = self.path / MANIFEST
        if not file.is_file():
            return None
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{file} is unreadable ({err}): remove the directory or choose another one") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{file} is not the manifest of a knowmri dataset run: choose another output directory")
        return data

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write(self.path / name, json.dumps(data, indent=1, allow_nan=False) + "\n")

    def saved_files(self) -> list[Path]:
        return sorted((self.path / SAMPLES).glob("*.json"))

    def load_sample(self, index: int) -> dict[str, Any]:
        """Sample `index`'s saved result; ValueError when it is missing, unreadable or not that sample's."""
        file = self.sample_file(index)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{file} is unreadable ({type(err).__name__}: {err})") from None
        if not isinstance(data, dict) or data.get("index") != index or not isinstance(data.get("results"), dict):
            raise ValueError(f"{file} is not sample {index}'s result")
        return data

    def write_sample(self, index: int, data: dict[str, Any]) -> None:
        """Save one sample's result; on a failure (a full disk) say that the finished samples are kept."""
        try:
            atomic_write(self.sample_file(index), json.dumps(data, allow_nan=False, separators=(",", ":")))
        except OSError as err:
            raise ValueError(f"could not save sample {index} to {self.sample_file(index)}: {err.strerror or err}. "
                             f"The {len(self.saved_files())} samples finished so far are kept in {self.path / SAMPLES}; "
                             "fix the cause and rerun the same command with --resume (resume=True)") from None

    def warn_if_short_of_space(self, index: int, remaining: int) -> None:
        """Warn when `remaining` more files the size of sample `index`'s would not fit on the disk."""
        with contextlib.suppress(OSError):
            need = self.sample_file(index).stat().st_size * remaining
            free = shutil.disk_usage(self.path).free
            if need > 0.9 * free:
                warnings.warn(f"the {remaining} remaining samples need about {need / 2**20:.0f} MiB in {self.path}, but "
                              f"only {free / 2**20:.0f} MiB are free: the run will stop when the disk is full (finished "
                              "samples are kept; --resume continues)", RuntimeWarning, stacklevel=2)

    def missing(self, indices: Sequence[int]) -> list[int]:
        return [i for i in indices if not self.sample_file(i).is_file()]

    def set_aside(self, index: int) -> None:
        """Move an unreadable sample file out of the way (kept as *.corrupt for a look)."""
        file = self.sample_file(index)
        with contextlib.suppress(OSError):
            os.replace(file, file.with_name(file.name + ".corrupt"))


@dataclass
class Plan:
    """What this session does: the samples still to run, and how many were found done."""

    pending: list[int]
    found_done: int
    error: str | None = None


class DatasetRun:
    """Runs `run_one` over the first `n` samples of a dataset: resumable and data-parallel with `out`, in memory without."""

    def __init__(self, dataset: Any, model: Any, n: int, arguments: dict[str, Any], *, out: str | os.PathLike[str] | None = None,
                 resume: bool = False, progress: bool | Progress = True, echo: bool | None = None, batch: int = 1) -> None:
        self.dataset = dataset
        self.batch = batch
        self.model = model
        self.n = n
        self.arguments = arguments
        self.dir = RunDir(out) if out is not None else None
        self.resume = resume
        self.progress = progress
        self.echo = progress is not False if echo is None else echo
        self.procs: Processes = Processes()
        self.info = {"dataset": getattr(dataset, "name", "dataset"), "samples": n}

    # ------------------------------------------------------------------ the run
    def run(self, run_one: RunOne, estimate: Estimate | None = None, run_many: RunMany | None = None) -> Report:
        """Run every pending sample (this process's share of them), then the aggregate over all samples.

        With `run_many` and `batch` above 1, the samples go `batch` at a time through `run_many`."""
        if self.dir is None:
            if self.resume:
                raise ValueError("resume continues a run saved in an output directory: give out=DIR (--out DIR)")
            if processes().world > 1:
                raise ValueError("a data-parallel dataset run needs an output directory every process writes to "
                                 "(--out DIR / out=DIR)")
            return self._in_memory(run_one, estimate, run_many)
        self.procs = processes()
        plan = self.procs.broadcast(self._plan(estimate) if self.procs.main else None)
        if plan.error:
            raise ValueError(plan.error)
        if not self.procs.main:
            self.dir.check_writable()
            if not (self.dir.path / MANIFEST).is_file():
                raise ValueError(f"process {self.procs.rank} does not see {self.dir.path / MANIFEST}, which the main "
                                 "process wrote: the output directory must be on a file system every process shares")
        start = time.monotonic()
        mine = self.procs.shard(plan.pending)
        ticker = _Ticker(self, plan)
        for k, (index, data) in enumerate(self._results(mine, run_one, run_many)):
            self.dir.write_sample(index, finite(data))
            if k == 0 and self.procs.main:
                self.dir.warn_if_short_of_space(index, len(plan.pending) - 1)
            ticker.tick()
        remaining = self.dir.missing(plan.pending)
        while remaining:  # the other processes' samples
            time.sleep(POLL_SECONDS)
            remaining = self.dir.missing(remaining)
            ticker.tick()
        ticker.close()
        report = self.aggregate(range(self.n))
        report.meta["provenance"] = {"world_size": self.procs.world, "samples_found_done": plan.found_done,
                                     "compute_seconds": round(time.monotonic() - start, 3), "out": str(self.dir),
                                     "batch": self.batch}
        return report

    def _results(self, indices: list[int], run_one: RunOne, run_many: RunMany | None) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, result) of each of `indices` in order, as each finishes (`batch` at a time through `run_many`)."""
        if run_many is None or self.batch <= 1:
            for index in indices:
                yield index, run_one(index, self.dataset[index])
            return
        for start in range(0, len(indices), self.batch):
            chunk = list(indices[start:start + self.batch])
            yield from zip(chunk, run_many(chunk, [self.dataset[i] for i in chunk]), strict=True)

    def save(self, report: Report) -> None:
        """Write report.json and index.html into the run directory (the main process only)."""
        if self.dir is not None and self.procs.main:
            report.save(self.dir.path)
            with contextlib.suppress(OSError):
                (self.dir.path / PARTIAL).unlink()

    def aggregate(self, indices: Sequence[int], loaded: dict[int, dict[str, Any]] | None = None) -> Report:
        """The aggregate over saved samples, added in sample order (the same report however they were run)."""
        agg = Aggregator(self.model)
        for i in indices:
            data = loaded[i] if loaded is not None else self.dir.load_sample(i)
            entries = _table_entries(data)
            if self.dir is not None:
                entries["file"] = self.dir.relative(i)
            agg.add_saved(data, **entries)
        report = Report(model=self.model.info(), sample=dict(self.info))
        agg.report(report)
        return report

    def _in_memory(self, run_one: RunOne, estimate: Estimate | None, run_many: RunMany | None) -> Report:
        plan = Plan(pending=list(range(self.n)), found_done=0)
        self._announce_estimate(plan, estimate)
        agg = Aggregator(self.model)
        ticker = _Ticker(self, plan)
        start = time.monotonic()
        for index, result in self._results(plan.pending, run_one, run_many):
            data = json.loads(json.dumps(finite(result)))  # as if saved and read back
            agg.add_saved(data, **_table_entries(data))
            ticker.tick(done=index + 1)
        ticker.close()
        report = Report(model=self.model.info(), sample=dict(self.info))
        agg.report(report)
        report.meta["provenance"] = {"world_size": 1, "compute_seconds": round(time.monotonic() - start, 3),
                                     "batch": self.batch}
        return report

    # ------------------------------------------------------------------ planning (main process)
    def _plan(self, estimate: Estimate | None) -> Plan:
        try:
            plan = self._check_directory()
        except ValueError as err:
            return Plan([], 0, error=str(err))
        if self.resume:
            self._say(f"resuming: {plan.found_done} of {self.n} samples already done")
        self._announce_estimate(plan, estimate)
        return plan

    def _check_directory(self) -> Plan:
        run_dir = self.dir
        run_dir.check_writable()
        new = manifest(self.model, self.dataset, self.n, **self.arguments)
        old = run_dir.read_manifest()
        if old is None:
            if run_dir.saved_files():
                raise ValueError(f"{run_dir.path / SAMPLES} holds results but {run_dir} has no {MANIFEST}: "
                                 "choose another output directory")
            try:
                run_dir.write_json(MANIFEST, {**new, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
            except OSError as err:
                raise ValueError(f"cannot write {run_dir.path / MANIFEST}: {err.strerror or err}") from None
            return Plan(pending=list(range(self.n)), found_done=0)
        if not self.resume:
            done = self.n - len(run_dir.missing(range(self.n)))
            raise ValueError(f"{run_dir} already holds a dataset run ({done} of {old.get('samples')} samples saved): "
                             "rerun with --resume (resume=True) to continue it, or choose another output directory")
        diffs = differences(old, new)
        if diffs:
            raise ValueError(f"{run_dir} was made with other arguments: {'; '.join(diffs)}. Rerun with the arguments "
                             "it was made with, or choose another output directory")
        pending, found = [], 0
        for i in range(self.n):
            if not run_dir.sample_file(i).is_file():
                pending.append(i)
                continue
            try:
                run_dir.load_sample(i)
                found += 1
            except ValueError as err:
                warnings.warn(f"{err}: running sample {i} again", RuntimeWarning, stacklevel=2)
                run_dir.set_aside(i)
                pending.append(i)
        return Plan(pending=pending, found_done=found)

    def _announce_estimate(self, plan: Plan, estimate: Estimate | None) -> None:
        if estimate is None or not plan.pending or not self.echo:
            return
        try:
            cost = estimate(plan.pending)
        except Exception as err:  # an estimate never stops a run
            log.debug("no estimate: %s", err)
            return
        world = self.procs.world
        what = f"{len(plan.pending)} remaining samples" if plan.found_done else f"{len(plan.pending)} samples"
        line = f"estimate for {what}: {duration(cost.seconds)} of compute"
        if world > 1 and len(cost.per_sample) == len(plan.pending):
            line += f", {duration(cost.per_process(world))} per process on {world} processes"
        if cost.memory_bytes >= 2**20:
            line += f" (peak extra memory {cost.memory_bytes / 2**20:.0f} MiB per process)"
        self._say(line)

    def _say(self, line: str) -> None:
        if self.echo and self.procs.main:
            print(line, file=sys.stderr, flush=True)


class _Ticker:
    """Progress of the whole run on the main process (a bar, or the callback with an ETA) and partial.json."""

    def __init__(self, run: DatasetRun, plan: Plan) -> None:
        self.run = run
        self.plan = plan
        self.main = run.procs.main
        self.started = time.monotonic()
        self.done = plan.found_done
        self.next_partial = self.started + PARTIAL_EVERY
        self.bar = None
        if run.progress is True and self.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.n, initial=plan.found_done, desc="knowmri", unit="sample", leave=False)

    def tick(self, done: int | None = None) -> None:
        if not self.main:
            return
        run = self.run
        if done is None:
            done = run.n - len(run.dir.missing(self.plan.pending)) if run.dir is not None else self.done
        if done != self.done:
            if self.bar is not None:
                self.bar.update(done - self.done)
            self.done = done
            if callable(run.progress):
                this_session = done - self.plan.found_done
                left = (time.monotonic() - self.started) / this_session * (run.n - done) if this_session else 0.0
                run.progress("dataset", done / run.n, f"sample {done}/{run.n}" + (f", {duration(left)} left"
                                                                                    if done < run.n else ""))
        if run.dir is not None and done < run.n and time.monotonic() >= self.next_partial:
            self._partial(done)

    def _partial(self, done: int) -> None:
        """Rewrite partial.json from the samples saved so far (spaced by ten times what it takes)."""
        begin = time.monotonic()
        run = self.run
        present = [i for i in range(run.n) if run.dir.sample_file(i).is_file()]
        loaded = {}
        for i in present:
            with contextlib.suppress(ValueError):
                loaded[i] = run.dir.load_sample(i)
        report = run.aggregate(sorted(loaded), loaded)
        report.meta["partial"] = {"done": len(loaded), "of": run.n}
        try:
            run.dir.write_json(PARTIAL, report.to_dict())
        except OSError as err:  # the samples matter, the partial aggregate does not
            warnings.warn(f"could not write {run.dir.path / PARTIAL}: {err}", RuntimeWarning, stacklevel=2)
        self.next_partial = time.monotonic() + max(PARTIAL_EVERY, 10 * (time.monotonic() - begin))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _table_entries(data: dict[str, Any]) -> dict[str, Any]:
    """The per-sample table's entries beyond the aggregator's own: the model's answer and its probability, errors."""
    answer = data.get("answer") or {}
    return {"answer": answer.get("text"), "answer_prob": answer.get("prob"), "answer_source": answer.get("source"),
            "error": data.get("error")}

"""The model worker: one thread that runs queued diagnoses one at a time.

Only this thread runs methods, so no two methods ever hook the same model at once. A dataset run
diagnoses its records one after another (`diagnose_dataset`, saving each record's result under
`runs_dir/<id>/`), with the records done and the time left in its progress. Live
progress is kept in memory (read by the SSE stream and GET /api/runs/{id}) and written to the
store at most about once a second, and always at the end.

Cancelling (and stopping the server) is checked at every progress report of a method and, for
the long stretches some methods spend between reports (thousands of patched forward passes, a
generation), before every transformer block the worker thread runs. A cancelled run raises
`RunCancelled` there, which unwinds the method (its hooks and context managers clean up as for
any exception) up to this worker. Like KeyboardInterrupt it is not an `Exception`, so no "one
failing method never sinks a report" handler turns it into a method error and goes on.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from knowmri.server.limits import RunLimits
from knowmri.server.modelspec import ModelCache
from knowmri.server.store import INTERRUPTED, RunStore

log = logging.getLogger(__name__)

_SAVE_EVERY = 1.0  # seconds between progress writes to the store


def _finite(obj: Any) -> Any:
    """The same JSON data with infinities and NaNs as null (the store writes strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


class RunCancelled(BaseException):
    """Raised inside a run (at a progress report or before a block) to stop it: cancelled, or the server stopping."""


class LiveState:
    """The latest status and progress of active runs, with a version counter per run.

    A cancelled run's state is final: the worker, which may still be unwinding it, cannot bring it back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, dict[str, Any]] = {}

    def set(self, run_id: str, status: str, progress: dict[str, Any]) -> None:
        with self._lock:
            if self._runs.get(run_id, {}).get("status") == "cancelled":
                return
            version = self._runs.get(run_id, {}).get("version", 0) + 1
            self._runs[run_id] = {"status": status, "progress": copy.deepcopy(progress), "version": version}

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self._lock:
            state = self._runs.get(run_id)
            return dict(state) if state else None

    def drop(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)


class Worker:
    """Runs queued runs in one background thread; `submit` enqueues a run id."""

    def __init__(self, store: RunStore, models: ModelCache, live: LiveState, limits: RunLimits | None = None,
                 runs_dir: Path | None = None) -> None:
        self.store = store
        self.runs_dir = runs_dir
        self.models = models
        self.live = live
        self.limits = limits or RunLimits(None, None)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._stopping = False
        self.current: str | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="knowmri-model-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread: the current run is interrupted at its next check (and marked so);
        queued runs stay queued in the store (the next start marks them interrupted)."""
        with self._lock:
            thread = self._thread
            self._thread = None
            self._stopping = True
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)

    def cancel(self, run_id: str) -> None:
        """Stop `run_id` at its next check if it is running (or skip it when it comes up)."""
        with self._lock:
            self._cancelled.add(run_id)

    def check(self, run_id: str) -> None:
        """Raise RunCancelled if `run_id` was cancelled or the worker is stopping."""
        if self._stopping or run_id in self._cancelled:
            raise RunCancelled(run_id)

    def submit(self, run_id: str) -> None:
        self.live.set(run_id, "queued", {"fraction": 0.0, "stage": "queued", "message": "waiting for the model worker"})
        self._queue.put(run_id)

    def pending(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while True:
            run_id = self._queue.get()
            if run_id is None or self._stopping:  # runs still queued stay so in the store
                return
            self.current = run_id
            try:
                self._run(run_id)
            except RunCancelled:
                self._stopped(run_id)
            except Exception as err:  # the worker must survive anything a run does
                log.error("run %s failed:\n%s", run_id, traceback.format_exc())
                try:
                    self._fail(run_id, f"internal error: {type(err).__name__}: {err}")
                except Exception:  # the store itself failed (closed at shutdown): nothing left to record
                    log.error("could not record the failure of run %s:\n%s", run_id, traceback.format_exc())
            finally:
                self.current = None
                with self._lock:
                    self._cancelled.discard(run_id)
                self.live.drop(run_id)

    def _stopped(self, run_id: str) -> None:
        """A run that RunCancelled ended: cancelled by the user (the API already marked it), or by a shutdown."""
        if run_id in self._cancelled:
            log.info("run %s was cancelled", run_id)
            return
        log.warning("run %s was interrupted by the server stopping", run_id)
        try:
            self.store.fail(run_id, INTERRUPTED, {"fraction": 1.0, "stage": "error", "message": INTERRUPTED})
        except Exception:  # the store is closing too; the next start marks the run interrupted
            log.debug("could not mark run %s interrupted", run_id, exc_info=True)

    def _fail(self, run_id: str, message: str) -> None:
        progress = {"fraction": 1.0, "stage": "error", "message": message}
        self.store.fail(run_id, message, progress)  # the store first: a reader never sees an error without its message
        self.live.set(run_id, "error", progress)

    def _run(self, run_id: str) -> None:
        from knowmri.analysis import build_consensus
        from knowmri.diagnosis import diagnose
        from knowmri.matching import match
        from knowmri.sample import Sample

        run = self.store.get(run_id, report=False)
        if run is None or run["status"] != "queued" or run_id in self._cancelled:
            return
        if not self.store.start(run_id):  # cancelled between the two calls
            return
        progress: dict[str, Any] = {"fraction": 0.0, "stage": "loading", "message": f"loading {run['model']}",
                                    "methods": {}}
        self._publish(run_id, progress, force=True)
        try:
            model = self.models.get(self.models.catalog.resolve(run["model"]))
        except Exception as err:  # a model that fails to load fails its run, with the reason
            message = getattr(err, "message", None) or str(err) or type(err).__name__
            self._fail(run_id, f"could not load the model {run['model']!r}: {message}")
            return
        if "samples" in (run["input"] or {}):
            self._run_dataset(run_id, run, model, progress)
            return
        sample = Sample(run["sample"])
        methods = run["methods"]
        if methods is None:
            methods = [m.name for m in match(sample, model) if m.eligible]
        if not methods:
            self._fail(run_id, "no method applies to this input and model")
            return
        self.check(run_id)
        try:  # checked when the run was created if the model was at hand then; hub and local models only now
            refusal = self.limits.check(model, sample, methods, run["params"])
        except ValueError as err:  # the input does not suit this model: the run itself says so below
            log.debug("no estimate for run %s: %s", run_id, err)
            refusal = None
        if refusal:
            self._fail(run_id, refusal)
            return
        total = len(methods)
        progress.update(stage="running", total=total, methods={m: "queued" for m in methods})
        last_save = [time.monotonic()]

        def step(name: str, fraction: float, message: str) -> None:
            self.check(run_id)
            index = methods.index(name) if name in methods else 0
            progress["methods"][name] = "done" if fraction >= 1.0 else "running"
            progress.update(method=name, index=index, method_fraction=round(fraction, 4), message=message,
                            fraction=round((index + fraction) / total * 0.95, 4))
            force = time.monotonic() - last_save[0] > _SAVE_EVERY
            if force:
                last_save[0] = time.monotonic()
            self._publish(run_id, progress, force=force)

        try:
            with self._cancellable(model, run_id):
                report = diagnose(sample, model, methods=methods, params=run["params"] or None, progress=step,
                                  consensus=False)
        except ValueError as err:  # the input does not suit this model (too long, odd answer): the user's error
            self._fail(run_id, str(err))
            return
        for name, result in report.results.items():
            progress["methods"][name] = result.status
        self.check(run_id)
        progress.update(stage="consensus", fraction=0.96, message="comparing the methods' findings")
        self._publish(run_id, progress, force=False)
        report.consensus = build_consensus(report, model=model, sample=sample)
        data = _finite(report.to_dict())
        data["run_id"] = run_id
        progress.update(stage="done", fraction=1.0, message="done")
        self.store.finish(run_id, data, progress)
        self.live.set(run_id, "done", progress)

    def _run_dataset(self, run_id: str, run: dict[str, Any], model: Any, progress: dict[str, Any]) -> None:
        """Diagnose a dataset's first records; progress counts records, with the time left (the estimate until
        one has finished, then the pace so far); the report is the dataset report with its per-sample table."""
        from knowmri.data import load_dataset
        from knowmri.diagnosis import diagnose_dataset
        from knowmri.run_cost import estimate_dataset

        dataset = load_dataset(run["input"]["dataset"])
        n = min(int(run["input"]["samples"]), len(dataset))
        params = run["params"] or {}
        try:
            cost = estimate_dataset([dataset[i] for i in range(n)], model, run["methods"], params)
        except ValueError as err:  # bad parameters: the run itself fails with the reason below
            log.debug("no estimate for run %s: %s", run_id, err)
            cost = None
        refusal = self.limits.refusal(cost) if cost is not None else None
        if refusal:
            self._fail(run_id, refusal)
            return
        self.check(run_id)
        estimate = cost.seconds if cost is not None else None
        progress.update(stage="running", samples=n, samples_done=0, estimate_seconds=estimate, eta_seconds=estimate,
                        message=f"sample 0/{n}")
        self._publish(run_id, progress, force=True)
        started = time.monotonic()
        last_save = [started]

        def step(name: str, fraction: float, message: str) -> None:
            self.check(run_id)
            elapsed = time.monotonic() - started
            progress.update(fraction=round(fraction * 0.98, 4), samples_done=round(fraction * n), message=message,
                            eta_seconds=round(elapsed / fraction * (1 - fraction), 1) if fraction > 0 else estimate)
            force = time.monotonic() - last_save[0] > _SAVE_EVERY
            if force:
                last_save[0] = time.monotonic()
            self._publish(run_id, progress, force=force)

        out = self.runs_dir / run_id if self.runs_dir is not None else None
        try:
            with self._cancellable(model, run_id):
                report = diagnose_dataset(dataset, model, methods=run["methods"], params=params, progress=step,
                                          samples=n, out=out, echo=False)
        except ValueError as err:  # bad input for this model or an unwritable run directory: the user's error
            self._fail(run_id, str(err))
            return
        self.check(run_id)
        progress["methods"] = {name: result.status for name, result in report.results.items()}
        data = _finite(report.to_dict())
        data["run_id"] = run_id
        progress.update(stage="done", fraction=1.0, samples_done=n, eta_seconds=0.0, message="done")
        self.store.finish(run_id, data, progress)
        self.live.set(run_id, "done", progress)

    @contextmanager
    def _cancellable(self, model: Any, run_id: str) -> Iterator[None]:
        """Check for a cancel before each transformer block this thread runs (a no-op call otherwise), so a
        run stops within one block's time even deep inside a method's loop."""
        worker = threading.get_ident()

        def check(module: Any, args: Any) -> None:
            if threading.get_ident() == worker:  # a request thread's forward pass is not this run's
                self.check(run_id)

        handles = [layer.register_forward_pre_hook(check) for layer in getattr(model, "layers", ())]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _publish(self, run_id: str, progress: dict[str, Any], *, force: bool) -> None:
        self.live.set(run_id, "running", progress)
        if force:
            self.store.set_progress(run_id, progress)

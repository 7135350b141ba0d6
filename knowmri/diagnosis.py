"""`diagnose`: run the eligible methods on one sample and gather their results in a Report."""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from knowmri.analysis import build_consensus
from knowmri.matching import match
from knowmri.methods.base import Method, MethodResult, RunContext, get_method
from knowmri.parallel import processes
from knowmri.report.report import Report
from knowmri.run_cost import estimate_dataset
from knowmri.runtime import reuse_freed_memory
from knowmri.sample import as_sample
from knowmri.study import DatasetRun

log = logging.getLogger(__name__)

Progress = Callable[[str, float, str], None]


def diagnose(sample: Any, model: Any, methods: list[str] | str | None = None, params: dict[str, dict] | None = None,
             progress: bool | Progress = True, seed: int = 0, consensus: bool = True, samples: int | None = 20,
             out: str | os.PathLike[str] | None = None, resume: bool = False, batch_size: int = 1) -> Report:
    """Run methods on one sample (all eligible ones when `methods` is None) and return a Report.

    Given a Dataset instead of a sample, it runs on its first `samples` records and aggregates;
    with `out`, each sample's result is saved as it finishes and `resume=True` continues an
    interrupted run; `batch_size` records run at once where a method can (see `diagnose_dataset`).

    `params` maps a method name to overrides of its hyper-parameters. A method that fails yields a
    result with status "error" and its message; the others still run. `progress` is True (a bar
    on stderr), False, or a callback `(method, fraction, message)`.
    """
    from knowmri.models.loading import load_model

    dataset = _is_dataset(sample)
    if not dataset and (out is not None or resume or batch_size != 1):
        raise ValueError("out=, resume= and batch_size= are for dataset runs; save one sample's report with "
                         "report.save(DIR)")
    if isinstance(model, str):
        model = load_model(model, device=processes().model_device(None) if dataset else None)
    if dataset:
        return diagnose_dataset(sample, model, methods=methods, params=params, progress=progress, seed=seed,
                                samples=samples, out=out, resume=resume, batch_size=batch_size)
    with reuse_freed_memory():  # big buffers are reused across methods instead of mapped afresh
        return _diagnose(sample, model, methods, params, progress, seed, consensus)


def _diagnose(sample: Any, model: Any, methods: list[str] | str | None, params: dict[str, dict] | None,
              progress: bool | Progress, seed: int, consensus: bool, done: dict[str, MethodResult] | None = None,
              cache: dict | None = None) -> Report:
    """One sample's report; `done` holds results already computed (a batch of samples), `cache` its shared cache."""
    sample = as_sample(sample)
    if sample.get("prompt"):
        model.encode(sample["prompt"], sample.get("ground_truth"))  # bad input (too long, odd answer) fails here, once
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    params = dict(params or {})
    matches = {m.name: m for m in match(sample, model)}
    if methods is not None:
        for name in methods:
            get_method(name)  # unknown names fail before any work
        unknown = set(params) - set(matches)
        if unknown:
            raise ValueError(f"parameters given for unknown method(s): {', '.join(sorted(unknown))}")
    selected = methods if methods is not None else [n for n, m in matches.items() if m.eligible]
    report = Report(model=model.info(), sample=sample.to_dict())
    cache = {} if cache is None else cache
    done = done or {}
    bar = _progress_bar(len(selected)) if progress is True else None
    callback = progress if callable(progress) else None
    for i, name in enumerate(selected):
        method = get_method(name)
        m = matches[name]
        if not m.eligible:
            result = MethodResult(method=name, path=list(method.path), status="skipped",
                                  error="; ".join(m.reasons), summary="Not applicable: " + "; ".join(m.reasons) + ".")
            report.results[name] = result
            continue

        def step(fraction: float, message: str, _name: str = name, _i: int = i) -> None:
            if callback is not None:
                callback(_name, fraction, message)
            if bar is not None:
                bar.set_postfix_str(f"{_name} {fraction:.0%}", refresh=False)
                bar.n = _i + fraction
                bar.refresh()

        if name in done:
            report.results[name] = done[name]
        else:
            report.results[name] = run_method(method, model, sample, params.get(name), RunContext(step, cache, seed), seed)
        step(1.0, "done")
    if bar is not None:
        bar.close()
    if consensus:
        report.consensus = build_consensus(report, model=model, sample=sample)
    return report


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "support_keys") and hasattr(obj, "__len__") and hasattr(obj, "__getitem__")


def diagnose_dataset(dataset: Any, model: Any, methods: list[str] | str | None = None, params: dict[str, dict] | None = None,
                     progress: bool | Progress = True, seed: int = 0, samples: int | None = 20,
                     out: str | os.PathLike[str] | None = None, resume: bool = False, echo: bool | None = None,
                     batch_size: int = 1) -> Report:
    """Run methods on the first `samples` records of a dataset and aggregate them into one Report.

    Per-sample results are reduced in sample order (token importance by role, mean layer scores,
    mean causal-tracing grids by token role, neuron frequency; see `knowmri.analysis.aggregate`);
    `report.meta["samples"]` is the per-sample table. With `out`, each sample's result is written to
    `out/samples/` as soon as it finishes and the report to `out/` at the end; `resume=True` skips
    the samples already there; under `accelerate launch` the samples are dealt over the processes
    (see `knowmri.study`). A record that does not suit the model is noted in the table, not fatal.
    The cost estimate and resumption are printed on stderr when `echo` (default: unless `progress` is False).
    With `batch_size` above 1, methods that have a batched form (`Method.run_batch`) run that many
    records at once, with the same results; the others still run one record at a time.
    """
    n = len(dataset) if samples is None else min(samples, len(dataset))
    if n < 1:
        raise ValueError("the dataset is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    params = {name: dict(values) for name, values in (params or {}).items()}
    for name in [*(methods or []), *params]:
        get_method(name).Params.from_dict(params.get(name))  # unknown methods and bad values fail before any work
    run = DatasetRun(dataset, model, n, {"methods": methods, "params": params, "seed": seed}, out=out, resume=resume,
                     progress=progress, echo=echo, batch=batch_size)

    def one(index: int, sample: Any, done: dict[str, MethodResult] | None = None, cache: dict | None = None) -> dict[str, Any]:
        try:
            if done is None:
                report = diagnose(sample, model, methods=methods, params=params, progress=False, seed=seed, consensus=False)
            else:  # part of a batch: some results are in, and the sample's cache holds its batched clean pass
                report = _diagnose(sample, model, methods, params, False, seed, False, done, cache)
        except ValueError as err:  # this record does not suit the model (too long, odd answer): noted, the run goes on
            report = Report(model=model.info(), sample=as_sample(sample).to_dict())
            report.meta["error"] = str(err)
        else:
            report.meta["answer"] = _answer(model, as_sample(sample))
        report.meta["index"] = index
        return report.to_dict()

    def many(indices: list[int], records: list[Any]) -> list[dict[str, Any]]:
        caches: list[dict] = [{} for _ in records]
        done = run_batched(model, [as_sample(r) for r in records], methods, params, caches, seed)
        return [one(i, r, d, c) for i, r, d, c in zip(indices, records, done, caches)]

    with reuse_freed_memory():
        report = run.run(one, lambda indices: estimate_dataset([dataset[i] for i in indices], model, methods, params),
                         run_many=many)
    for name, result in report.results.items():
        result.path = list(get_method(name).path)
    report.consensus = {"verdict": " ".join(r.summary for r in report.results.values() if r.findings.get("subject_share") is not None)[:2000]}
    run.save(report)
    return report


def run_batched(model: Any, samples: list[Any], methods: list[str] | None, params: dict[str, dict],
                caches: list[dict], seed: int = 0) -> list[dict[str, MethodResult]]:
    """The results of the methods that have a batched form (`Method.run_batch`), per sample: each method runs
    once on the samples it applies to (and that suit the model). A method whose batch fails, or that
    declines this model, is left out: the samples then run it one at a time. Before, the clean forward
    pass the light methods share (`Method.reads_clean_pass`) runs once for the batch, into each sample's
    cache."""
    from knowmri.methods.common import clean_passes, prepare

    done: list[dict[str, MethodResult]] = [{} for _ in samples]
    usable = []
    for k, sample in enumerate(samples):
        try:
            if sample.get("prompt"):
                model.encode(sample["prompt"], sample.get("ground_truth"))
            usable.append(k)
        except ValueError:  # the sample's own run reports it
            continue
    eligible = {k: {m.name for m in match(samples[k], model) if m.eligible} for k in usable}
    names = dict.fromkeys(n for k in usable for n in (eligible[k] if methods is None else methods))
    readers = {n for n in names if get_method(n).reads_clean_pass}
    encs, contexts = [], []
    for k in usable:
        if readers & eligible[k]:
            try:
                encs.append(prepare(model, samples[k]).enc)
            except ValueError:  # the methods say why on this sample
                continue
            contexts.append(RunContext(None, caches[k], seed))
    try:
        clean_passes(model, encs, contexts)
    except Exception as err:  # the methods then run their own clean passes
        log.debug("batched clean passes failed: %s", err)
    for name in names:
        method = get_method(name)
        if type(method).run_batch is Method.run_batch:
            continue
        group = [k for k in usable if name in eligible[k]]
        if len(group) < 2:
            continue
        start = time.perf_counter()
        try:
            p = method.Params.from_dict(params.get(name))
            torch.manual_seed(seed)
            results = method.run_batch(model, [samples[k] for k in group], p,
                                       [RunContext(None, caches[k], seed) for k in group])
        except Exception as err:  # any failure: the samples run this method one at a time
            log.debug("batched %s failed, running it per sample: %s", name, err)
            continue
        if results is None:
            continue
        seconds = round((time.perf_counter() - start) / len(group), 4)
        for k, result in zip(group, results, strict=True):
            result.params = p.to_dict()
            result.seconds = seconds
            done[k][name] = result
    return done


def _answer(model: Any, sample: Any) -> dict[str, Any] | None:
    """The answer the sample teacher-forces (its ground truth, else the model's top prediction) and its probability."""
    from knowmri.methods.common import answer_prob, prepare

    try:
        prepared = prepare(model, sample)
        with torch.inference_mode():
            logits = model.forward(**prepared.enc.inputs())
        prob = float(answer_prob(logits, prepared.enc)[0])
    except Exception as err:  # the table's answer column never sinks a sample
        log.debug("no answer probability: %s", err)
        return None
    return {"text": prepared.answer, "prob": prob if prob == prob else None, "source": prepared.answer_source}


def run_method(method: Any, model: Any, sample: Any, overrides: dict | None, ctx: RunContext, seed: int = 0) -> MethodResult:
    """Run one method, turning any failure into a result with status "error" (never raising)."""
    start = time.perf_counter()
    try:
        params = method.Params.from_dict(overrides)
    except ValueError as err:
        return MethodResult(method=method.name, path=list(method.path), status="error", error=str(err),
                            summary=f"Failed: {err}")
    try:
        torch.manual_seed(seed)
        with reuse_freed_memory():
            result = method.run(model, sample, params, ctx)
        result.params = params.to_dict()
    except Exception as err:  # one failing method never sinks a report
        log.debug("method %s failed:\n%s", method.name, traceback.format_exc())
        message = str(err) or type(err).__name__
        result = MethodResult(method=method.name, path=list(method.path), status="error",
                              error=f"{type(err).__name__}: {message}" if not isinstance(err, ValueError) else message,
                              params=params.to_dict(), summary=f"Failed: {message}")
    result.seconds = round(time.perf_counter() - start, 4)
    return result


def _progress_bar(total: int, unit: str = "method") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="knowmri", unit=unit, leave=False)

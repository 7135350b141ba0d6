"""The JSON API under the page (docs/SERVER.md): models, datasets, methods, matching, parsing and runs.

Every input is checked before it reaches the library: bodies by pydantic (`schemas`), model specs
by the catalog, method names by the registry, hyper-parameters by each method's `Params`, dataset
names and indices against the built-ins. Bad input is a 4xx with a message; unknown ids a 404.
A run whose estimated time or memory is over the server's caps is refused (400) before it is queued.
A dataset run (`dataset` with `samples`) diagnoses a built-in dataset's first records one after
another; its estimate is every record's, added up, and each record's result is kept beside the store.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from knowmri.server.errors import ApiError, bad_request, not_found
from knowmri.server.limits import RunLimits
from knowmri.server.modelspec import ModelCache, ModelCatalog, ModelRef
from knowmri.server.schemas import MAX_SAMPLES, MAX_TEXT, InputBody, MatchBody, ParseBody, RunBody
from knowmri.server.store import RunStore
from knowmri.server.worker import LiveState, Worker

RUN_ID = re.compile(r"^[0-9a-f]{16}$")
MAX_QUEUED = 100
TERMINAL = ("done", "error", "cancelled")


@dataclass
class ServerState:
    """Everything the routes share: the store, models, the worker and a few caches."""

    store: RunStore
    catalog: ModelCatalog
    models: ModelCache
    live: LiveState
    worker: Worker | None
    token: str | None = None
    limits: RunLimits = field(default_factory=RunLimits)
    runs_dir: FilePath | None = None  # dataset runs keep their per-sample results in runs_dir/<id>/samples
    _datasets: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def dataset_names(self) -> list[str]:
        from knowmri.data import datasets

        return [d["name"] for d in datasets()]

    def dataset(self, name: str, *, status: int = 400) -> Any:
        """A built-in dataset by name (loaded once); only built-ins, never a path or a hub id."""
        from knowmri.data import load_dataset

        names = self.dataset_names()
        if name not in names:
            raise ApiError(status, f"unknown dataset {name!r}; built-in datasets: {', '.join(names)}")
        with self._lock:
            if name not in self._datasets:
                self._datasets[name] = load_dataset(name)
            return self._datasets[name]

    def load_model(self, spec: str) -> Any:
        """A model for a request (loaded through the cache); a model that fails to load is the user's 400."""
        ref = self.catalog.resolve(spec)
        try:
            return self.models.get(ref)
        except Exception as err:  # any loading failure of a user-given spec: say why, never a 500
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise bad_request(f"could not load the model {spec!r}: {message}") from None

    def model_at_hand(self, ref: ModelRef) -> Any | None:
        """The model for a ref when it comes without a download or a folder of unknown weights: a registered
        model, a preset (from its package; loaded once into the cache) or one already loaded; else None."""
        if ref.kind in ("registered", "preset"):
            return self.load_model(ref.key)
        return self.models.peek(ref)

    def run_state(self, run_id: str, *, report: bool = True) -> dict[str, Any]:
        """A run as the API shows it, with live progress when the worker has fresher news."""
        if not RUN_ID.match(run_id):
            raise not_found(f"no run {run_id!r}")
        row = self.store.get(run_id, report=report)
        if row is None:
            raise not_found(f"no run {run_id!r}")
        with_live_progress(row, self.live)
        if row.get("report") is None:
            row.pop("report", None)
        return row


def with_live_progress(row: dict[str, Any], live: LiveState) -> None:
    """Show the worker's fresher status on a stored run that is still active.

    A finished state comes from the store only: it holds the report or the error message, which the
    live state does not, and the worker writes the store before it announces the end."""
    state = live.get(row["id"])
    if state is not None and row["status"] not in TERMINAL and state["status"] not in TERMINAL:
        row["status"], row["progress"] = state["status"], state["progress"]


def state_of(request: Request) -> ServerState:
    return request.app.state.knowmri


def check_token(request: Request) -> None:
    """With a token configured, every API call must carry it (Bearer header, or ?token= for links)."""
    token = state_of(request).token
    if not token:
        return
    given = request.query_params.get("token", "")
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        given = header[7:].strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "this server needs a token: send 'Authorization: Bearer <token>' or add ?token=<token>")


router = APIRouter(prefix="/api", dependencies=[Depends(check_token)])


def _user_error(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call library code, turning its ValueError (bad user input, by convention) into a 400."""
    try:
        return fn(*args, **kwargs)
    except ApiError:
        raise
    except (ValueError, IndexError, KeyError) as err:
        raise bad_request(str(err).strip("'\"") or type(err).__name__) from None


def _sample_of(state: ServerState, body: InputBody, *, dataset_ok: bool = False) -> tuple[Any, dict[str, Any]]:
    """The Sample (or Dataset, for matching with `dataset_ok` and no index) a body describes, and extras."""
    import knowmri as km

    if body.text is not None:
        sample = _user_error(km.from_text, body.text)
        return sample, {"missing": list(getattr(sample, "missing", []))}
    if body.sample is not None:
        sample = _user_error(km.Sample, body.sample)
        if not sample.get("prompt"):
            raise bad_request("the sample needs a 'prompt'")
        return sample, {}
    ds = state.dataset(body.dataset or "")
    if body.index is None and dataset_ok:
        return ds, {"dataset": ds.info()}
    index = 0 if body.index is None else body.index
    if not -len(ds) <= index < len(ds):
        raise bad_request(f"index {index} is out of range: {ds.name} has {len(ds)} records (0..{len(ds) - 1})")
    return ds[index], {"dataset": ds.info(), "index": index}


def _check_params(methods: list[str] | None, params: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    from knowmri.methods.base import get_method

    out = {}
    for name, values in (params or {}).items():
        method = _user_error(get_method, name)
        if methods is not None and name not in methods:
            raise bad_request(f"parameters were given for {name!r}, which is not among the chosen methods")
        try:
            method.Params.from_dict(values)
        except (ValueError, TypeError) as err:
            raise bad_request(f"{name}: {err}") from None
        out[name] = dict(values)
    return out


# ---------------------------------------------------------------------------- catalog
@router.get("/health")
def health(request: Request) -> dict[str, Any]:
    from knowmri import __version__

    state = state_of(request)
    worker = state.worker
    return {"status": "ok", "version": __version__, "runs": state.store.count(),
            "worker": {"enabled": worker is not None, "current": worker.current if worker else None,
                       "queued": worker.pending() if worker else 0},
            "models_loaded": state.models.loaded(), "auth": bool(state.token), "limits": state.limits.to_dict()}


@router.get("/models")
def models(request: Request) -> dict[str, Any]:
    import knowmri as km
    from knowmri.models.arch import arch_specs

    state = state_of(request)
    registered = [{"name": name, **_model_info(m)} for name, m in state.catalog.registered.items()]
    presets = km.presets()
    default = registered[0]["name"] if registered else next((p["name"] for p in presets if p["installed"]), None)
    return {"registered": registered, "presets": presets, "local": state.catalog.local_folders(),
            "roots": [str(r) for r in state.catalog.roots], "families": sorted(arch_specs()),
            "loaded": state.models.loaded(), "default": default}


def _model_info(model: Any) -> dict[str, Any]:
    info = getattr(model, "info", None)
    return info() if callable(info) else {}


@router.get("/datasets")
def datasets() -> list[dict[str, Any]]:
    import knowmri as km

    return km.datasets()


@router.get("/datasets/{name}/records")
def dataset_records(request: Request, name: str, offset: int = Query(0, ge=0, le=10_000_000),
                    limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
    ds = state_of(request).dataset(name, status=404)
    if offset > len(ds):
        raise bad_request(f"offset {offset} is past the end: {name} has {len(ds)} records")
    records = [{"index": i, "sample": ds[i].to_dict()} for i in range(offset, min(len(ds), offset + limit))]
    return {"name": ds.name, "total": len(ds), "offset": offset, "limit": limit, "info": ds.info(), "records": records}


@router.get("/methods")
def methods() -> list[dict[str, Any]]:
    import knowmri as km

    return km.methods()


# ---------------------------------------------------------------------------- inputs
@router.post("/parse")
def parse(body: ParseBody) -> dict[str, Any]:
    import knowmri as km

    sample = _user_error(km.from_text, body.text)
    return {"sample": sample.to_dict(), "keys": list(sample.keys()), "missing": list(getattr(sample, "missing", []))}


@router.get("/suggest")
def suggest(text: str = Query(..., min_length=1, max_length=MAX_TEXT), k: int = Query(5, ge=1, le=20),
            backend: str = Query("auto", pattern="^(auto|semantic|lexical)$")) -> dict[str, Any]:
    import knowmri as km

    if not text.strip():
        raise bad_request("the text is empty")
    try:
        return km.suggest(text, k=k, backend=backend)
    except RuntimeError as err:  # the semantic backend asked for but not installed
        raise ApiError(409, str(err)) from None


@router.post("/match")
def match(request: Request, body: MatchBody) -> dict[str, Any]:
    import knowmri as km

    state = state_of(request)
    target, extra = _sample_of(state, body, dataset_ok=True)
    model = None
    if body.model:
        model = state.load_model(body.model)
    matches = [m.to_dict() for m in km.match(target, model, estimate=model is not None)]
    sample = target.to_dict() if isinstance(target, km.Sample) else None
    return {"model": body.model, "sample": sample, **extra, "matches": matches}


# ---------------------------------------------------------------------------- runs
def _dataset_samples(state: ServerState, body: RunBody) -> tuple[Any, list[Any]]:
    """A dataset run's built-in dataset and its first `samples` records (fewer when it has fewer)."""
    ds = state.dataset(body.dataset or "")
    n = min(int(body.samples or 0), len(ds))
    if n < 1:
        raise bad_request(f"the dataset {ds.name} is empty")
    return ds, [ds[i] for i in range(n)]


def _check_methods(target: Any, methods: list[str] | None) -> None:
    """Unknown methods, and chosen methods that do not apply to the input (or to every record of a dataset), are 400s."""
    import knowmri as km
    from knowmri.methods.base import get_method

    if methods is None:
        return
    for name in methods:
        _user_error(get_method, name)
    reasons = {m.name: m.reasons for m in km.match(target) if m.name in methods and not m.eligible}
    if reasons:
        raise bad_request("; ".join(f"{n} does not apply: {', '.join(r)}" for n, r in reasons.items()))


def _check_queue(state: ServerState) -> None:
    if state.worker is not None and state.worker.pending() >= MAX_QUEUED:
        raise ApiError(429, f"{MAX_QUEUED} runs are already waiting; try again when some have finished")


def _create_dataset_run(state: ServerState, ref: ModelRef, body: RunBody) -> dict[str, Any]:
    from knowmri.run_cost import estimate_dataset

    ds, samples = _dataset_samples(state, body)
    _check_methods(ds, body.methods)
    params = _check_params(body.methods, body.params)
    _check_queue(state)
    estimate = None
    model = state.model_at_hand(ref)
    if model is not None:  # else the worker estimates and checks it once it has loaded the model
        cost = _user_error(estimate_dataset, samples, model, body.methods, params)
        refusal = state.limits.refusal(cost)
        if refusal:
            raise bad_request(refusal)
        estimate = cost.to_dict()
    given = {"dataset": ds.name, "samples": len(samples)}
    run_id = state.store.create(model=body.model.strip(), methods=body.methods, params=params, input=given,
                                sample=dict(given))
    if state.worker is not None:
        state.worker.submit(run_id)
    return {"id": run_id, "status": "queued", "samples": len(samples), **({"estimate": estimate} if estimate else {})}


@router.post("/runs", status_code=201)
def create_run(request: Request, body: RunBody) -> dict[str, Any]:
    state = state_of(request)
    ref = state.catalog.resolve(body.model)
    if body.samples is not None:
        return _create_dataset_run(state, ref, body)
    sample, extra = _sample_of(state, body)
    _check_methods(sample, body.methods)
    params = _check_params(body.methods, body.params)
    _check_queue(state)
    _check_limits(state, ref, sample, body.methods, params)
    given = {k: v for k, v in (("text", body.text), ("sample", body.sample), ("dataset", body.dataset)) if v is not None}
    if "index" in extra:
        given["index"] = extra["index"]
    run_id = state.store.create(model=body.model.strip(), methods=body.methods, params=params, input=given,
                                sample=sample.to_dict())
    if state.worker is not None:
        state.worker.submit(run_id)
    return {"id": run_id, "status": "queued", **({"missing": extra["missing"]} if "missing" in extra else {})}


def _check_limits(state: ServerState, ref: ModelRef, sample: Any, methods: list[str] | None,
                  params: dict[str, dict[str, Any]]) -> None:
    """Refuse a run whose estimate is over the server's caps (when its model is at hand; the worker
    checks the others once it has loaded them)."""
    import knowmri as km

    if state.limits.max_seconds is None and state.limits.max_memory_bytes is None:
        return
    model = state.model_at_hand(ref)
    if model is None:
        return
    if methods is None:
        methods = [m.name for m in km.match(sample, model) if m.eligible]
    refusal = state.limits.check(model, sample, methods, params)
    if refusal:
        raise bad_request(refusal)


@router.post("/estimate")
def estimate(request: Request, body: RunBody) -> dict[str, Any]:
    """The predicted cost of a run before it is started: a dataset run's is every record's estimate, added up."""
    import knowmri as km
    from knowmri.run_cost import estimate_dataset, estimate_run

    state = state_of(request)
    model = state.load_model(body.model)
    if body.samples is not None:
        ds, samples = _dataset_samples(state, body)
        _check_methods(ds, body.methods)
        params = _check_params(body.methods, body.params)
        cost = _user_error(estimate_dataset, samples, model, body.methods, params)
    else:
        sample, _ = _sample_of(state, body)
        _check_methods(sample, body.methods)
        params = _check_params(body.methods, body.params)
        methods = body.methods or [m.name for m in km.match(sample, model) if m.eligible]
        cost = _user_error(estimate_run, model, sample, methods, params)
    return {"model": body.model, **cost.to_dict(), "refusal": state.limits.refusal(cost)}


@router.get("/runs")
def list_runs(request: Request, limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=10_000_000),
              status: str | None = Query(None, pattern="^(queued|running|done|error|cancelled)$")) -> dict[str, Any]:
    state = state_of(request)
    runs = state.store.list(limit=limit, offset=offset, status=status)
    for run in runs:
        with_live_progress(run, state.live)
    return {"runs": runs, "total": state.store.count(status), "limit": limit, "offset": offset}


@router.get("/runs/{run_id}")
def get_run(request: Request, run_id: str, report: bool = True) -> dict[str, Any]:
    return state_of(request).run_state(run_id, report=report)


@router.delete("/runs/{run_id}")
def delete_run(request: Request, run_id: str) -> dict[str, Any]:
    state = state_of(request)
    run = state.run_state(run_id, report=False)
    if run["status"] not in TERMINAL:
        raise ApiError(409, f"run {run_id} is {run['status']}; only finished runs can be deleted")
    state.store.delete(run_id)
    if state.runs_dir is not None:
        shutil.rmtree(state.runs_dir / run_id, ignore_errors=True)
    return {"id": run_id, "deleted": True}


@router.get("/runs/{run_id}/samples/{index}")
def run_sample(request: Request, run_id: str, index: int = Path(..., ge=0, le=MAX_SAMPLES)) -> Response:
    """One record's own report (report.json's structure, with its `index` and the model's `answer`) from a dataset run."""
    from knowmri.study import RunDir

    state = state_of(request)
    state.run_state(run_id, report=False)  # 404 for an unknown run
    file = RunDir(state.runs_dir / run_id).sample_file(index) if state.runs_dir is not None else None
    if file is None or not file.is_file():
        raise not_found(f"run {run_id} has no saved sample {index}")
    return Response(file.read_text(encoding="utf-8"), media_type="application/json")


@router.post("/runs/{run_id}/cancel")
def cancel_run(request: Request, run_id: str) -> dict[str, Any]:
    """Cancel a queued or running run; it is `cancelled` at once, and the worker stops computing it at
    the method's next progress report or transformer block. Cancelling again is fine; a finished run, 409."""
    state = state_of(request)
    run = state.run_state(run_id, report=False)
    if run["status"] in TERMINAL and run["status"] != "cancelled":
        raise ApiError(409, f"run {run_id} is {run['status']} already; only queued or running runs can be cancelled")
    progress = {**(run.get("progress") or {}), "stage": "cancelled", "message": "cancelled"}
    if state.store.cancel(run_id, progress) and state.worker is not None:  # the store first: it decides
        state.worker.cancel(run_id)
        state.live.set(run_id, "cancelled", progress)
    run = state.run_state(run_id, report=False)
    if run["status"] != "cancelled":  # it finished between the two reads
        raise ApiError(409, f"run {run_id} is {run['status']} already; only queued or running runs can be cancelled")
    return run


@router.get("/runs/{run_id}/events")
async def run_events(request: Request, run_id: str) -> Any:
    """Server-sent events: `progress` while the run changes, then one `done`, `error` or `cancelled`, then the end."""
    from sse_starlette.sse import EventSourceResponse

    state = state_of(request)
    await run_in_threadpool(state.run_state, run_id, report=False)  # 404 before streaming

    async def events() -> Any:
        last = None
        while True:
            live = state.live.get(run_id)
            if live is not None and live["status"] not in TERMINAL:
                current = {"status": live["status"], "progress": live["progress"]}
            else:
                row = await run_in_threadpool(state.store.get, run_id, report=False)
                if row is None:
                    yield {"event": "error", "data": json.dumps({"status": "error", "error": "the run was deleted"})}
                    return
                current = {"status": row["status"], "progress": row["progress"], "error": row.get("error")}
            text = json.dumps(current)
            if text != last:
                last = text
                yield {"event": "progress", "data": text}
            if current["status"] in TERMINAL:
                yield {"event": current["status"], "data": text}
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.2)

    return EventSourceResponse(events(), ping=15)


def _report_text(state: ServerState, run_id: str) -> str:
    run = state.run_state(run_id, report=False)
    text = state.store.report_text(run_id)
    if text is None:
        raise ApiError(409, f"run {run_id} has no report yet (it is {run['status']})")
    return text


def _download(download: bool, name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'} if download else {}


@router.get("/runs/{run_id}/report.json")
def report_json(request: Request, run_id: str, download: bool = False) -> Response:
    text = _report_text(state_of(request), run_id)
    return Response(text, media_type="application/json", headers=_download(download, f"knowmri-{run_id}.json"))


@router.get("/runs/{run_id}/report.html")
def report_html(request: Request, run_id: str, download: bool = False) -> HTMLResponse:
    from knowmri.report.html import render_html

    data = json.loads(_report_text(state_of(request), run_id))
    return HTMLResponse(render_html(data), headers=_download(download, f"knowmri-{run_id}.html"))


def json_error(status: int, message: str, detail: Any = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail if detail is not None else message}, status_code=status)

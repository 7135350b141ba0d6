"""`knowmri serve`: the web UI (docs/SERVER.md) — the page, its JSON API, the run store and the model worker.

    from knowmri.server.app import create_app      # an ASGI app (for tests, or any ASGI server)
    from knowmri.server.app import serve           # what `knowmri serve` runs (uvicorn)

The page is static (plain JS modules, no build step); the report renderer comes from
`knowmri/report/static` (the saved index.html inlines the same file) and Plotly's JavaScript from the
installed `plotly` package, so nothing is fetched from a CDN.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import logging
import os
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from knowmri.server.api import ServerState, json_error, router
from knowmri.server.errors import ApiError
from knowmri.server.limits import DEFAULT_MAX_SECONDS, default_limits
from knowmri.server.modelspec import ModelCache, ModelCatalog
from knowmri.server.store import RunStore
from knowmri.server.worker import LiveState, Worker

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20  # bytes in a request body
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


def create_app(home: str | Path | None = None, token: str | None = None, worker: bool = True,
               model_roots: list[str | Path] | None = None, models: dict[str, Any] | None = None, *,
               allowed_hosts: list[str] | None = None, cache_size: int = 2, device: str | None = None,
               max_run_seconds: float | None = DEFAULT_MAX_SECONDS, max_run_memory: int | None = None) -> FastAPI:
    """The ASGI app.

    `home` holds `runs.sqlite`, dataset runs' per-sample results (`runs/<id>/`) and the default model root (`$KNOWMRI_HOME`, default ~/.knowmri).
    `token`, when set, must come with every API call. `worker=False` queues runs without running
    them (API tests). `model_roots` are the folders local models may be loaded from (besides
    `home/models`). `models` registers in-process models by name (an embedding and test hook).
    `allowed_hosts` rejects other Host headers (DNS-rebinding guard for a loopback server).
    `max_run_seconds` and `max_run_memory` (bytes; default 3/4 of the RAM, or of the GPU's memory
    with device cuda) cap one run's estimate; 0 or None turns a cap off (None keeps the memory default).
    On shutdown the worker stops the current run and the run store is checkpointed and closed.
    """
    from knowmri.methods.base import load_builtin_methods
    from knowmri.models.loading import load_model
    from knowmri.models.presets import home as default_home

    load_builtin_methods()  # once, before requests arrive from several threads
    limits = default_limits(device, max_run_seconds, max_run_memory)
    root = Path(home).expanduser() if home is not None else default_home()
    store = RunStore(root / "runs.sqlite")
    interrupted = store.recover()
    if interrupted:
        log.warning("%d run(s) were interrupted by a restart and are marked as errors", len(interrupted))
    registered = {name: load_model(m) for name, m in (models or {}).items()}
    catalog = ModelCatalog(registered, [*(Path(r) for r in model_roots or []), root / "models"])
    cache_ = ModelCache(catalog, size=cache_size, device=device)
    live = LiveState()
    runs_dir = root / "runs"
    runner = Worker(store, cache_, live, limits, runs_dir=runs_dir) if worker else None
    state = ServerState(store=store, catalog=catalog, models=cache_, live=live, worker=runner, token=token or None,
                        limits=limits, runs_dir=runs_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        if runner is not None:
            runner.stop()
        store.close()

    public_docs = not token  # with a token, no unauthenticated schema pages either
    app = FastAPI(title="knowmri", version=_version(), lifespan=lifespan, docs_url="/api/docs" if public_docs else None,
                  openapi_url="/api/openapi.json" if public_docs else None, redoc_url=None)
    app.state.knowmri = state
    app.include_router(router)
    _add_error_handlers(app)
    _add_page(app)
    app.add_middleware(GZipMiddleware, minimum_size=2048)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(_BodyLimit, limit=MAX_BODY)
    if runner is not None:
        runner.start()
    return app


def _version() -> str:
    from knowmri import __version__

    return __version__


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> Response:
        return json_error(err.status, err.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> Response:
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in err.errors()]
        message = "; ".join(_describe(e) for e in errors) or "invalid request"
        return json_error(422, message, errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        message = err.detail if isinstance(err.detail, str) else "request failed"
        if err.status_code == 404 and message == "Not Found":
            message = f"no such page or endpoint: {request.url.path}"
        return json_error(err.status_code, message)

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> Response:  # genuine bugs only: bad input never gets here
        log.exception("internal error on %s %s", request.method, request.url.path)
        return json_error(500, f"internal error: {type(err).__name__}: {err}")


def _describe(error: dict[str, Any]) -> str:
    loc = [x for x in error["loc"] if x not in ("body", "query", "path")]
    msg = error["msg"].removeprefix("Value error, ")
    return f"{'.'.join(loc)}: {msg}" if loc else msg


@cache
def _plotly_bundle() -> tuple[bytes, bytes, str]:
    """Plotly's JS from the installed package: raw, gzipped, and its ETag."""
    from knowmri.report.html import plotly_js

    raw = plotly_js().encode("utf-8")
    return raw, gzip.compress(raw, 6), '"' + hashlib.sha256(raw).hexdigest()[:20] + '"'


def _add_page(app: FastAPI) -> None:
    from knowmri.report.html import ASSETS

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly(request: Request) -> Response:
        raw, packed, etag = _plotly_bundle()
        headers = {"Cache-Control": "public, max-age=604800", "ETag": etag, "Vary": "Accept-Encoding"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(packed, media_type="application/javascript", headers={**headers, "Content-Encoding": "gzip"})
        return Response(raw, media_type="application/javascript", headers=headers)

    app.mount("/static/report", StaticFiles(directory=ASSETS), name="report")  # the report renderer, shared
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


class _BodyLimit:
    """Refuse request bodies above `limit` bytes: by Content-Length, or by reading a chunked body first."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = json_error(413, f"the request body is larger than {self.limit} bytes")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await too_large(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.limit:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _describe_limits(limits: Any) -> str:
    from knowmri.run_cost import format_bytes, format_seconds

    caps = [f"{format_seconds(limits.max_seconds)} (--max-run-seconds)" if limits.max_seconds else "",
            f"{format_bytes(limits.max_memory_bytes)} of memory (--max-run-memory)" if limits.max_memory_bytes else ""]
    caps = [c for c in caps if c]
    return f"runs estimated above {' or '.join(caps)} are refused" if caps else "runs are not capped"


def _default_device() -> str | None:
    import torch

    return "cuda" if torch.cuda.is_available() else None


def serve(host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          max_run_seconds: float | None = DEFAULT_MAX_SECONDS, max_run_memory: int | None = None) -> int:
    """Run the UI with uvicorn until interrupted (Ctrl+C or SIGTERM: the store is closed cleanly).
    A non-loopback address needs a token. `max_run_seconds`/`max_run_memory` cap one run (see `create_app`).

    Environment: `KNOWMRI_HOME` (run store, default model root), `KNOWMRI_MODEL_ROOTS` (more folders
    local models may be loaded from, `os.pathsep`-separated), `KNOWMRI_DEVICE` (cpu or cuda; default
    cuda when present), `KNOWMRI_TOKEN` (the token, when not given).
    """
    import uvicorn

    token = token or os.environ.get("KNOWMRI_TOKEN") or None
    loopback = is_loopback(host)
    if not loopback and not token:
        raise ValueError(f"binding {host} exposes the server beyond this machine: give a token with --token "
                         "or KNOWMRI_TOKEN (every API call must then carry it)")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    roots = [r for r in os.environ.get("KNOWMRI_MODEL_ROOTS", "").split(os.pathsep) if r.strip()]
    app = create_app(token=token, model_roots=roots, allowed_hosts=LOOPBACK_HOSTS if loopback else None,
                     device=os.environ.get("KNOWMRI_DEVICE") or _default_device(),
                     max_run_seconds=max_run_seconds, max_run_memory=max_run_memory)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"knowmri: serving the UI at {url}  (Ctrl+C to stop)", flush=True)
    print(f"knowmri: {_describe_limits(app.state.knowmri.limits)}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0

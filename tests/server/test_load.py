"""A bounded load test on loopback: 100 concurrent API reads while 5 runs are queued at once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from knowmri.server.app import create_app
from knowmri.server.background import BackgroundServer
from tests.server.conftest import FACT, MODEL


def test_concurrent_reads_and_runs(tmp_path: Path, tiny_gpt2: Any) -> None:
    with BackgroundServer(create_app(home=tmp_path, models={MODEL: tiny_gpt2})) as server:
        base = server.url.rstrip("/")

        def post_run(i: int) -> str:
            with httpx.Client(timeout=30) as c:
                r = c.post(f"{base}/api/runs", json={"model": MODEL, "text": f"{FACT} {i}", "methods": ["logit_lens"]})
                assert r.status_code == 201, r.text
                return r.json()["id"]

        paths = ["/api/health", "/api/runs", "/api/methods", "/api/models", "/api/datasets"]

        def read(i: int) -> int:
            with httpx.Client(timeout=30) as c:
                return c.get(base + paths[i % len(paths)]).status_code

        with ThreadPoolExecutor(max_workers=24) as pool:
            runs = pool.map(post_run, range(5))
            reads = list(pool.map(read, range(100)))
            run_ids = list(runs)
        assert reads == [200] * 100
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < deadline:
                statuses = [c.get(f"{base}/api/runs/{i}?report=false").json()["status"] for i in run_ids]
                if all(s in ("done", "error") for s in statuses):
                    break
                time.sleep(0.1)
            assert statuses == ["done"] * 5
            listed = c.get(f"{base}/api/runs").json()
            assert listed["total"] == 5 and {r["id"] for r in listed["runs"]} == set(run_ids)
            for run_id in run_ids:
                assert c.get(f"{base}/api/runs/{run_id}").json()["report"]["results"]["logit_lens"]["status"] == "ok"

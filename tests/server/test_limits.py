"""Hardening of the run API: caps on a run's estimate, cancelling, non-finite and unbounded parameters."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from knowmri.hooks import Hooks
from knowmri.methods.base import Estimate, Method, Params, register_method, unregister_method
from knowmri.server.app import create_app
from knowmri.server.limits import RunLimits, default_limits
from tests.server.conftest import FACT, MODEL, wait_done
from tests.server.test_api import assert_error, run_body

SLOW = "slow_probe"


@dataclass
class SlowParams(Params):
    report: bool = False  # report progress after every forward pass (else only once, at the start)


class SlowProbe(Method):
    """A test method that hooks the model and runs forward passes for up to a minute."""

    name = SLOW
    title = "Slow probe (test)"
    path = ("Internal", "Test")
    Params = SlowParams

    def estimate(self, model: Any, sample: Any, params: Params | None = None) -> Estimate:
        return Estimate(seconds=0.5, memory_bytes=1000)

    def run(self, model: Any, sample: Any, params: Params, ctx: Any) -> Any:
        enc = model.encode(sample["prompt"])
        ctx.progress(0.5, "probing")
        with Hooks(model) as hooks, torch.no_grad():
            hooks.read("blocks.0.resid_post")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                model.hf_model(**enc.inputs())
                if params.report:
                    ctx.progress(0.5, "probing")
                time.sleep(0.01)
        return self.new_result(params)


@pytest.fixture
def slow_method() -> Iterator[None]:
    register_method(SlowProbe)
    yield
    unregister_method(SLOW)


def wait_for(client: TestClient, run_id: str, statuses: tuple[str, ...], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run = client.get(f"/api/runs/{run_id}?report=false").json()
        if run["status"] in statuses or time.monotonic() > deadline:
            return run
        time.sleep(0.02)


def hooks(model: Any) -> set[tuple[str, int]]:
    """The model's forward hooks but those transformers installs for good (output capturing, on first use)."""
    return {(name, key) for name, m in model.hf_model.named_modules()
            for key, fn in (*m._forward_hooks.items(), *m._forward_pre_hooks.items())
            if not getattr(fn, "__module__", "").startswith("transformers")}


# ---------------------------------------------------------------------------- caps
def test_a_run_over_the_time_cap_is_refused_with_the_estimate_and_the_cap(home: Path, tiny_gpt2: Any) -> None:
    with TestClient(create_app(home=home, models={MODEL: tiny_gpt2}, worker=False, max_run_seconds=1e-6)) as c:
        response = c.post("/api/runs", json=run_body(methods=["logit_lens", "causal_tracing"]))
        assert_error(response, 400, "estimated to take")
        message = response.json()["error"]
        assert "cap of" in message and "--max-run-seconds" in message and "causal_tracing" in message
        assert c.get("/api/runs").json()["total"] == 0
        assert c.get("/api/health").json()["limits"]["max_run_seconds"] == 1e-6


def test_a_run_over_the_memory_cap_is_refused(home: Path, tiny_gpt2: Any) -> None:
    with TestClient(create_app(home=home, models={MODEL: tiny_gpt2}, worker=False, max_run_memory=1)) as c:
        assert_error(c.post("/api/runs", json=run_body()), 400, "--max-run-memory")


def test_caps_off_and_defaults(home: Path, tiny_gpt2: Any) -> None:
    with TestClient(create_app(home=home, models={MODEL: tiny_gpt2}, worker=False, max_run_seconds=0,
                               max_run_memory=0)) as c:
        assert c.post("/api/runs", json={"model": MODEL, "text": FACT}).status_code == 201
        assert c.get("/api/health").json()["limits"] == {"max_run_seconds": None, "max_run_memory_bytes": None}
    limits = default_limits()
    assert limits.max_seconds == 3600 and limits.max_memory_bytes and limits.max_memory_bytes > 1 << 20
    with pytest.raises(ValueError, match="non-negative"):
        default_limits(max_seconds=-1)
    assert RunLimits(None, None).check(None, None, ["logit_lens"], None) is None


def test_the_worker_checks_the_cap_of_a_model_it_loads(tmp_path: Path, tiny_gpt2: Any) -> None:
    root = tmp_path / "models"
    tiny_gpt2.hf_model.save_pretrained(root / "tiny")
    tiny_gpt2.tokenizer.save_pretrained(root / "tiny")
    with TestClient(create_app(home=tmp_path / "home", model_roots=[root], max_run_seconds=1e-6)) as c:
        created = c.post("/api/runs", json=run_body(model=str(root / "tiny")))
        assert created.status_code == 201, created.text  # not loaded yet: no estimate at this point
        run = wait_done(c, created.json()["id"])
        assert run["status"] == "error" and "estimated to take" in run["error"] and "cap" in run["error"]


# ---------------------------------------------------------------------------- cancel
def test_cancel_a_queued_run(idle: TestClient) -> None:
    run_id = idle.post("/api/runs", json=run_body()).json()["id"]
    cancelled = idle.post(f"/api/runs/{run_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    run = cancelled.json()
    assert run["id"] == run_id and run["status"] == "cancelled" and run["finished"] and "report" not in run
    assert idle.post(f"/api/runs/{run_id}/cancel").json()["status"] == "cancelled"  # again: fine
    assert idle.get(f"/api/runs/{run_id}").json()["status"] == "cancelled"
    assert [r["id"] for r in idle.get("/api/runs?status=cancelled").json()["runs"]] == [run_id]
    assert_error(idle.get(f"/api/runs/{run_id}/report.json"), 409, "no report")
    assert idle.delete(f"/api/runs/{run_id}").json()["deleted"] is True
    assert_error(idle.post("/api/runs/0123456789abcdef/cancel"), 404)
    assert_error(idle.post("/api/runs/not-an-id/cancel"), 404)


def test_a_finished_run_cannot_be_cancelled(client: TestClient) -> None:
    run_id = client.post("/api/runs", json=run_body()).json()["id"]
    assert wait_done(client, run_id)["status"] == "done"
    assert_error(client.post(f"/api/runs/{run_id}/cancel"), 409, "already")
    assert client.get(f"/api/runs/{run_id}").json()["status"] == "done"


@pytest.mark.parametrize("report", [True, False], ids=["at-a-progress-report", "inside-a-forward-pass"])
def test_cancel_a_running_run_frees_the_worker(client: TestClient, tiny_gpt2: Any, slow_method: None, report: bool) -> None:
    before = hooks(tiny_gpt2)
    slow = client.post("/api/runs", json=run_body(methods=[SLOW], params={SLOW: {"report": report}})).json()["id"]
    after = client.post("/api/runs", json=run_body()).json()["id"]  # queued behind it
    running = wait_for(client, slow, ("running",))
    while running["progress"].get("method") != SLOW:  # inside the method's loop
        time.sleep(0.02)
        running = client.get(f"/api/runs/{slow}?report=false").json()
    cancelled = client.post(f"/api/runs/{slow}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["progress"]["stage"] == "cancelled"
    with client.stream("GET", f"/api/runs/{slow}/events") as stream:
        events = [line.split(":", 1)[1].strip() for line in stream.iter_lines() if line.startswith("event:")]
    assert events[-1] == "cancelled"
    assert wait_done(client, after, timeout=30)["status"] == "done"  # the worker moved on (not after a minute)
    run = client.get(f"/api/runs/{slow}").json()
    assert run["status"] == "cancelled" and run["error"] == "cancelled by the user" and "report" not in run
    assert hooks(tiny_gpt2) == before  # the method unwound: its hooks (and the worker's) are gone


def test_stopping_the_server_interrupts_the_current_run_and_closes_the_store(home: Path, tiny_gpt2: Any,
                                                                             slow_method: None) -> None:
    before = hooks(tiny_gpt2)
    with TestClient(create_app(home=home, models={MODEL: tiny_gpt2})) as c:
        run_id = c.post("/api/runs", json=run_body(methods=[SLOW])).json()["id"]
        assert wait_for(c, run_id, ("running",))["status"] == "running"
        started = time.monotonic()
    assert time.monotonic() - started < 30  # not the method's whole minute
    wal = home / "runs.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed into the main file
    assert hooks(tiny_gpt2) == before
    with closing(sqlite3.connect(f"file:{home / 'runs.sqlite'}?mode=ro", uri=True)) as db:
        status, error = db.execute("SELECT status, error FROM runs WHERE id = ?", (run_id,)).fetchone()
    assert status == "error" and "interrupted" in error  # marked by the worker as it stopped


# ---------------------------------------------------------------------------- parameters
NON_FINITE = [("spine", "lr", "NaN"), ("spine", "noise", "Infinity"), ("knowledge_circuits", "noise", "-Infinity"),
              ("knowledge_circuits", "threshold", "NaN"), ("patchscopes", "target_prompt", "NaN")]


@pytest.mark.parametrize(("method", "name", "literal"), NON_FINITE, ids=[f"{m}.{n}" for m, n, _ in NON_FINITE])
def test_non_finite_parameters_are_a_400(idle: TestClient, method: str, name: str, literal: str) -> None:
    body = json.dumps(run_body(methods=[method])).replace('"methods"', f'"params": {{"{method}": {{"{name}": {literal}}}}}, "methods"')
    response = idle.post("/api/runs", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "finite")
    assert idle.get("/api/runs").json()["total"] == 0


UNBOUNDED = [("spine", {"epochs": 1_000_000}, "epochs"), ("spine", {"hidden_dim": 1_000_000}, "hidden_dim"),
             ("causal_tracing", {"batch_size": 10**9}, "batch_size"), ("causal_tracing", {"window": 10**9}, "window"),
             ("knowledge_circuits", {"top_n": 10**9}, "top_n"),
             ("knowledge_neurons", {"max_answer_tokens": 10**6}, "max_answer_tokens")]


@pytest.mark.parametrize(("method", "values", "fragment"), UNBOUNDED, ids=[f for _, _, f in UNBOUNDED])
def test_parameters_have_upper_bounds(idle: TestClient, method: str, values: dict, fragment: str) -> None:
    body = {"model": MODEL, "sample": {"prompt": "The Eiffel Tower is located in the city of",
                                       "triple_subject": "Eiffel Tower", "ground_truth": " Paris"},
            "methods": [method], "params": {method: values}}
    assert_error(idle.post("/api/runs", json=body), 400, fragment)


def test_the_issue_reproduction_is_refused(idle: TestClient) -> None:
    body = {"model": "smollm2-135m", "sample": {"prompt": "The Eiffel Tower is located in the city of"},
            "methods": ["spine"], "params": {"spine": {"epochs": 1000000}}}
    assert_error(idle.post("/api/runs", json=body), 400, "epochs")


def test_a_misspelt_preset_gets_a_suggestion(idle: TestClient) -> None:
    assert_error(idle.post("/api/runs", json=run_body(model="smollm2-13m")), 400, "did you mean smollm2-135m")


def test_serve_passes_the_caps_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import uvicorn

    from knowmri.cli import main

    served: list[Any] = []
    monkeypatch.setenv("KNOWMRI_HOME", str(tmp_path))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    assert main(["serve", "--port", "8123", "--max-run-seconds", "10", "--max-run-memory", "2"]) == 0
    state = served[0].state.knowmri
    state.worker.stop()
    state.store.close()
    assert state.limits == RunLimits(10.0, 2 << 30) and state.worker.limits == state.limits
    assert "runs estimated above 10 s (--max-run-seconds) or 2.0 GiB of memory" in capsys.readouterr().out

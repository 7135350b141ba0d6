"""Dataset runs through the API: a built-in dataset's first records, its estimate, progress, the store,
each record's own report, caps and validation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from knowmri.server.app import create_app
from tests.server.conftest import FACT, MODEL, wait_done


def dataset_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "dataset": "known_1000", "samples": 3, "methods": ["logit_lens"], **extra}


def assert_error(response: Any, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    assert fragment.lower() in response.json()["error"].lower(), response.json()["error"]


def test_a_dataset_run_is_estimated_run_stored_and_keeps_each_record(client: TestClient, home: Path) -> None:
    estimate = client.post("/api/estimate", json=dataset_body()).json()
    assert estimate["samples"] == 3 and len(estimate["per_sample"]) == 3
    assert estimate["seconds"] == pytest.approx(sum(estimate["per_sample"])) and "logit_lens" in estimate["methods"]
    assert estimate["refusal"] is None
    created = client.post("/api/runs", json=dataset_body())
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["samples"] == 3 and body["estimate"]["seconds"] == pytest.approx(estimate["seconds"])
    run = wait_done(client, body["id"])
    assert run["status"] == "done", run.get("error")
    assert run["input"] == {"dataset": "known_1000", "samples": 3} and run["sample"] == run["input"]
    progress = run["progress"]
    assert progress["samples"] == 3 and progress["samples_done"] == 3 and progress["eta_seconds"] == 0.0
    assert progress["estimate_seconds"] == pytest.approx(estimate["seconds"], rel=1e-3)
    report = run["report"]
    assert report["sample"] == {"dataset": "known_1000", "samples": 3} and report["n_samples"] == 3
    assert [row["index"] for row in report["samples"]] == [0, 1, 2]
    assert report["samples"][1]["file"] == "samples/000001.json" and report["results"]["logit_lens"]["status"] == "ok"
    one = client.get(f"/api/runs/{body['id']}/samples/1").json()
    assert one["index"] == 1 and one["results"]["logit_lens"]["status"] == "ok" and one["sample"]["prompt"]
    assert_error(client.get(f"/api/runs/{body['id']}/samples/3"), 404, "no saved sample 3")
    assert client.get(f"/api/runs/{body['id']}/samples/-1").status_code == 422
    assert_error(client.get("/api/runs/0123456789abcdef/samples/0"), 404)
    listed = client.get("/api/runs").json()["runs"]
    assert listed[0]["id"] == body["id"] and listed[0]["input"]["samples"] == 3
    assert (home / "runs" / body["id"] / "samples" / "000002.json").is_file()
    assert client.delete(f"/api/runs/{body['id']}").json()["deleted"] is True
    assert not (home / "runs" / body["id"]).exists()


def test_a_dataset_run_is_validated_before_it_is_queued(idle: TestClient) -> None:
    assert_error(idle.post("/api/runs", json=dataset_body(index=2)), 422, "without 'index'")
    assert_error(idle.post("/api/runs", json={"model": MODEL, "text": FACT, "samples": 2}), 422, "with 'dataset'")
    assert_error(idle.post("/api/runs", json=dataset_body(samples=0)), 422)
    assert_error(idle.post("/api/runs", json=dataset_body(samples=100_000)), 422)
    assert_error(idle.post("/api/runs", json=dataset_body(dataset="/etc/passwd")), 400, "unknown dataset")
    assert_error(idle.post("/api/runs", json=dataset_body(dataset="gsm8k", methods=["causal_tracing"])), 400,
                 "does not apply")
    assert_error(idle.post("/api/runs", json=dataset_body(methods=["nope"])), 400)
    assert_error(idle.post("/api/runs", json=dataset_body(params={"logit_lens": {"top_k": "many"}})), 400)
    created = idle.post("/api/runs", json=dataset_body(samples=500)).json()  # capped at the dataset's size
    size = idle.get("/api/datasets/known_1000/records?limit=1").json()["total"]
    assert created["samples"] == size
    cancelled = idle.post(f"/api/runs/{created['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"


def test_a_dataset_run_over_the_time_cap_is_refused(home: Path, tiny_gpt2: Any) -> None:
    with TestClient(create_app(home=home, models={MODEL: tiny_gpt2}, worker=False, max_run_seconds=1e-6)) as c:
        response = c.post("/api/runs", json=dataset_body())
        assert_error(response, 400, "this run of 3 samples is estimated to take")
        assert "fewer samples" in response.json()["error"]
        assert "3 samples" in c.post("/api/estimate", json=dataset_body()).json()["refusal"]
        assert c.get("/api/runs").json()["total"] == 0


def test_cancel_a_running_dataset_run(client: TestClient, home: Path, tiny_gpt2: Any) -> None:
    from knowmri.methods.base import register_method, unregister_method
    from tests.server.test_limits import SLOW, SlowProbe, hooks, wait_for

    before = hooks(tiny_gpt2)
    register_method(SlowProbe)
    try:
        body = dataset_body(methods=[SLOW], params={SLOW: {"report": False}})
        run_id = client.post("/api/runs", json=body).json()["id"]
        running = wait_for(client, run_id, ("running",))
        while "samples" not in running["progress"]:
            time.sleep(0.02)
            running = client.get(f"/api/runs/{run_id}?report=false").json()
        assert running["progress"]["samples"] == 3 and running["progress"]["eta_seconds"] is not None
        time.sleep(0.3)  # inside the first record's forward passes
        assert client.post(f"/api/runs/{run_id}/cancel").json()["status"] == "cancelled"
        after = client.post("/api/runs", json=dataset_body(samples=2)).json()["id"]
        assert wait_done(client, after, timeout=30)["status"] == "done"  # the worker moved on
        run = client.get(f"/api/runs/{run_id}").json()
        assert run["status"] == "cancelled" and "report" not in run
        assert not list((home / "runs" / run_id / "samples").glob("*.json"))  # no record finished
        assert hooks(tiny_gpt2) == before
    finally:
        unregister_method(SLOW)

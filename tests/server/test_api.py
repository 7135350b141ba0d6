"""The HTTP API (docs/SERVER.md): every endpoint, validation (4xx with a message, never a 500), 404s, tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from knowmri.server.app import create_app, is_loopback, serve
from tests.server.conftest import FACT, MODEL, wait_done


def run_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "text": FACT, "methods": ["logit_lens"], **extra}


def assert_error(response: Any, status: int | tuple[int, ...], fragment: str = "") -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert fragment.lower() in body["error"].lower(), body["error"]


# ---------------------------------------------------------------------------- catalog endpoints
def test_health_models_datasets_methods(idle: TestClient) -> None:
    health = idle.get("/api/health").json()
    assert health["status"] == "ok" and health["worker"]["enabled"] is False
    models = idle.get("/api/models").json()
    assert models["registered"][0]["name"] == MODEL and models["registered"][0]["n_layers"] >= 2
    assert {p["name"] for p in models["presets"]} >= {"smollm2-135m"}
    assert models["default"] == MODEL and "gpt2" in models["families"]
    names = {d["name"] for d in idle.get("/api/datasets").json()}
    assert {"known_1000", "counterfact", "gsm8k"} <= names
    methods = {m["name"]: m for m in idle.get("/api/methods").json()}
    assert "logit_lens" in methods and methods["logit_lens"]["params"][0]["name"] == "top_k"


def test_dataset_records(idle: TestClient) -> None:
    page = idle.get("/api/datasets/known_1000/records?offset=2&limit=3").json()
    assert page["total"] > 5 and [r["index"] for r in page["records"]] == [2, 3, 4]
    assert page["records"][0]["sample"]["prompt"]
    assert_error(idle.get("/api/datasets/nope/records"), 404, "unknown dataset")
    assert_error(idle.get("/api/datasets/known_1000/records?limit=1000"), 422)
    assert_error(idle.get("/api/datasets/known_1000/records?offset=-1"), 422)
    assert_error(idle.get("/api/datasets/known_1000/records?offset=999999"), 400, "past the end")


def test_parse_and_suggest(idle: TestClient) -> None:
    parsed = idle.post("/api/parse", json={"text": "The Eiffel Tower is located in Paris"}).json()
    assert parsed["sample"]["prompt"] == "The Eiffel Tower is located in"
    assert parsed["sample"]["triple_subject"] == "Eiffel Tower" and "missing" in parsed
    assert_error(idle.post("/api/parse", json={"text": "  "}), 422, "empty")
    assert_error(idle.post("/api/parse", json={"text": "x" * 2001}), 422)
    found = idle.get("/api/suggest", params={"text": "capital city of France", "k": 3, "backend": "lexical"}).json()
    assert found["backend"] == "lexical" and len(found["records"]) == 3 and found["datasets"]
    assert_error(idle.get("/api/suggest", params={"text": "x", "backend": "magic"}), 422)
    assert_error(idle.get("/api/suggest", params={"text": "   "}), 400, "empty")


def test_match(idle: TestClient) -> None:
    data = idle.post("/api/match", json={"sample": {"prompt": "The Eiffel Tower is in"}}).json()
    by_name = {m["name"]: m for m in data["matches"]}
    assert by_name["logit_lens"]["eligible"]
    assert not by_name["causal_tracing"]["eligible"] and "triple_subject" in by_name["causal_tracing"]["reasons"][0]
    with_model = idle.post("/api/match", json={"model": MODEL, "text": FACT}).json()
    lens = next(m for m in with_model["matches"] if m["name"] == "logit_lens")
    assert lens["eligible"] and lens["estimate"]["seconds"] >= 0
    assert with_model["sample"]["ground_truth"].strip() == "Paris"
    whole = idle.post("/api/match", json={"dataset": "known_1000"}).json()
    assert whole["sample"] is None and whole["dataset"]["name"] == "known_1000"
    record = idle.post("/api/match", json={"dataset": "known_1000", "index": 3}).json()
    assert record["index"] == 3 and record["sample"]["prompt"]
    assert_error(idle.post("/api/match", json={"model": "no-such-model", "text": FACT}), 400, "unknown model")


# ---------------------------------------------------------------------------- run lifecycle
def test_run_lifecycle(client: TestClient) -> None:
    created = client.post("/api/runs", json=run_body(methods=["logit_lens", "integrated_gradients"],
                                                     params={"integrated_gradients": {"steps": 4}}))
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    with client.stream("GET", f"/api/runs/{run_id}/events") as stream:
        events = [line.split(":", 1)[1].strip() for line in stream.iter_lines() if line.startswith("event:")]
    assert events[-1] == "done" and "progress" in events
    run = client.get(f"/api/runs/{run_id}").json()
    assert run["status"] == "done" and run["progress"]["fraction"] == 1.0
    report = run["report"]
    assert set(report["results"]) == {"logit_lens", "integrated_gradients"}
    assert all(r["status"] == "ok" for r in report["results"].values())
    assert report["results"]["integrated_gradients"]["params"]["steps"] == 4
    assert report["results"]["logit_lens"]["figures"][0]["plotly"]["data"]
    assert "verdict" in report["consensus"]
    light = client.get(f"/api/runs/{run_id}?report=false").json()
    assert "report" not in light and light["status"] == "done"
    exported = client.get(f"/api/runs/{run_id}/report.json?download=1")
    assert exported.headers["content-disposition"].startswith("attachment") and json.loads(exported.text)["results"]
    page = client.get(f"/api/runs/{run_id}/report.html")
    assert page.status_code == 200 and "logit_lens" in page.text and "<html" in page.text.lower()
    listed = client.get("/api/runs").json()
    assert listed["total"] == 1 and listed["runs"][0]["id"] == run_id and "report" not in listed["runs"][0]
    assert client.get("/api/runs?status=done").json()["total"] == 1
    assert client.delete(f"/api/runs/{run_id}").json()["deleted"] is True
    assert_error(client.get(f"/api/runs/{run_id}"), 404)


def test_run_on_a_dataset_record(client: TestClient) -> None:
    created = client.post("/api/runs", json={"model": MODEL, "dataset": "known_1000", "index": 0,
                                             "methods": ["logit_lens", "attention_weights"]})
    run = wait_done(client, created.json()["id"])
    assert run["status"] == "done", run.get("error")
    assert run["input"] == {"dataset": "known_1000", "index": 0}
    assert run["sample"] == client.get("/api/datasets/known_1000/records?limit=1").json()["records"][0]["sample"]
    assert set(run["report"]["results"]) == {"logit_lens", "attention_weights"}


def test_a_run_without_methods_asks_for_every_eligible_one(idle: TestClient) -> None:
    run_id = idle.post("/api/runs", json={"model": MODEL, "text": FACT}).json()["id"]
    run = idle.get(f"/api/runs/{run_id}").json()
    assert run["methods"] is None and run["status"] == "queued" and run["sample"]["triple_subject"] == "Eiffel Tower"


def test_a_model_that_fails_to_load_fails_its_run(client: TestClient, home: Path) -> None:
    folder = home / "models" / "broken"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"not really")
    run = wait_done(client, client.post("/api/runs", json=run_body(model=str(folder))).json()["id"])
    assert run["status"] == "error" and "could not load the model" in run["error"]


def test_an_input_the_model_cannot_take_fails_its_run_with_the_reason(client: TestClient) -> None:
    body = {"model": MODEL, "sample": {"prompt": " ".join(["the city"] * 150)}, "methods": ["logit_lens"]}
    run = wait_done(client, client.post("/api/runs", json=body).json()["id"])
    assert run["status"] == "error" and "context" in run["error"] and "internal" not in run["error"]


def test_runs_survive_a_restart_and_interrupted_runs_are_marked(home: Path, tiny_gpt2: Any) -> None:
    with TestClient(create_app(home=home, models={MODEL: tiny_gpt2})) as first:
        done_id = first.post("/api/runs", json=run_body()).json()["id"]
        assert wait_done(first, done_id)["status"] == "done"
    with TestClient(create_app(home=home, models={MODEL: tiny_gpt2}, worker=False)) as second:
        queued_id = second.post("/api/runs", json=run_body()).json()["id"]
        assert second.get(f"/api/runs/{queued_id}").json()["status"] == "queued"
        assert_error(second.get(f"/api/runs/{queued_id}/report.json"), 409, "no report yet")
        assert_error(second.delete(f"/api/runs/{queued_id}"), 409)
    with TestClient(create_app(home=home, models={MODEL: tiny_gpt2}, worker=False)) as third:
        assert third.get(f"/api/runs/{done_id}").json()["report"]["results"]["logit_lens"]["status"] == "ok"
        interrupted = third.get(f"/api/runs/{queued_id}").json()
        assert interrupted["status"] == "error" and "restart" in interrupted["error"]


# ---------------------------------------------------------------------------- validation
BAD_RUNS = [
    ({"text": ""}, 422, "empty"),
    ({"text": "   "}, 422, "empty"),
    ({"text": "x" * 2001}, 422, "at most 2000"),
    ({"text": FACT, "sample": {"prompt": "a"}}, 422, "exactly one input"),
    ({"text": None}, 422, "exactly one input"),
    ({"index": 2}, 422, ""),
    ({"surprise": 1}, 422, "extra"),
    ({"model": ""}, 422, ""),
    ({"model": "x" * 600}, 422, ""),
    ({"methods": []}, 422, "at least one"),
    ({"methods": ["logit_lens", "logit_lens"]}, 422, "twice"),
    ({"methods": ["no_such_method"]}, 400, "unknown method"),
    ({"methods": ["causal_tracing"], "text": None, "sample": {"prompt": "The Eiffel Tower is in"}}, 400, "triple_subject"),
    ({"model": "no-such-model"}, 400, "unknown model"),
    ({"model": "../../etc/passwd"}, 400, "unknown model"),
    ({"model": "/etc"}, 400, "outside the allowed"),
    ({"model": "~/../../etc"}, 400, "outside the allowed"),
    ({"model": "org/../../name"}, 400, ""),
    ({"model": "bad\x00name"}, 400, "control"),
    ({"text": None, "dataset": "nope", "index": 0}, 400, "unknown dataset"),
    ({"text": None, "dataset": "known_1000", "index": 99999}, 400, "out of range"),
    ({"text": None, "dataset": "known_1000", "index": -99999}, 400, "out of range"),
    ({"text": None, "dataset": "known_1000", "index": "first"}, 422, ""),
    ({"text": None, "dataset": "known_1000", "index": 10**12}, 422, ""),
    ({"text": None, "sample": {}}, 422, "empty"),
    ({"text": None, "sample": {"ground_truth": " Paris"}}, 400, "prompt"),
    ({"text": None, "sample": {"prompt": "The Eiffel Tower is in", "triple_subject": "Colosseum"}}, 400, "does not occur"),
    ({"text": None, "sample": {"Prompt!": "x"}}, 422, "invalid sample key"),
    ({"text": None, "sample": {"prompt": {"nested": 1}}}, 422, ""),
    ({"text": None, "sample": {"prompt": "y" * 2001}}, 422, "longer than"),
    ({"params": {"logit_lens": {"top_k": 1000}}}, 400, "top_k"),
    ({"params": {"logit_lens": {"top_k": "many"}}}, 400, "top_k"),
    ({"params": {"logit_lens": {"no_such_param": 1}}}, 400, "unknown parameter"),
    ({"params": {"no_such_method": {}}}, 400, "unknown method"),
    ({"params": {"integrated_gradients": {"steps": 3}}}, 400, "not among the chosen"),
    ({"params": {"logit_lens": {"top_k": {"deep": [1]}}}}, 422, ""),
    ({"params": {"logit_lens": "top_k=3"}}, 422, ""),
]


@pytest.mark.parametrize(("change", "status", "fragment"), BAD_RUNS, ids=[str(i) for i in range(len(BAD_RUNS))])
def test_bad_runs_get_a_4xx_with_a_message(idle: TestClient, change: dict, status: int, fragment: str) -> None:
    body = {k: v for k, v in {**run_body(), **change}.items() if v is not None}
    assert_error(idle.post("/api/runs", json=body), status, fragment)
    assert idle.get("/api/runs").json()["total"] == 0


def test_local_model_folders_are_confined_to_the_roots(tmp_path: Path, tiny_gpt2: Any) -> None:
    root = tmp_path / "roots"
    outside = tmp_path / "outside"
    for folder in (root / "good", root / "pickled", outside / "secret"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (root / "good" / "model.safetensors").write_bytes(b"x")
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    (outside / "secret" / "model.safetensors").write_bytes(b"x")
    (root / "link").symlink_to(outside / "secret")
    with TestClient(create_app(home=tmp_path / "home", model_roots=[root], worker=False)) as c:
        assert c.post("/api/runs", json=run_body(model=str(root / "good"))).status_code == 201
        assert_error(c.post("/api/runs", json=run_body(model=str(root / "pickled"))), 400, "never loads pickled")
        assert_error(c.post("/api/runs", json=run_body(model=str(root / "link"))), 400, "outside the allowed")
        assert_error(c.post("/api/runs", json=run_body(model=f"{root}/../outside/secret")), 400, "outside the allowed")
        assert_error(c.post("/api/runs", json=run_body(model=str(root / "missing"))), 400, "no such model folder")
        assert str(root / "good") in c.get("/api/models").json()["local"]


def test_malformed_requests(idle: TestClient) -> None:
    assert_error(idle.post("/api/runs", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert_error(idle.post("/api/runs", content=json.dumps(run_body()), headers={"content-type": "text/plain"}), 422)
    assert_error(idle.post("/api/runs", json=[1, 2]), 422)
    assert_error(idle.post("/api/runs", content=b"x" * (2 << 20), headers={"content-type": "application/json"}), 413)
    chunks = (b"x" * 65536 for _ in range(40))  # no Content-Length: read, then refused
    assert_error(idle.post("/api/runs", content=chunks, headers={"content-type": "application/json"}), 413, "larger")
    assert idle.post("/api/runs", content=iter([json.dumps(run_body()).encode()]),
                     headers={"content-type": "application/json"}).status_code == 201
    assert_error(idle.put("/api/runs"), 405)
    assert_error(idle.get("/api/nothing/here"), 404, "no such")


@pytest.mark.parametrize("path", ["/api/runs/{}", "/api/runs/{}/events", "/api/runs/{}/report.json",
                                  "/api/runs/{}/report.html"])
@pytest.mark.parametrize("run_id", ["0123456789abcdef", "not-an-id", "..%2F..%2Fetc"])
def test_unknown_run_ids_are_404(idle: TestClient, path: str, run_id: str) -> None:
    assert_error(idle.get(path.format(run_id)), 404)


def test_unknown_run_delete_is_404(idle: TestClient) -> None:
    assert_error(idle.delete("/api/runs/0123456789abcdef"), 404)


def test_garbage_never_gets_a_500(idle: TestClient) -> None:
    garbage = [None, 0, "text", [], {}, {"text": 5}, {"sample": "prompt"}, {"sample": {"prompt": 3}},
               {"dataset": 1}, {"dataset": "known_1000", "index": 1.5}, {"model": 3, "text": "a"},
               {"text": "a", "methods": "logit_lens"}, {"text": "a", "params": []}, {"text": "\ud800"},
               {"model": MODEL, "text": "The Eiffel Tower is in \ud800"}, {"model": MODEL, "sample": {"prompt": "\udc00"}},
               {"model": MODEL, "text": "a b", "methods": ["logit_lens"], "params": {"logit_lens": {"positions": "\ud800"}}}]
    for body in garbage:
        for path in ("/api/runs", "/api/match", "/api/parse"):
            response = idle.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (path, body, response.text)
            assert response.json()["error"]


def test_bugs_are_a_json_500(home: Path) -> None:
    app = create_app(home=home, worker=False)

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("boom")

    app.state.knowmri.store.count = broken
    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.get("/api/health")
    assert response.status_code == 500 and "boom" in response.json()["error"]


# ---------------------------------------------------------------------------- page and auth
def test_page_and_plotly_are_served_locally(idle: TestClient) -> None:
    page = idle.get("/")
    assert page.status_code == 200 and 'id="free-text"' in page.text
    script = idle.get("/static/app.js")
    assert script.status_code == 200 and "/api/runs" in script.text
    for text in (page.text, script.text, idle.get("/static/style.css").text):
        assert "https://" not in text and "http://" not in text  # nothing fetched from a CDN
    assert "/api/runs" in idle.get("/api/openapi.json").json()["paths"]
    plotly = idle.get("/static/plotly.min.js")
    assert plotly.status_code == 200 and "javascript" in plotly.headers["content-type"]
    assert "max-age" in plotly.headers["cache-control"] and len(plotly.content) > 1_000_000
    again = idle.get("/static/plotly.min.js", headers={"if-none-match": plotly.headers["etag"]})
    assert again.status_code == 304


def test_token_is_required_on_every_api_call(home: Path) -> None:
    with TestClient(create_app(home=home, token="s3cret", worker=False)) as c:
        assert_error(c.get("/api/health"), 401, "token")
        assert_error(c.get("/api/runs"), 401)
        assert_error(c.post("/api/runs", json=run_body()), 401)
        assert_error(c.get("/api/health", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/api/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/health?token=s3cret").status_code == 200
        assert c.get("/").status_code == 200
        assert c.get("/api/openapi.json").status_code == 404


def test_trusted_hosts(home: Path) -> None:
    with TestClient(create_app(home=home, worker=False, allowed_hosts=["127.0.0.1"]), base_url="http://127.0.0.1") as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/health", headers={"host": "evil.example"}).status_code == 400


def test_serve_refuses_a_public_address_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from knowmri.cli import main

    monkeypatch.delenv("KNOWMRI_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(ValueError, match="token"):
        serve(host="0.0.0.0", port=8123)
    assert main(["serve", "--host", "0.0.0.0", "--port", "8123"]) == 2

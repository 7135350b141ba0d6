"""The SQLite run store: lifecycle, listing, persistence across reopen, crash recovery, WAL mode."""

from __future__ import annotations

import threading
from pathlib import Path

from knowmri.server.store import INTERRUPTED, RunStore


def make(store: RunStore, prompt: str = "The Eiffel Tower is in") -> str:
    return store.create(model="tiny-gpt2", methods=["logit_lens"], params={}, input={"text": prompt},
                        sample={"prompt": prompt})


def test_lifecycle_and_listing(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.sqlite")
    a, b = make(store, "first"), make(store, "second")
    assert store.get(a)["status"] == "queued" and store.get(a)["progress"]["stage"] == "queued"
    store.start(a)
    store.set_progress(a, {"fraction": 0.5})
    assert store.get(a)["status"] == "running" and store.get(a)["progress"] == {"fraction": 0.5}
    store.finish(a, {"results": {"logit_lens": {"status": "ok"}}}, {"fraction": 1.0})
    store.fail(b, "it broke")
    done, failed = store.get(a), store.get(b)
    assert done["status"] == "done" and done["report"]["results"]["logit_lens"]["status"] == "ok"
    assert done["finished"] >= done["started"] >= done["created"]
    assert failed["status"] == "error" and failed["error"] == "it broke" and failed["report"] is None
    assert [r["id"] for r in store.list()] == [b, a] and "report" not in store.list()[0]
    assert [r["id"] for r in store.list(status="done")] == [a] and store.count("error") == 1
    assert [r["id"] for r in store.list(limit=1, offset=1)] == [a]
    assert store.get(a, report=False).get("report") is None and '"ok"' in store.report_text(a)
    assert store.delete(a) and not store.delete(a) and store.get(a) is None
    assert store.get("0000000000000000") is None


def test_reopen_keeps_runs_and_marks_interrupted_ones(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    done, running, queued = make(store), make(store), make(store)
    store.finish(done, {"results": {}}, {"fraction": 1.0})
    store.start(running)
    store.close()
    again = RunStore(path)
    assert sorted(again.recover()) == sorted([running, queued])
    assert again.get(done)["status"] == "done"
    for run_id in (running, queued):
        assert again.get(run_id)["status"] == "error" and again.get(run_id)["error"] == INTERRUPTED
    assert again.recover() == []
    mode = again._read("PRAGMA journal_mode")[0][0]
    assert mode.lower() == "wal"


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.sqlite")
    ids: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                run_id = make(store)
                ids.append(run_id)
                store.set_progress(run_id, {"fraction": 0.1})
                store.list(limit=5)
        except BaseException as err:  # collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and store.count() == 120 == len(set(ids))

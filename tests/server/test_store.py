"""The SQLite run store: lifecycle, listing, persistence across reopen, crash recovery, WAL mode."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from knowmri.server.store import CANCELLED, INTERRUPTED, RunStore


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


def test_cancel_is_final(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.sqlite")
    queued, running, done = make(store), make(store), make(store)
    store.start(running)
    store.finish(done, {"results": {}}, {"fraction": 1.0})
    assert store.cancel(queued, {"stage": "cancelled"}) and store.cancel(running, {"stage": "cancelled"})
    assert not store.cancel(done, {"stage": "cancelled"}) and not store.cancel(queued, {"stage": "cancelled"})
    assert not store.start(queued)  # a worker that comes to it late leaves it alone
    store.set_progress(running, {"fraction": 0.9})
    store.finish(running, {"results": {}}, {"fraction": 1.0})
    store.fail(queued, "late failure")
    for run_id in (queued, running):
        run = store.get(run_id)
        assert run["status"] == "cancelled" and run["error"] == CANCELLED and run["report"] is None
        assert run["progress"] == {"stage": "cancelled"}
    assert store.get(done)["status"] == "done" and store.count("cancelled") == 2
    assert store.recover() == []


def test_close_checkpoints_the_wal_into_the_main_file(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    ids = [make(store, "x" * 500) for _ in range(20)]
    assert Path(f"{path}-wal").stat().st_size > 0
    store.close()
    store.close()  # twice is fine
    wal = Path(f"{path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert path.stat().st_size > 4096
    with pytest.raises(RuntimeError, match="closed"):
        store.get(ids[0])
    assert sorted(r["id"] for r in RunStore(path).list(limit=100)) == sorted(ids)


def test_an_empty_store_file_is_kept_aside_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "runs.sqlite"
    path.write_bytes(b"")
    Path(f"{path}-wal").write_bytes(b"frames of a lost store")
    with caplog.at_level(logging.WARNING, logger="knowmri.server.store"):
        store = RunStore(path)
    assert "empty (0 bytes)" in caplog.text and str(path) in caplog.text
    kept = sorted(p.name for p in tmp_path.iterdir() if ".empty-" in p.name)
    assert len(kept) == 2 and kept[1].endswith("-wal")
    assert (tmp_path / kept[1]).read_bytes() == b"frames of a lost store"
    make(store)
    assert store.count() == 1


def test_a_file_that_is_not_a_database_is_named(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    path.write_bytes(b"not a database at all" * 200)
    with pytest.raises(sqlite3.DatabaseError, match="file is not a database") as err:
        RunStore(path)
    assert str(path) in str(err.value)
    assert path.read_bytes().startswith(b"not a database")  # left as it was

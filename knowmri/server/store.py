"""The run store: every run's input, parameters, status, progress and report in SQLite.

One file (`$KNOWMRI_HOME/runs.sqlite` by default) in WAL mode so readers never wait for the
writer; writes go through one lock. Reports are kept as JSON text (`Report.to_dict()`). A run
that a crash left `queued` or `running` is marked `error` when the store is reopened, so it is
never silently lost. Closing checkpoints the WAL into the main file, so a stopped server leaves
one self-contained file behind.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

STATUSES = ("queued", "running", "done", "error", "cancelled")
ACTIVE = ("queued", "running")
INTERRUPTED = "interrupted by a server restart"
CANCELLED = "cancelled by the user"

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    methods TEXT,
    params TEXT NOT NULL,
    input TEXT NOT NULL,
    sample TEXT NOT NULL,
    progress TEXT NOT NULL,
    report TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created);
"""

_SUMMARY_COLUMNS = "id, created, started, finished, status, model, methods, params, input, sample, progress, error"


def new_run_id() -> str:
    """A short random id (16 hex digits), unguessable enough for a local tool."""
    return secrets.token_hex(8)


class RunStore:
    """Runs in SQLite. Thread-safe: one connection, guarded by a lock (SQLite calls are short)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._closed = False
        if self.path.is_file() and self.path.stat().st_size == 0:
            self._set_aside_empty_file()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise sqlite3.DatabaseError(f"the run store {self.path} cannot be opened: {err} (move the file aside "
                                        "to start an empty store, or set KNOWMRI_HOME)") from None

    def _set_aside_empty_file(self) -> None:
        """A zero-byte store (a crash, a full disk, a truncation) holds no runs: keep it, with any WAL
        beside it, under a new name and say so, rather than silently starting afresh in its place."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.empty-{stamp}")
        for suffix in ("-wal", "-shm", ""):
            source = self.path.with_name(self.path.name + suffix)
            if source.exists():
                source.replace(aside.with_name(aside.name + suffix))
        log.warning("the run store %s was empty (0 bytes): kept it as %s and started a new store", self.path, aside)

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close; later calls fail (closing twice is fine)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as err:  # still close: SQLite checkpoints on the last close when it can
                log.warning("could not checkpoint the run store %s: %s", self.path, err)
            self._db.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> int:
        with self._lock:
            self._check_open()
            return self._db.execute(sql, args).rowcount

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            self._check_open()
            return self._db.execute(sql, args).fetchall()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the run store {self.path} is closed (the server is shutting down)")

    def recover(self) -> list[str]:
        """Mark runs left `queued`/`running` by a previous process as errors; returns their ids."""
        ids = [r["id"] for r in self._read("SELECT id FROM runs WHERE status IN ('queued', 'running')")]
        if ids:
            self._write("UPDATE runs SET status = 'error', error = ?, finished = ? WHERE status IN ('queued', 'running')",
                        (INTERRUPTED, time.time()))
        return ids

    def create(self, *, model: str, methods: list[str] | None, params: dict[str, Any], input: dict[str, Any],
               sample: dict[str, Any]) -> str:
        """A new queued run; returns its id."""
        run_id = new_run_id()
        progress = {"fraction": 0.0, "stage": "queued", "message": "waiting for the model worker"}
        self._write("INSERT INTO runs (id, created, status, model, methods, params, input, sample, progress) "
                    "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                    (run_id, time.time(), model, _dump(methods), _dump(params), _dump(input), _dump(sample), _dump(progress)))
        return run_id

    # A run leaves `queued`/`running` once: the writes below change only active runs, so a run the
    # user cancelled is never turned back into `done` or `error` by a worker that finishes late.
    def start(self, run_id: str) -> bool:
        """Mark a queued run running; False when it is no longer queued (cancelled meanwhile)."""
        return self._write("UPDATE runs SET status = 'running', started = ? WHERE id = ? AND status = 'queued'",
                           (time.time(), run_id)) > 0

    def set_progress(self, run_id: str, progress: dict[str, Any]) -> None:
        self._write("UPDATE runs SET progress = ? WHERE id = ? AND status IN ('queued', 'running')", (_dump(progress), run_id))

    def finish(self, run_id: str, report: dict[str, Any], progress: dict[str, Any]) -> None:
        self._write("UPDATE runs SET status = 'done', finished = ?, report = ?, progress = ?, error = NULL "
                    "WHERE id = ? AND status IN ('queued', 'running')",
                    (time.time(), json.dumps(report, allow_nan=False), _dump(progress), run_id))

    def fail(self, run_id: str, error: str, progress: dict[str, Any] | None = None) -> None:
        if progress is None:
            self._write("UPDATE runs SET status = 'error', finished = ?, error = ? WHERE id = ? AND status IN ('queued', 'running')",
                        (time.time(), error, run_id))
        else:
            self._write("UPDATE runs SET status = 'error', finished = ?, error = ?, progress = ? "
                        "WHERE id = ? AND status IN ('queued', 'running')", (time.time(), error, _dump(progress), run_id))

    def cancel(self, run_id: str, progress: dict[str, Any]) -> bool:
        """Mark a queued or running run cancelled; False when it had already ended."""
        return self._write("UPDATE runs SET status = 'cancelled', finished = ?, error = ?, progress = ? "
                           "WHERE id = ? AND status IN ('queued', 'running')",
                           (time.time(), CANCELLED, _dump(progress), run_id)) > 0

    def delete(self, run_id: str) -> bool:
        return self._write("DELETE FROM runs WHERE id = ?", (run_id,)) > 0

    def get(self, run_id: str, *, report: bool = True) -> dict[str, Any] | None:
        """One run as a dict (with its report when `report` and it has one), or None."""
        columns = f"{_SUMMARY_COLUMNS}, report" if report else _SUMMARY_COLUMNS
        rows = self._read(f"SELECT {columns} FROM runs WHERE id = ?", (run_id,))
        return _row(rows[0]) if rows else None

    def report_text(self, run_id: str) -> str | None:
        """The stored report JSON text as is (no parse), or None."""
        rows = self._read("SELECT report FROM runs WHERE id = ?", (run_id,))
        return rows[0]["report"] if rows else None

    def list(self, *, limit: int = 50, offset: int = 0, status: str | None = None) -> list[dict[str, Any]]:
        """Runs, newest first, without their reports."""
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        rows = self._read(f"SELECT {_SUMMARY_COLUMNS} FROM runs {where} ORDER BY created DESC, id LIMIT ? OFFSET ?",
                          (*args, limit, offset))
        return [_row(r) for r in rows]

    def count(self, status: str | None = None) -> int:
        if status:
            return int(self._read("SELECT COUNT(*) AS n FROM runs WHERE status = ?", (status,))[0]["n"])
        return int(self._read("SELECT COUNT(*) AS n FROM runs")[0]["n"])


def _dump(value: Any) -> str:
    return json.dumps(value, allow_nan=False, default=str)


def _row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in ("methods", "params", "input", "sample", "progress", "report"):
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out

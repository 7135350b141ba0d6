"""Fixtures for the web UI tests: an app on a throwaway $KNOWMRI_HOME with a tiny in-process model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from knowmri.server.app import create_app
from knowmri.testing import tiny_model

FACT = "The Eiffel Tower is located in the city of Paris"
MODEL = "tiny-gpt2"


@pytest.fixture(scope="session")
def tiny_gpt2() -> Any:
    return tiny_model("gpt2")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "knowmri-home"


@pytest.fixture
def client(home: Path, tiny_gpt2: Any) -> Iterator[TestClient]:
    """An app whose model worker runs queued runs on the tiny model."""
    with TestClient(create_app(home=home, models={MODEL: tiny_gpt2})) as c:
        yield c


@pytest.fixture
def idle(home: Path, tiny_gpt2: Any) -> Iterator[TestClient]:
    """An app without a model worker: runs stay queued (pure API tests)."""
    with TestClient(create_app(home=home, models={MODEL: tiny_gpt2}, worker=False)) as c:
        yield c


def wait_done(client: Any, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll GET /api/runs/{id} until the run is done or failed."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.get(f"/api/runs/{run_id}").json()
        if run["status"] in ("done", "error") or time.monotonic() > deadline:
            return run
        time.sleep(0.05)

"""Data-parallel localisation: two processes (gloo, CPU) give exactly the single-process result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from knowmri.localize import localize
from knowmri.testing import tiny_model
from tests.localize.conftest import capitals

SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from knowmri.localize import localize
from knowmri.parallel import processes
from knowmri.testing import tiny_model
from tests.localize.conftest import capitals
loc = localize(capitals(22), tiny_model("llama"), top_k=8, batch_size=3, aggregate={aggregate!r}, progress=False)
if processes().main:
    loc.save(sys.argv[1])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=root, aggregate="frequency"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "localization.json").read_text())
    assert two["provenance"]["processes"] == 2
    one = localize(capitals(22), tiny_model("llama"), top_k=8, batch_size=3, aggregate="frequency", progress=False)
    assert two["neurons"] == one.to_dict()["neurons"]
    assert two["stability"] == one.to_dict()["stability"]
    with np.load(tmp_path / "two" / "scores.npz") as scores:
        for key, value in one.scores.items():
            assert np.array_equal(scores[key], value), key

"""The data-parallel setup: one plain process is rank 0 of 1; shares, broadcasts, devices; a misleading launch is named."""

from __future__ import annotations

import pytest
import torch

from knowmri.parallel import Processes, processes


def test_a_plain_process_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    procs = processes()
    assert (procs.rank, procs.world, procs.main) == (0, 1, True)
    assert procs.broadcast({"a": 1}) == {"a": 1}
    assert procs.model_device(None) is None and procs.model_device("cpu") == "cpu"


def test_shares_cover_every_item_once():
    items = list(range(11))
    shares = [Processes(rank=r, world=3).shard(items) for r in range(3)]
    assert shares[0] == [0, 3, 6, 9] and sorted(sum(shares, [])) == items


def test_each_gpu_process_loads_onto_its_own_gpu():
    procs = Processes(rank=1, world=2, device=torch.device("cuda", 1))
    assert procs.model_device(None) == "cuda:1" and procs.model_device("cpu") == "cpu"


def test_a_cpu_launch_that_started_one_process_stops_and_names_the_command_that_works(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="--multi_gpu --num_processes N"):
        processes()
    monkeypatch.delenv("MASTER_ADDR")  # `accelerate launch --cpu` with one process: fine
    assert processes().world == 1

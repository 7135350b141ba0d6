"""Data-parallel processes: where this process stands among those `accelerate launch` (or torchrun) started.

Every dataset-level job (localisation, enhancement, dataset diagnoses) runs the same way: one
process per GPU (or several CPU processes), each with its own copy of the model, each taking its
share of the samples. Accelerate's `PartialState` sets the process group up from the launcher's
environment (single node or multi-node); a plain `python` run is rank 0 of 1 and touches nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Processes:
    """This process's place among the data-parallel processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """Striding: process r takes items r, r + world, r + 2 world, ..."""
        return list(items[self.rank::self.world])

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `tensor` over all processes (one collective call)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        moved = tensor.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(tensor.device)

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj` (any picklable value) on every process; also a barrier."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def model_device(self, requested: str | None) -> str | None:
        """The device this process loads its model on: its own GPU when several processes share a node's GPUs."""
        if self.world > 1 and self.device is not None and self.device.type == "cuda" and requested != "cpu":
            return str(self.device)
        return requested


def processes(cpu: bool = False) -> Processes:
    """The data-parallel setup: Accelerate's `PartialState` when launched with several processes.

    `cpu` (or `accelerate launch --cpu`, or no GPU) makes the processes CPU processes (gloo) even
    where GPUs are present; the first call in a process decides."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    import torch.distributed as dist

    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        _refuse_single_cpu_launch()
        return Processes()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return Processes(rank=state.process_index, world=state.num_processes, device=state.device)


def _refuse_single_cpu_launch() -> None:
    """Stop when `accelerate launch --cpu --num_processes N` (N > 1) started this one process only.

    Accelerate's launcher starts several CPU processes only through MPI (`--mpirun_hostfile`);
    otherwise it starts one, which would silently do N processes' work alone. It still sets
    MASTER_ADDR (the mark of a multi-process request) but never says N, so the launch cannot be
    completed here: the error names the commands that start N CPU processes."""
    if os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "on") and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
        raise ValueError("`accelerate launch --cpu --num_processes N` starts one process, not N (Accelerate starts several "
                         "CPU processes only with an MPI host file). For N CPU processes run `accelerate launch --multi_gpu "
                         "--num_processes N -m knowmri ... --device cpu` or `torchrun --nproc_per_node N -m knowmri ... "
                         "--device cpu`; for one process, leave out --num_processes")

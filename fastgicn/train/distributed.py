"""torch.distributed for training: the process group torchrun describes, each rank's device and its share of
a global batch, and the few collectives the trainer needs (means of logged losses, sums of Dice counts).

Without torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) training is one process and nothing here talks to
another process. Under torchrun the backend is NCCL on CUDA and gloo on CPU; `--device cuda` means each rank's
own GPU, cuda:LOCAL_RANK.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["World", "torchrun_world", "SINGLE_PROCESS"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and logs."""
        return self.rank == 0

    def share(self, batch_size: int) -> range:
        """The positions of a global batch this rank trains on: a contiguous 1/size of it."""
        if batch_size % self.size:
            raise ConfigError(f"--batch-size {batch_size} does not split over {self.size} processes: use a "
                              f"multiple of {self.size} (the batch size is the global one, over all ranks)")
        per_rank = batch_size // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def mean(self, values: list[float]) -> list[float]:
        """Each value averaged over the ranks (every rank must call this at the same point)."""
        if self.size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return (tensor / self.size).tolist()

    def sum(self, counts: list[int]) -> list[int]:
        """Integer counts summed over the ranks (every rank must call this at the same point)."""
        if self.size == 1:
            return list(counts)
        tensor = torch.tensor(counts, dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(tensor)
        return [int(v) for v in tensor.tolist()]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def _collective_device(self) -> str:
        return self.device if dist.get_backend() == "nccl" else "cpu"


SINGLE_PROCESS = World()


@contextmanager
def torchrun_world(device: str):
    """The `World` of this process: from torchrun's environment (the process group is created here and
    destroyed on exit), else one process on `device`."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        yield World(device=device)
        return
    size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise ConfigError(f"--device {device} under torchrun: local rank {local_rank} needs GPU "
                              f"cuda:{local_rank}, and torch sees {torch.cuda.device_count()} here; start at "
                              "most one process per GPU (--nproc_per_node), or use --device cpu")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if size == 1:
        yield World(device=device)
        return
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield World(rank=rank, size=size, local_rank=local_rank, device=device)
        dist.barrier()  # no rank leaves (and tears down its connections) while rank 0 still writes
    finally:
        dist.destroy_process_group()

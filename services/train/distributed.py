"""Data-parallel training through torchrun: one process per device, rank-strided batches, DDP or FSDP."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from services.train import fsdp


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False  # shard weights, gradients and optimizer state instead of replicating them

    @classmethod
    def from_env(cls, fsdp: bool = False) -> Distributed:
        """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; a single process when they are absent."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()  # nothing to shard across
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend=backend)
        return cls(torch_dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")), fsdp)

    @property
    def strategy(self) -> str:
        return "single" if self.world_size == 1 else "fsdp" if self.fsdp else "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None) -> torch.device:
        if requested:
            return torch.device(requested)
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: the model itself, a DDP wrapper around it, or the model sharded in place."""
        if self.world_size == 1:
            return model
        if self.fsdp:
            return fsdp.shard(model)
        device_ids = [self.local_rank] if torch.cuda.is_available() else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """Under FSDP the frozen teacher is sharded too (it is the larger model); otherwise kept whole."""
        return fsdp.shard(teacher) if self.fsdp else teacher

    def finish(self) -> None:
        """After a run that ended well: every rank waits here until rank 0 has written the student, so no
        rank tears its process group down while another still uses it (rank 0 then aborted now and then
        with "terminate called without an active exception" under load)."""
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()

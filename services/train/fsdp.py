"""Fully sharded data parallel (FSDP2, `fully_shard`): for teachers and students that do not fit one device.

Each decoder layer is its own shard unit, so at most one layer is gathered at a time; the frozen teacher
is sharded the same way (forward only). Checkpoints stay in the single-process format: weights and
optimizer state are gathered to full tensors on rank 0, so a run can be resumed, packed or served
without knowing how it was trained.
"""

from __future__ import annotations

import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from services.family.architectures import get_path, spec_for

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0 only
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)  # rank 0's full tensors to all


def shard(model: nn.Module) -> nn.Module:
    """Shards every decoder layer, then the rest (embedding, norm, head) as the root unit; in place."""
    mesh = init_device_mesh(next(model.parameters()).device.type, (torch_dist.get_world_size(),))
    for layer in get_path(model, spec_for(model.config.model_type).layers):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_weights(model: nn.Module) -> dict:
    """Every rank must call; rank 0 gets the full CPU state dict, the others an empty one."""
    return get_model_state_dict(model, options=_GATHER)


def load_full_weights(model: nn.Module, weights: dict) -> None:
    """Rank 0's full state dict (the others may pass an empty one) scattered into the shards."""
    set_model_state_dict(model, weights, options=_SCATTER)


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_SCATTER)

"""Data-parallel training over processes launched by torchrun (DDP).

Every rank holds a full replica of the model and of the rule's state; each global batch is
split into shards by rank, and DistributedDataParallel averages the gradients (the rule's
.grad, KP's B included) before the optimizer step. Rule state that is drawn or chosen
rather than learned agrees through the helpers below: DFA's lazily drawn matrices and WM's
mirror are rank 0's (broadcast_), LFNN ranks its workers on losses averaged over the ranks
(average_). Outside a process group every helper is a no-op.

Why shards are weighted: DDP averages over ranks, which equals the global batch mean only
if every rank holds as many examples; a shorter last batch is weighted by its shard size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def from_environment() -> Ranks | None:
    """The process group torchrun describes (WORLD_SIZE > 1), initialised once; else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard(index: torch.Tensor, ranks: Ranks | None) -> torch.Tensor:
    """This rank's share of a global batch (every world-th example, starting at its rank)."""
    return index if ranks is None else index[ranks.rank::ranks.world]


def loss_weight(local: int, global_count: int, ranks: Ranks | None) -> float | None:
    """Factor on the rank's mean loss so DDP's average is the global batch mean (None: 1)."""
    if ranks is None or local * ranks.world == global_count:
        return None
    return ranks.world * local / global_count


def leader_process() -> bool:
    """Rank 0 under torchrun (read from the environment, before any process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def wrap(model: torch.nn.Module, ranks: Ranks | None, device: torch.device) -> torch.nn.Module:
    if ranks is None:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean over ranks (rule statistics that must agree, e.g. LFNN's worker
    losses); a no-op outside a process group."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks (epoch loss and accuracy counts)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: rank 0's value everywhere (state a rule updates from random draws)."""
    if active():
        dist.broadcast(tensor, src=0)
    return tensor

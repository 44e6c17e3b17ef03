"""Data-parallel training under torchrun: process group, FSDP2 sharding, data split by rank,
and full-state checkpoints written by rank 0.

Every function is a no-op in a single process, so the trainer has one code path. The
process group uses NCCL on GPUs and gloo on CPUs; each transformer block is its own FSDP2
unit (`fully_shard`), so parameters are gathered one block at a time.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from llm_lifecycle.workflows.engine.ranks import is_main_process, rank, world_size
from llm_lifecycle.workflows.runner.stage import UserError

__all__ = ["init", "device", "shard_model", "sync_gradients", "rank_rows", "target_share", "mean_across_ranks",
           "full_state_dicts", "full_model_state", "load_full_state_dicts", "barrier", "is_main_process", "rank", "world_size"]

# Rank 0 may spend a long time on data stages while the others wait at a barrier.
_TIMEOUT = datetime.timedelta(hours=6)


def init() -> None:
    """Join the torchrun job's process group (once); nothing outside torchrun."""
    if world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=_TIMEOUT)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: shard each block, then the rest (embeddings, final norm, head) as the root unit."""
    if world_size() == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    init()
    for block in getattr(model, "layers", []):
        fully_shard(block)
    return fully_shard(model)


def sync_gradients(model: torch.nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients in this backward or keep accumulating them locally."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def rank_rows(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous share of the rows of a global micro-batch."""
    n = world_size()
    if n == 1:
        return batch
    rows = batch[0].size(0)
    if rows % n:
        raise UserError(f"batch_size ({rows}) must be divisible by the number of processes ({n}); "
                        "change batch_size or --nproc")
    share = rows // n
    return tuple(t[rank() * share : (rank() + 1) * share] for t in batch)


def target_share(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | float:
    """This rank's share of the global micro-batch's counted targets, times the world size:
    the factor that turns this rank's per-token mean loss into its part of the global
    per-token mean once FSDP averages gradients over ranks. Ranks whose rows hold different
    numbers of counted targets (SFT masks all but the answers) then train as one process
    would on the whole batch (collective: every rank calls it)."""
    if world_size() == 1:
        return 1.0
    counted = (targets != ignore_index).sum().to(torch.float64)
    total = counted.clone()
    dist.all_reduce(total)
    return (counted * world_size() / total).float() if total > 0 else 1.0


def mean_across_ranks(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return float(t) / world_size()


def barrier() -> None:
    if world_size() > 1:
        init()
        dist.barrier()


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded (model, optimizer) state on rank 0, keyed by parameter name, the same
    layout whatever the number of processes (collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options(cpu_offload=world_size() > 1))


def load_full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optim_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=_options(broadcast_from_rank0=world_size() > 1))


def full_model_state(model: torch.nn.Module) -> dict:
    """The unsharded model state on every rank (collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())

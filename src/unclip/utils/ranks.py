"""State that differs per rank, in checkpoints that rank 0 writes."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.trainer.states import TrainerStatus

__all__ = ["gather_per_rank", "keys_on_every_rank"]


def gather_per_rank(trainer: Any, obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (one `all_gather_object` when several ranks run).

    Lightning builds a checkpoint on every rank and rank 0 writes it, so per-rank state (a data position,
    random generators) must be gathered to survive. While an exception is being handled the ranks may not
    all be saving, so then only this rank's entry is filled (the others are None) rather than risk a hang.
    """
    world_size = getattr(trainer, "world_size", 1) if trainer is not None else 1
    if world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    rank = trainer.global_rank
    if trainer.state.status == TrainerStatus.INTERRUPTED:
        return [obj if r == rank else None for r in range(world_size)]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def keys_on_every_rank(trainer: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """The entries of `metrics` whose key every rank has (one `all_gather_object`; every rank must call it).

    Metrics logged with `sync_dist=True` are averaged by one collective per key, in key order: if the ranks'
    key sets differ (each scored its own samples, and only some stated a relation), the collectives mismatch
    and the run dies. Keys that some rank lacks are left out on all of them.
    """
    keys = [k for k in gather_per_rank(trainer, sorted(metrics)) if k is not None]
    return {k: v for k, v in metrics.items() if all(k in rank_keys for rank_keys in keys)}

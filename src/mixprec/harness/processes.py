"""Several processes under torchrun: who this process is, its slice of each batch, the process group.

`mixprec.harness.training.train` runs data-parallel when torchrun starts it with ``WORLD_SIZE`` > 1: every rank
trains a DistributedDataParallel replica on its contiguous slice of the same global batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from mixprec.recipes import Batch, Recipe

__all__ = ["rank_and_world_size", "rows_per_process", "check_one_process", "process_group", "shard"]


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes training together: torch.distributed's when
    initialised, else torchrun's environment (``RANK``, ``WORLD_SIZE``); ``(0, 1)`` for a plain run.

    Example:
        >>> rank_and_world_size()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rows_per_process(recipe: Recipe, world_size: int) -> int:
    """Rows of every batch each of ``world_size`` processes trains on: an equal slice of the recipe's
    batch, which stays the global batch. ValueError if ``recipe.batch_size`` does not split evenly.

    Example:
        >>> from mixprec.recipes import get_recipe
        >>> rows_per_process(get_recipe("digits"), 2)
        32
    """
    if recipe.batch_size % world_size:
        fits = [str(n) for n in range(1, min(recipe.batch_size, 16) + 1) if recipe.batch_size % n == 0]
        raise ValueError(
            f"recipe {recipe.name!r} has batch_size {recipe.batch_size}, which {world_size} processes cannot "
            f"split evenly (each trains on an equal slice of every batch); run {', '.join(fits)} "
            f"processes, or give the recipe a batch_size divisible by {world_size}")
    return recipe.batch_size // world_size


def check_one_process(what: str) -> None:
    """ValueError under torchrun with several processes: for what trains many runs and writes one report."""
    world_size = rank_and_world_size()[1]
    if world_size > 1:
        raise ValueError(f"{what} runs in one process, not {world_size} (torchrun); under torchrun use "
                         "`mixprec train`, one policy per run")


@contextlib.contextmanager
def process_group(device: torch.device, world_size: int) -> Iterator[None]:
    """Join torchrun's process group for the run (gloo on CPU, NCCL on CUDA) unless the caller already
    has one, and leave it afterwards only if the run joined it."""
    if world_size == 1 or dist.is_initialized():
        yield
        return
    cuda = device.type == "cuda"
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():  # NCCL's current device, restored
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        try:
            yield
            # Every rank's collectives done before any rank tears the group down: gloo's worker threads
            # still holding work at exit abort the process now and then ("terminate called ...").
            dist.barrier()
        finally:
            dist.destroy_process_group()


def shard(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank ``rank``'s contiguous 1/world_size of every tensor of ``batch`` (the whole batch for one process)."""
    if world_size == 1:
        return batch
    size = len(batch[0]) // world_size
    return tuple(t[rank * size : (rank + 1) * size] for t in batch)

"""Running ``dcs train`` under ``torchrun``: process group, rank-aware helpers and sharding.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``);
when they are present ``process_group`` initialises ``torch.distributed`` (gloo on CPU, nccl on
CUDA, one GPU per local rank) and yields a ``DistContext``; otherwise it yields None and the
trainer runs exactly as a single process.

Batching: ``--batch-size`` is the *global* batch; each rank takes ``batch_size / world_size``
examples per step (a global batch not divisible by the world size is refused). ``shard`` splits
each epoch's permutation as ``torch.utils.data.DistributedSampler(drop_last=False)`` does (pad by
wrapping to a multiple of the world size, rank r takes positions r, r+W, ...), so step i of every
rank together covers ``perm[i*B:(i+1)*B]``: the same examples as a single-process step, except
that the last step of an epoch may repeat a few examples from the start of the permutation
when the training set size is not a multiple of the world size.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import Tensor

log = logging.getLogger(__name__)
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_group_initialized = False  # set once this process has joined a process group


class DistributedError(ValueError):
    """The torchrun environment is malformed or incompatible with the run."""


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ENV_KEYS)


def env_world_size() -> int:
    """``WORLD_SIZE`` when launched by torchrun, else 1. Raises DistributedError on a bad value."""
    if not launched_by_torchrun():
        return 1
    try:
        world = int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise DistributedError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
    if world < 1:
        raise DistributedError(f"WORLD_SIZE must be >= 1, got {world}")
    return world


def check_global_batch(batch_size: int, world_size: int) -> None:
    """Refuse a global batch that does not split evenly over the ranks."""
    if batch_size % world_size:
        raise DistributedError(f"batch_size {batch_size} (the global batch) is not divisible by the world size "
                               f"{world_size}; each rank takes batch_size / world_size examples per step")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group; ``device`` is where its tensors and collectives live."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (pickled; small objects only)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def shard(perm: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s share of ``perm``, as ``DistributedSampler(drop_last=False)`` orders it."""
    n = len(perm)
    total = -(-n // world_size) * world_size
    if total > n:
        pad = total - n
        perm = torch.cat([perm, perm.repeat(-(-pad // n))[:pad]])
    return perm[rank:total:world_size]


@contextmanager
def process_group(device: torch.device) -> Iterator[DistContext | None]:
    """Init the process group when launched by torchrun (else yield None); destroy it on exit.

    ``device``: the resolved training device; CUDA selects nccl and ``cuda:LOCAL_RANK``."""
    if not launched_by_torchrun():
        yield None
        return
    import torch.distributed as dist

    rank, world, local = (int(os.environ[k]) for k in ENV_KEYS)
    if device.type == "cuda":
        backend = "nccl"
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        backend = "gloo"
        device = torch.device("cpu")
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    global _group_initialized
    _group_initialized = True
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, backend=backend, device=device)
    if ctx.is_main:
        log.info("distributed: %d ranks, backend %s", world, backend)
    try:
        yield ctx
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def group_was_initialized() -> bool:
    """True once ``process_group`` has initialised torch.distributed in this process."""
    return _group_initialized


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker with ``code`` after flushing logs and stdio, skipping interpreter
    teardown.

    ``DistributedDataParallel`` keeps a reference to the process group that
    ``destroy_process_group`` does not release (torch 2.13: gloo's ``gloo_tcp_loop`` and
    ``pt_gloo_runloop`` threads still run after it, even with the DDP wrapper deleted). A worker
    that then exits normally tears the interpreter down under those threads, and about one run
    in 15–50 on a loaded 2-core machine aborts there ("terminate called without an active
    exception", SIGABRT) after the run finished, so torchrun reports a failure. Everything the
    run writes is closed (and atomically renamed) before this point, so ``os._exit`` loses nothing.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)

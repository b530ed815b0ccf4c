"""Data-parallel training with torch.distributed (DDP): process-group set-up, launching under
torchrun, a sharded loader and metric reduction across ranks.

``lowbit train --nproc N`` calls ``launch(N, argv)``, which re-runs ``lowbit train ARGV`` as N
processes under ``torch.distributed.run``; each of them calls ``setup()`` (gloo on CPU, nccl with
GPUs), wraps its models with ``wrap``, reads its share of every global batch from
``distributed_loader`` and averages its logged metrics with ``all_reduce_mean``. With equal
per-rank batches, DDP's gradient averaging makes an N-process step equal to a one-process step
on the whole global batch (up to floating-point summation order). BatchNorm statistics stay
per rank (they are synchronised only on GPUs, with ``sync_batchnorm=True``).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lowbit.errors import ConfigError

LOWBIT_TRAIN = ("-m", "lowbit.cli", "train")


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: its rank, the number of ranks and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(backend: str | None = None) -> DistContext:
    """Join the process group torchrun described in the environment (single-process context otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size == 1:
        return DistContext(device=device)
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=device)


def current() -> DistContext:
    """This process's place in the process group it already joined (a single-process context otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def cleanup(synchronize: bool = True) -> None:
    """Leave the process group (a no-op when none was joined).

    After a successful run all ranks meet at a barrier first, and the collector then frees what still
    refers to the group (DDP reducers, finished collective works) while the interpreter is alive:
    left to interpreter shutdown, gloo's threads abort the process about one run in four ("terminate
    called without an active exception", exit code -6) after the training itself has finished.
    ``synchronize=False`` (after an error) skips the barrier, which a failed peer would never reach.
    """
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def wrap(model: nn.Module, ctx: DistContext, sync_batchnorm: bool = False) -> nn.Module:
    """Move ``model`` to the rank's device and wrap it in DDP when there is more than one rank."""
    model = model.to(ctx.device)
    if not ctx.distributed:
        return model
    if sync_batchnorm and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def distributed_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, ctx: DistContext,
                       shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A loader giving this rank its 1/world share of every global batch of ``batch_size``.

    Call ``loader.sampler.set_epoch(epoch)`` each epoch; with one rank it yields exactly the
    global batches, so single- and multi-process runs see the same data in the same order.
    """
    if batch_size % ctx.world_size:
        raise ConfigError(f"batch size {batch_size} does not split over {ctx.world_size} processes; "
                          f"use a multiple of {ctx.world_size}")
    sampler = DistributedSampler(TensorDataset(images, labels), num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(sampler.dataset, batch_size=batch_size // ctx.world_size, sampler=sampler,
                      drop_last=drop_last)


def all_reduce_mean(metrics: Mapping[str, float], ctx: DistContext) -> dict[str, float]:
    """Average scalar metrics over all ranks (returned unchanged with one rank)."""
    if not ctx.distributed or not metrics:
        return {key: float(value) for key, value in metrics.items()}
    keys = sorted(metrics)
    packed = torch.tensor([float(metrics[key]) for key in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return {key: value / ctx.world_size for key, value in zip(keys, packed.tolist(), strict=True)}


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over all ranks (e.g. sample counts or feature statistics); in place, also returned."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def torchrun_command(nproc: int, entry: Sequence[str], argv: Sequence[str]) -> list[str]:
    """The command line that runs ``entry ARGV`` as ``nproc`` local processes under torch.distributed.run."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give at least 1 process")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *entry, *argv]


def launch(nproc: int, argv: Sequence[str], entry: Sequence[str] = LOWBIT_TRAIN) -> int:
    """Run ``lowbit train ARGV`` (or another ``entry``) data-parallel on ``nproc`` processes; the exit code.

    Each process gets an equal share of this machine's cores (``OMP_NUM_THREADS``) unless set.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    return subprocess.run(torchrun_command(nproc, entry, argv), env=env, check=False).returncode

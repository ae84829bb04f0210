"""Multi-GPU training under torchrun, one process per GPU::

    torchrun --nproc_per_node 4 -m SAMFineTuneLib train --dataset DATASET --output ADAPTER ...

Each process takes the GPU named by LOCAL_RANK, rank 0 fills the embedding cache first, the
training slices are sharded across processes (equal shards, so the effective batch is
N x --batch-size), DistributedDataParallel averages the LoRA gradients, every process
validates on all held-out cases (so early stopping agrees), and only rank 0 writes the
adapter, the card and the resume state. Without torchrun (WORLD_SIZE unset) nothing of this
runs; CI covers the single-process path.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Tuple

import torch


def ranks() -> Tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun, else (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def backend() -> str:
    """NCCL on CUDA where torch has it; gloo otherwise (torch's Windows and macOS builds ship no NCCL)."""
    import torch.distributed as dist

    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def start(config, world: int, local_rank: int):
    """Join the process group (when not joined yet) and take this process's GPU:
    (config for this process, whether this call started the group)."""
    if world <= 1:
        return config, False
    import torch.distributed as dist

    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend())
        started = True
    if torch.cuda.is_available():
        config = dataclasses.replace(config, device=f"cuda:{local_rank}")
    return config, started


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def wrap(step_module: torch.nn.Module, device: torch.device, world: int, find_unused: bool) -> torch.nn.Module:
    """The module each training step calls: DistributedDataParallel around ``step_module`` under
    torchrun (it averages the gradients), else ``step_module`` itself."""
    if world <= 1:
        return step_module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def shard(order: torch.Tensor, rank: int, world: int, per_rank: int) -> torch.Tensor:
    """This process's equal-length share of an epoch's order, padded by wrapping around."""
    if world <= 1:
        return order
    return torch.cat([order, order[: per_rank * world - len(order)]])[rank::world]


def stop(world: int, started: bool) -> None:
    """Wait for every process, then leave the group if ``start`` joined it."""
    if world > 1:
        torch.distributed.barrier()
        if started:
            torch.distributed.destroy_process_group()

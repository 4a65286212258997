"""Data-parallel training on torch.distributed: the process group, each rank's share of a batch,
the DistributedDataParallel step over one task's parameters, sums over ranks.

Every rank holds the whole model and walks the same seeded order of global batches (the order a
one-process run of the same ``batch_size`` uses); rank r takes samples r, r+W, ... of each global
batch, so the ranks' shares together are that batch. Each rank's mean loss is weighted by
``n_rank * W / n_batch``; DistributedDataParallel averages the gradients over the W ranks, which
gives the gradient of the global batch's mean loss, uneven last batches included. A rank whose
share of a (last, tiny) batch is empty runs one sample of it with weight 0, so every rank takes
part in every all-reduce. torch's ``DistributedSampler`` pads the last batch with repeated samples
and splits the epoch rather than each batch, so it cannot reproduce a one-process run; this can.

DDP is built per task over exactly the parameters the task trains (the method's, the head, a
Prompt-ID key), gathered in one :class:`TrainStep` module: the trainable set changes from task to
task, and everything else stays outside the reducer. ``find_unused_parameters`` is turned on only
for methods that say some of their parameters may get no gradient in a step (L2P's prompt pool).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from .loaders import SeededOrder

__all__ = ["Ranks", "current_ranks", "init_from_env", "batch_shares", "whole_batches", "TrainStep", "data_parallel", "shard_frozen_blocks", "ENV_KEYS"]

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun (or --nproc) sets


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives put their tensors (nccl needs CUDA tensors)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: Sequence[float] | Tensor) -> Tensor:
        """The element-wise sum over ranks of ``values`` (float64, returned on the CPU)."""
        t = torch.as_tensor(values, dtype=torch.float64).to(self.device)
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()


def current_ranks() -> Ranks:
    """The process group's view (one process, rank 0, when none is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return Ranks(rank, world, int(os.environ.get("LOCAL_RANK", rank)), device)


def init_from_env(device: str, timeout_s: float = 1800.0) -> Ranks:
    """Join the process group that ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``
    describe (torchrun's environment, or ``softtf train --nproc``): gloo for ``device`` cpu, nccl for
    cuda (each process on ``cuda:LOCAL_RANK``). Without ``WORLD_SIZE`` > 1: one process, nothing to join."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return current_ranks()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} asks for several processes, but {', '.join(missing)} "
                         "are not set; start the workers with torchrun or softtf train --nproc N")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return current_ranks()


def batch_shares(n: int, batch_size: int, seed: int, ranks: Ranks, shuffle: bool = True) -> list[tuple[list[int], float]]:
    """This rank's (indices, loss weight) for every global batch of the seeded order of ``n`` samples.

    The weight ``len(share) * world / len(batch)`` makes DDP's gradient average that of the global
    batch's mean loss; an empty share runs the batch's first sample with weight 0."""
    order = SeededOrder(n, seed, shuffle).indices()
    out = []
    for start in range(0, n, batch_size):
        batch = order[start:start + batch_size]
        share = batch[ranks.rank::ranks.world]
        if share:
            out.append((share, len(share) * ranks.world / len(batch)))
        else:
            out.append((batch[:1], 0.0))
    return out


def whole_batches(n: int, batch_size: int, ranks: Ranks) -> list[list[int]]:
    """This rank's whole batches of ``0..n-1`` in order: batches r, r+W, ... (evaluation keeps each
    batch whole, so batch-grouped task inference sees what a one-process run sees)."""
    starts = range(0, n, batch_size)
    return [list(range(s, min(s + batch_size, n))) for b, s in enumerate(starts) if b % ranks.world == ranks.rank]


class TrainStep(nn.Module):
    """One task's trainable parameters as a module DistributedDataParallel can own, and the
    training step that uses them (``step(x, y, weight) -> loss``). The parameters are the model's
    own objects, not copies, so the optimizer and the model see what DDP reduces."""

    def __init__(self, params: Iterable[nn.Parameter], step: Callable[..., Tensor]):
        super().__init__()
        unique = {id(p): p for p in params if p.requires_grad}
        self.trained = nn.ParameterList(unique.values())
        self.step = step

    def forward(self, x, y: Tensor, weight: float) -> Tensor:
        return self.step(x, y, weight)


def data_parallel(step: TrainStep, ranks: Ranks, find_unused_parameters: bool = False) -> nn.Module:
    """``step`` under DistributedDataParallel on a process group; ``step`` itself in one process."""
    if not ranks.distributed:
        return step
    cuda = ranks.device.startswith("cuda")
    return DistributedDataParallel(step, device_ids=[ranks.local_rank] if cuda else None,
                                   find_unused_parameters=find_unused_parameters)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost runs of repeated blocks: children of a ``Sequential`` / ``ModuleList`` that are
    at least two of one class (a ViT's ``blocks``, BERT's ``encoder.layer``)."""
    found: list[nn.Module] = []
    taken: set[int] = set()
    for _, module in model.named_modules():
        if id(module) in taken or not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        children = list(module.children())
        if len(children) >= 2 and len({type(c) for c in children}) == 1:
            found.extend(children)
            taken.update(id(m) for c in children for m in c.modules())
    return found


def shard_frozen_blocks(model: nn.Module, ranks: Ranks) -> int:
    """FSDP2 (``fully_shard``) over each repeated block of ``model``: the blocks' frozen weights are
    sharded across the ranks and gathered for each block's forward and backward, so the softtf
    ops run on whole local tensors, as in one process. Parameters that train now are left out
    (``ignored_params``), and those a method adds later (a task's mask) are not FSDP's: DDP
    reduces them. Returns the number of blocks sharded.

    Why gathered tensors rather than DTensor sharding rules for the ops: a masked linear needs
    ``W ⊙ M`` of whole rows and columns, FSDP gathers the block's weights anyway, and the op's
    kernels, checks and float64 oracle stay the ones every other run uses."""
    if not ranks.distributed:
        raise ValueError("fsdp: sharding needs several processes (softtf train --nproc N, or torchrun)")
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"fsdp: found no repeated blocks to shard in {type(model).__name__}")
    mesh = init_device_mesh("cuda" if ranks.device.startswith("cuda") else "cpu", (ranks.world,))
    for block in blocks:
        training = {p for p in block.parameters() if p.requires_grad}
        # each block is its own FSDP root (no root above it), and a root keeps its weights gathered after
        # forward unless told otherwise
        fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=training or None)
    return len(blocks)

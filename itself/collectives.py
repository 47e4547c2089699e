"""Differentiable collectives for the batch-level losses and batch statistics.

Every rank computes its *share* of a global-batch quantity from all-gathered features; the
backward passes all-reduce the incoming gradients, so that the sum over ranks of the shares has
exactly the gradients of the single-process computation over the whole batch (open_clip's
gather-with-grad idea). In a world of one (no process group) everything is the identity. Works
with gloo (CPU) and NCCL: only all_gather and all_reduce are used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """torch.distributed.nn.functional.all_gather computes the same, but is deprecated (torch 2.14)
    for a private module; this is the same two collectives, on gloo and NCCL."""

    @staticmethod
    def forward(ctx, x):
        _, world = rank_and_world()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss share depends on every rank's features: this rank's gradient is the sum
        # over ranks of their gradients for its rows (a reduce-scatter: each rank receives its slice).
        _, world = rank_and_world()
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous())
        return out


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of equally shaped x; gradients flow back to each rank."""
    return _GatherWithGrad.apply(x) if rank_and_world()[1] > 1 else x


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks of equally shaped x, without gradient (ids, indices)."""
    _, world = rank_and_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; the backward sums gradients over ranks too."""
    return _AllReduceWithGrad.apply(x) if rank_and_world()[1] > 1 else x

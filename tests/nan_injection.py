"""A model whose forward goes non-finite at chosen steps: a NaN loss (`loss`), or a finite loss
whose gradient is NaN (`grad`), on every rank or on one. Used in this process by the one-rank
tests and, as `python tests/nan_injection.py STEPS KIND RANK TRAIN-ARGS...`, under the DeepSpeed
launcher by the two-rank ones."""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from itself.model import ITSELF


class NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@contextlib.contextmanager
def nan_at(steps: str, kind: str, rank: str = "all"):
    """ITSELF's forward made non-finite at `steps` (comma-separated optimizer steps, counted from 1
    as the model's `step` argument) on `rank` ("all" or a number) while inside."""
    chosen, only_rank, real = {int(s) for s in steps.split(",")}, (None if rank == "all" else int(rank)), ITSELF.forward

    def forward(self, batch, step):
        out = real(self, batch, step)
        if step in chosen and only_rank in (None, int(os.environ.get("RANK", 0))):
            key = next(k for k in out if k.endswith("_loss"))
            out[key] = out[key] * float("nan") if kind == "loss" else NanGradient.apply(out[key])
        return out

    ITSELF.forward = forward
    try:
        yield
    finally:
        ITSELF.forward = real


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # (the DeepSpeed launcher adds it)
    from itself.train import main

    with nan_at(*args[:3]):
        raise SystemExit(main(args[3:]))

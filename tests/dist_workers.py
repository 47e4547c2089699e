"""Worker functions that tests run in real multi-process gloo groups (importable by spawn)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_gloo(rank: int, world: int, init_file: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def model_loss_and_grads(model_kwargs: dict, batch: dict, step: int):
    """Build the model (fixed seed), run forward/backward on `batch`; returns (loss, image grads,
    parameter grads) of this process."""
    from itself.losses import total_loss
    from itself.model import ITSELF

    torch.manual_seed(0)
    model = ITSELF(**model_kwargs)
    model.train()
    images = batch["images"].clone().requires_grad_(True)
    out = model({**batch, "images": images}, step)
    loss = total_loss(out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), images.grad.clone(), grads


def world_size_invariance_worker(rank: int, world: int, init_file: str, model_kwargs: dict, batch: dict,
                                 step: int, out_dir: str) -> None:
    init_gloo(rank, world, init_file)
    n = batch["images"].shape[0] // world
    mine = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    loss, image_grad, grads = model_loss_and_grads(model_kwargs, mine, step)
    torch.save({"loss": loss, "image_grad": image_grad, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()

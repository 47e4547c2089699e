"""The DeepSpeed engine of a run: precision, the DeepSpeed config, the optimizer's
parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
import sys

import torch

from .config import Config, deepspeed_file


def resolve_precision(name: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if name == "auto" else name


def deepspeed_config(cfg: Config, world_size: int, precision: str, device: torch.device) -> dict:
    """The cluster file (ZeRO stage, offload) with everything else filled in from the train config."""
    t = cfg.train
    ds = deepspeed_file(t.deepspeed)
    adam = {"lr": t.lr, "betas": list(t.adam_betas), "eps": t.adam_eps, "weight_decay": t.weight_decay,
            "torch_adam": True, "adam_w_mode": False}  # Adam with L2 weight decay, as the reference code
    if device.type == "cuda":
        adam["fused"] = True
    ds.update({
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": cfg.layout(world_size).micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        # Skip (never apply) a step whose gradients are not finite: explicit, as older DeepSpeed
        # releases did not check in bf16. (fp32 ZeRO checks the gradient norm; ZeRO-0 fp32: the trainer.)
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "optimizer": {"type": "Adam", "params": adam},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    return ds


def param_groups(model, cfg: Config) -> list[dict]:
    """Adam groups as the reference code forms them, rule after rule (a later rule's lr wins):
    every parameter at `lr` with weight decay; a bias (any name containing "bias") at
    lr x bias_lr_mult without decay; a classifier layer (CID and ID) at lr x head_lr_mult; a GRAB
    layer at grab_lr. The CID MLP is neither: it trains at `lr` (its biases at lr x bias_lr_mult)."""
    t, groups = cfg.train, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr, wd = t.lr, t.weight_decay
        if "bias" in name:
            lr, wd = t.lr * t.bias_lr_mult, 0.0
        role = model.param_role(name)
        if role == "classifier":
            lr = t.lr * t.head_lr_mult
        elif role == "grab":
            lr = t.grab_lr
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def lr_factor(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """Linear warm-up from warmup_factor to 1, then cosine decay to min_lr_ratio (per optimizer step)."""
    t = cfg.train
    if t.schedule == "steps":
        warm, total = t.warmup_steps, t.max_steps
    else:
        warm, total = t.warmup_epochs * steps_per_epoch, t.epochs * steps_per_epoch
    if step < warm:
        return t.warmup_factor + (1 - t.warmup_factor) * step / warm
    progress = min(1.0, (step - warm) / max(1.0, total - warm))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def checkpoint_bytes(model: torch.nn.Module, precision: str) -> int:
    """About the size of one checkpoint: weights, the fp32 master copy (bf16) and Adam's two moments."""
    n = sum(p.numel() for p in model.parameters())
    return n * ((2 + 4) if precision == "bf16" else 4) + n * 8


def skip_shm_all_reduce(deepspeed) -> None:
    """On CPU, DeepSpeed's process group builds a shared-memory all-reduce for tensor-parallel
    inference, which training never uses: a ~60 s compile on first use, and a 66 MiB /dev/shm
    segment per rank that is never removed (a leak of RAM on every node, every run). Turn it off."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def restore_torch_linear() -> None:
    """Under ZeRO-3 DeepSpeed replaces torch.nn.functional.linear for the whole process ("this will
    persist unless manually reset"): put torch's back when a run ends, so that whatever runs next in
    this process (another train(), a Tune trial in a reused worker, torch.jit.script of a model) gets
    torch's own."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    original = getattr(getattr(zero, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def build_engine(model, cfg: Config, ds_config: dict, steps_per_epoch: int):
    """The DeepSpeed engine of `model` with `ds_config` (see `deepspeed_config`); `train.cpu_threads`,
    when set, replaces the automatic CPU thread count the process started with."""
    import deepspeed

    if cfg.train.cpu_threads:
        from .cpus import apply_cpu_plan

        apply_cpu_plan(cpu_threads=cfg.train.cpu_threads)

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, steps_per_epoch, cfg)))
    return engine

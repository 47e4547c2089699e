"""Train and evaluate ITSELF with DeepSpeed: `deepspeed itself/train.py [--preset NAME] [key=value ...]`.

`train(cfg) -> dict` is a plain function (SLURM jobs and Ray Tune trials call it). The script
runs under `deepspeed` (one or many GPUs, a hostfile over nodes), `torchrun`, SLURM, or plain
`python` (a world of one). Each epoch it evaluates on val, keeps the best checkpoint by val
(the fusion weight is chosen on val too), and at the end evaluates that checkpoint on test.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: import the package, not its files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import math
import os
import shutil
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from itself import checkpoint as ckpt
from itself.config import DEEPSPEED_CONFIGS, Config, ConfigError, to_dict
from itself.data import DataError, ensure_dataset, train_loader
from itself.dist import ensure_process_env
from itself.evaluate import best_fusion, evaluate
from itself.losses import total_loss
from itself.model import ITSELF



# ----------------------------------------------------------------------------------- setup


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is visible")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def resolve_precision(name: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if name == "auto" else name


def deepspeed_config(cfg: Config, world_size: int, precision: str, device: torch.device) -> dict:
    """The cluster file (ZeRO stage, offload) with everything else filled in from the train config."""
    t = cfg.train
    path = Path(t.deepspeed) if t.deepspeed.endswith(".json") else DEEPSPEED_CONFIGS / f"{t.deepspeed}.json"
    if not path.exists():  # (names are checked by Config.validate; a path may be missing)
        raise ConfigError(f"train.deepspeed: {path} not found")
    ds = json.loads(path.read_text())
    adam = {"lr": t.lr, "betas": list(t.adam_betas), "eps": t.adam_eps, "weight_decay": t.weight_decay,
            "torch_adam": True, "adam_w_mode": False}
    if device.type == "cuda":
        adam["fused"] = True
    ds.update({
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // (world_size * t.grad_accum),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        # Skip (never apply) a step whose gradients are not finite: explicit, as older DeepSpeed
        # releases did not check in bf16. (fp32 ZeRO checks the gradient norm; ZeRO-0 fp32: _drop_nonfinite_grads.)
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "optimizer": {"type": "Adam", "params": adam},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    return ds


def param_groups(model: ITSELF, cfg: Config) -> list[dict]:
    """Adam groups: backbone at lr (biases x bias_lr_mult, no decay), GRAB at grab_lr, heads at lr x head_lr_mult."""
    t, groups = cfg.train, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        top = name.split(".")[0]
        if top in ITSELF.GRAB_MODULES:
            key = (t.grab_lr, t.weight_decay)
        elif top in ITSELF.HEAD_MODULES:
            key = (t.lr * t.head_lr_mult, t.weight_decay)
        elif name.endswith(".bias"):
            key = (t.lr * t.bias_lr_mult, 0.0)
        else:
            key = (t.lr, t.weight_decay)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def lr_factor(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """Linear warm-up from warmup_factor to 1, then cosine decay to min_lr_ratio (per optimizer step)."""
    t = cfg.train
    warm, total = t.warmup_epochs * steps_per_epoch, t.epochs * steps_per_epoch
    if step < warm:
        return t.warmup_factor + (1 - t.warmup_factor) * step / warm
    progress = min(1.0, (step - warm) / max(1.0, total - warm))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _broadcast(obj, rank: int):
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_run_dir(cfg: Config, rank: int) -> Path:
    """The run directory (rank 0 names it, every rank gets it), checked writable before any work."""
    run_dir = cfg.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, problem = _broadcast((run_dir, _unwritable(Path(run_dir)) if rank == 0 else None), rank)
    run_dir = Path(run_dir)
    if problem:
        raise ConfigError(problem)
    if not cfg.train.resume and ckpt.latest_tag(run_dir / "checkpoints"):
        raise ConfigError(f"run_dir: {run_dir} already holds checkpoints; pass train.resume=latest to continue "
                          "that run, or choose another run_dir")
    return run_dir


def _unwritable(run_dir: Path) -> str | None:
    """Why files cannot be written in run_dir (a read-only or full file system, a file in the
    way, no permission), or None: found now rather than at the first checkpoint."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"run_dir: cannot write to {run_dir}: {e.strerror or e}; choose a writable run_dir"
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # (no folder to remove it from)
            pass
    return None


def checkpoint_bytes(model: torch.nn.Module, precision: str) -> int:
    """About the size of one checkpoint: weights, the fp32 master copy (bf16) and Adam's two moments."""
    n = sum(p.numel() for p in model.parameters())
    return n * ((2 + 4) if precision == "bf16" else 4) + n * 8


def check_free_space(run_dir: Path, model: torch.nn.Module, cfg: Config, precision: str) -> str | None:
    """Why the run directory cannot hold this run's checkpoints (the last `keep_last`, the best, the
    one being written) and the exported model, or None."""
    per_ckpt = checkpoint_bytes(model, precision)
    need = per_ckpt * (cfg.train.keep_last + 2) + sum(p.numel() for p in model.parameters()) * 4
    # A resumed run's checkpoints are already there, and give their room to the new ones.
    held = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file())
    free = shutil.disk_usage(run_dir).free
    if free + held >= need:
        return None
    mib = 2 ** 20
    return (f"run_dir: {run_dir} has {free / mib:.1f} MiB free{f' (+{held / mib:.1f} MiB of checkpoints)' if held else ''}, "
            f"but this run needs about {need / mib:.1f} MiB "
            f"({cfg.train.keep_last + 2} checkpoints of {per_ckpt / mib:.1f} MiB: train.keep_last={cfg.train.keep_last}, "
            f"the best, the one being written; and model.pt). Free space, lower train.keep_last, or choose another run_dir")


class RunLog:
    """Rank 0's text log (train.log), metrics.jsonl and TensorBoard events; silent elsewhere."""

    def __init__(self, run_dir: Path, rank: int):
        self.active = rank == 0
        self.tb = None
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.text = open(run_dir / "train.log", "a")
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # optional: TensorBoard events need tensorboardX
            pass

    def info(self, msg: str) -> None:
        if self.active:
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            print(line, flush=True)
            self.text.write(line + "\n")
            self.text.flush()

    def record(self, kind: str, step: int, values: dict) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"type": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in _flatten(values).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.active:
            self.text.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def results_table(rows: dict[str, dict]) -> str:
    lines = [f"{'':<22} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'mAP':>7} {'mINP':>7}"]
    for name, m in rows.items():
        lines.append(f"{name:<22} {m['R1']:>7.2f} {m['R5']:>7.2f} {m['R10']:>7.2f} {m['mAP']:>7.2f} {m['mINP']:>7.2f}")
    return "\n".join(lines)


def chance_r1(info: dict, split: str) -> float:
    """R@1 of a random ranking: the share of the gallery that matches a query, about 1 / identities."""
    return 100.0 / info["splits"][split]["identities"]


# ----------------------------------------------------------------------------------- train


def train(cfg: Config, should_stop: Callable[[], bool] | None = None) -> dict:
    """Train, evaluate on val every `eval.every` epochs, keep the best by val, evaluate it on test.
    Returns {"run_dir", "best_epoch", "fusion_weight", "val": {...}, "test": {...}} on every rank.

    `should_stop` is polled after every optimizer step (a scheduler's pre-emption warning, say);
    when it is true on any rank, every rank saves a checkpoint at that step and train returns
    {"interrupted": True, "run_dir", "global_step", "checkpoint"}; `train.resume=latest` continues."""
    where = ensure_process_env()
    cfg.validate(where.world_size)  # fail before any work
    device = resolve_device(cfg.train.device, where.local_rank)
    precision = resolve_precision(cfg.train.precision, device)
    if device.type == "cpu":  # share the cores among the ranks of this host (oversubscription is ruinous)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or min(where.world_size, os.cpu_count() or 1)
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1) // local_world
        torch.set_num_threads(max(1, threads))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    # Every rank checks the data (one builds the synthetic set under a file lock, the others wait
    # for it) before joining the group, so no collective waits out a long build.
    ensure_dataset(cfg.data.root, cfg.data.build_synthetic)
    import deepspeed

    owns_group = not dist.is_initialized()
    if device.type == "cpu":
        _skip_shm_all_reduce(deepspeed)
    if owns_group:
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False,
                                   timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    progress: dict = {}
    try:
        result = _train(cfg, dist.get_rank(), dist.get_world_size(), device, precision, deepspeed, should_stop, progress)
    except ConfigError:
        raise
    except BaseException as e:  # a dead peer, a timeout, a full disk, an interrupt: say how to go on
        _report_failure(e, progress, where.rank)
        raise
    if owns_group:  # a clean exit: a live group aborts the process at interpreter shutdown
        dist.barrier()
        dist.destroy_process_group()
    return result


def _skip_shm_all_reduce(deepspeed) -> None:
    """On CPU, DeepSpeed's process group builds a shared-memory all-reduce for tensor-parallel
    inference, which training never uses: a ~60 s compile on first use, and a 66 MiB /dev/shm
    segment per rank that is never removed (a leak of RAM on every node, every run). Turn it off."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (train.nonfinite)."""


def _report_failure(error: BaseException, progress: dict, rank: int) -> None:
    """Tell the user, from every rank that fails, where training stopped and how to continue."""
    run_dir = progress.get("run_dir")
    where = f"at step {progress['global_step']} (epoch {progress['epoch'] + 1})" if "global_step" in progress else "during setup"
    msg = f"[rank {rank}] training failed {where}: {type(error).__name__}: {error}"
    if run_dir is not None:
        tag = ckpt.latest_tag(run_dir / "checkpoints")
        msg += (f"\n[rank {rank}] to continue, rerun the same command with run_dir={run_dir} train.resume=latest "
                f"(newest complete checkpoint: {tag})" if tag else
                f"\n[rank {rank}] no complete checkpoint in {run_dir}/checkpoints yet: rerun from the start")
    print(msg, file=sys.stderr, flush=True)
    if run_dir is not None and rank == 0:  # (train.log is rank 0's; the others' go to their own stderr)
        try:
            with open(run_dir / "train.log", "a") as f:
                f.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
        except OSError:
            pass


def _train(cfg: Config, rank: int, world: int, device: torch.device, precision: str, deepspeed,
           should_stop: Callable[[], bool] | None, progress: dict) -> dict:
    run_dir = resolve_run_dir(cfg, rank)
    log = RunLog(run_dir, rank)
    t = cfg.train
    info = ensure_dataset(cfg.data.root)
    micro = t.batch_size // (world * t.grad_accum)
    loader = train_loader(cfg.data, rank=rank, world_size=world, micro_batch=micro, seed=cfg.seed)
    loader.set_epoch(0)
    steps_per_epoch = len(loader) // t.grad_accum

    torch.manual_seed(cfg.seed)
    model = ITSELF(cfg.model, info["train_identities"], cfg.data.image_size)
    model.schedule.steps_per_epoch = steps_per_epoch
    problem = _broadcast(check_free_space(run_dir, model, cfg, precision) if rank == 0 else None, rank)
    if problem:
        raise ConfigError(problem)
    ds_config = deepspeed_config(cfg, world, precision, device)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, steps_per_epoch, cfg)))
    if rank == 0:
        (run_dir / "config.yaml").write_text(_yaml(to_dict(cfg)))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")

    ckpt_dir = run_dir / "checkpoints"
    state = {"epoch": 0, "micro_step": 0, "global_step": 0, "best_score": None, "best_epoch": None,
             "fusion_weight": 1.0, "best_val": None, "skipped_steps": 0}
    if t.resume:
        src_dir, tag = _resume_source(t.resume, ckpt_dir)
        for partial in ckpt.incomplete_tags(src_dir):
            log.info(f"ignoring incomplete checkpoint {src_dir / partial} (no {ckpt.COMPLETE} marker: "
                     "the run stopped while writing it)" + ("; removing it" if src_dir == ckpt_dir else ""))
            if rank == 0 and src_dir == ckpt_dir:
                shutil.rmtree(src_dir / partial, ignore_errors=True)
        state.update({k: v for k, v in ckpt.load(engine, src_dir, tag, rank).items() if k in state})
        log.info(f"resumed from {src_dir / tag}: epoch {state['epoch'] + 1}, step {state['global_step']}")
    progress.update(run_dir=run_dir, epoch=state["epoch"], global_step=state["global_step"])

    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"run {run_dir} | {world} rank(s) on {device.type}, {precision} | {cfg.model.arch} "
             f"{n_params / 1e6:.1f}M params | {info['splits']['train']['captions']} train pairs, "
             f"{steps_per_epoch} steps/epoch x {t.epochs} epochs, batch {t.batch_size} ({micro}/rank)")
    total_steps = t.max_steps or steps_per_epoch * t.epochs
    started, stop = time.time(), False
    seen_steps, skips_in_a_row = 0, 0
    check_grads = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    for epoch in range(state["epoch"], t.epochs):
        progress["epoch"] = epoch
        loader.set_epoch(epoch, state["micro_step"])
        micro_total = (len(loader) // t.grad_accum) * t.grad_accum
        bar = _progress(rank, epoch, t.epochs, micro_total // t.grad_accum, state["micro_step"] // t.grad_accum)
        window, last_log = [], time.time()
        for i, batch in enumerate(loader, start=state["micro_step"]):
            if i >= micro_total:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if (i - state["micro_step"]) % t.grad_accum == 0:  # a step begins: keep its buffers to undo a skip
                buffers = [b.clone() for b in engine.module.buffers()]
            out = engine(batch, step=state["global_step"])
            loss = total_loss(out)
            engine.backward(loss * world)  # shares of a global-batch loss; the engine averages over ranks
            boundary = engine.is_gradient_accumulation_boundary()
            skipped_before = engine.skipped_steps
            # Without ZeRO and bf16, DeepSpeed would apply non-finite gradients: we drop them.
            dropped = boundary and check_grads and _drop_nonfinite_grads(engine, device)
            engine.step()
            window.append({k: (v.item() if torch.is_tensor(v) else float(v)) for k, v in out.items()} | {"loss": loss.item()})
            if not boundary:
                continue
            state["global_step"] += 1
            state["micro_step"] = i + 1
            progress["global_step"] = state["global_step"]
            seen_steps += 1
            step_loss = window[-1]["loss"]
            if dropped or engine.skipped_steps > skipped_before:
                # The update was dropped (by DeepSpeed, or above): weights and optimizer state are
                # those of the previous step.
                for b, saved in zip(engine.module.buffers(), buffers):  # (BatchNorm statistics of the bad batch)
                    b.copy_(saved)
                state["skipped_steps"] += 1
                skips_in_a_row += 1
                losses = window[-t.grad_accum:]
                del window[-t.grad_accum:]
                _on_nonfinite(engine, cfg, ckpt_dir, state, epoch, losses, skips_in_a_row, log, rank)
            else:
                skips_in_a_row = 0
            if bar is not None:
                rate = seen_steps * t.batch_size / (time.time() - started)
                eta = (total_steps - state["global_step"]) * t.batch_size / max(rate, 1e-9)
                bar.set_postfix(loss=f"{step_loss:.3f}", samples_s=f"{rate:.0f}", eta=_hms(eta), refresh=False)
                bar.update(1)
            if state["global_step"] % t.log_every == 0 and window:  # (all ranks skip the same steps)
                values = _global_means(window, world, device)
                values.update(epoch=epoch, lr=engine.get_lr()[0], skipped_steps=state["skipped_steps"],
                              samples_per_s=len(window) * micro * world / max(time.time() - last_log, 1e-9))
                log.record("train", state["global_step"], values)
                window, last_log = [], time.time()
            if t.checkpoint_every and state["global_step"] % t.checkpoint_every == 0:
                ckpt.save(engine, ckpt_dir, state["global_step"], dict(state, epoch=epoch),
                          keep_last=t.keep_last, is_best=False, rank=rank)
            if t.max_steps and state["global_step"] >= t.max_steps:
                stop = True
                break
            if should_stop is not None and _any_rank(should_stop(), device):
                tag = ckpt.save(engine, ckpt_dir, state["global_step"], dict(state, epoch=epoch),
                                keep_last=t.keep_last, is_best=False, rank=rank)
                log.info(f"stop requested: saved checkpoint {tag} at step {state['global_step']} "
                         f"(epoch {epoch + 1}); continue with train.resume=latest")
                log.record("interrupted", state["global_step"], {"epoch": epoch, "checkpoint": tag})
                log.close()
                return {"interrupted": True, "run_dir": str(run_dir), "global_step": state["global_step"],
                        "checkpoint": tag}
        if bar is not None:
            bar.close()
        if state["micro_step"] >= micro_total or not stop:  # the epoch is done (else max_steps stopped it)
            state["epoch"], state["micro_step"] = epoch + 1, 0
        else:
            state["epoch"] = epoch
        if rank == 0 and loader.stats:
            log.record("data", state["global_step"], loader.stats)
        is_best = False
        if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == t.epochs or stop:
            is_best = _validate(engine.module, cfg, rank, world, device, epoch, state, log)
        ckpt.save(engine, ckpt_dir, state["global_step"], state, keep_last=t.keep_last, is_best=is_best, rank=rank)
        if stop:
            break
    return _finish(engine, cfg, rank, world, device, info, ckpt_dir, run_dir, state, log)


def _drop_nonfinite_grads(engine, device) -> bool:
    """Without ZeRO and bf16 DeepSpeed steps a plain optimizer that applies whatever gradients it
    gets: drop them all (Adam then leaves every parameter and its moments alone) if any is
    non-finite on any rank; True if dropped. The other setups skip such steps themselves
    (`engine.skipped_steps`)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
    if not _any_rank(not finite, device):
        return False
    for p in engine.module.parameters():
        p.grad = None
    return True


def _on_nonfinite(engine, cfg: Config, ckpt_dir: Path, state: dict, epoch: int, losses: list[dict],
                  in_a_row: int, log: RunLog, rank: int) -> None:
    """Count a skipped step; with train.nonfinite=stop, or too many in a row, checkpoint and stop."""
    t = cfg.train
    loss = ", ".join(f"{w['loss']:.4g}" for w in losses)
    what = "non-finite loss" if any(not math.isfinite(w["loss"]) for w in losses) else "non-finite gradients"
    log.info(f"step {state['global_step']} (epoch {epoch + 1}): {what} (loss {loss} on rank 0): update skipped "
             f"({in_a_row} in a row, {state['skipped_steps']} in all)")
    log.record("skipped", state["global_step"], {"epoch": epoch, "reason": what, "in_a_row": in_a_row,
                                                 "skipped_steps": state["skipped_steps"]})
    too_many = t.max_skipped_steps and in_a_row >= t.max_skipped_steps
    if t.nonfinite == "skip" and not too_many:
        return
    tag = ckpt.save(engine, ckpt_dir, state["global_step"], dict(state, epoch=epoch),
                    keep_last=t.keep_last, is_best=False, rank=rank)
    why = ("train.nonfinite=stop" if t.nonfinite == "stop"
           else f"{in_a_row} skipped steps in a row reach train.max_skipped_steps={t.max_skipped_steps}")
    raise NonFiniteError(
        f"{what} at step {state['global_step']} (epoch {epoch + 1}); stopping ({why}). Checkpoint {tag} holds the "
        "last finite weights (the update of this step was not applied). Lower train.lr, set train.grad_clip, "
        "or use train.nonfinite=skip, then continue with train.resume=latest")


def _any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is true on any (so all ranks stop at the same step)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _global_means(window: list[dict], world: int, device) -> dict:
    """Means over the logged steps of the global values: loss shares are summed over ranks, the
    other report values (k_image, k_text) are the same on every rank."""
    keys = list(window[0])
    local = torch.tensor([[w[k] for k in keys] for w in window], dtype=torch.float64).mean(0).to(device)
    total = local.clone()
    dist.all_reduce(total)
    return {k: float(total[i] if k.endswith("loss") else local[i]) for i, k in enumerate(keys)}


def _validate(model, cfg: Config, rank: int, world: int, device, epoch: int, state: dict, log: RunLog) -> bool:
    """Evaluate on val, choose the fusion weight there; True (on every rank) if this is the best epoch."""
    results = evaluate(model, cfg, "val", rank, world, device)
    verdict = None
    if rank == 0:
        a, fused = best_fusion(results)
        score = (fused["R1"], fused["mAP"])
        verdict = state["best_score"] is None or score > tuple(state["best_score"])
        log.record("eval", state["global_step"], {"split": "val", "epoch": epoch, "fusion_weight": a, "metrics": results})
        log.info(f"epoch {epoch + 1}: val R@1 {fused['R1']:.2f} mAP {fused['mAP']:.2f} (fused a={a:g}; "
                 f"global R@1 {results['global']['R1']:.2f})" + ("  * best" if verdict else "")
                 + (f"  ({results['counts']['gallery_skipped']} corrupt gallery images skipped)"
                    if results["counts"]["gallery_skipped"] else ""))
        if verdict:
            state.update(best_score=list(score), best_epoch=epoch + 1, fusion_weight=a, best_val=results)
    verdict, best = _broadcast((verdict, {k: state[k] for k in ("best_score", "best_epoch", "fusion_weight", "best_val")}), rank)
    state.update(best)
    return bool(verdict)


def _finish(engine, cfg, rank, world, device, info, ckpt_dir: Path, run_dir: Path, state: dict, log: RunLog) -> dict:
    best = ckpt.read_pointer(ckpt_dir, "best") or ckpt.latest_tag(ckpt_dir)
    ckpt.load(engine, ckpt_dir, best, rank, weights_only=True)
    results = evaluate(engine.module, cfg, "test", rank, world, device)
    a = state["fusion_weight"]
    summary = None
    sd = ckpt.full_state_dict(engine)
    if rank == 0:
        fused_key = f"fused@{a:g}"
        test = {"global": results["global"], **({"grab": results["grab"], "fused": results[fused_key]}
                                                  if "grab" in results else {})}
        val = state["best_val"] or {}
        val_rows = {f"val {k}": v for k, v in (("global", val.get("global")), ("grab", val.get("grab")),
                                                ("fused", val.get(fused_key))) if v}
        log.record("test", state["global_step"], {"split": "test", "checkpoint": best, "fusion_weight": a,
                                                  "metrics": test})
        model_path = run_dir / "model.pt"
        ckpt.export(model_path, sd, to_dict(cfg), info["train_identities"], a, metrics=test)
        summary = {"run_dir": str(run_dir), "best_epoch": state["best_epoch"], "checkpoint": best,
                   "fusion_weight": a, "val": {k: v for k, v in val.items() if k in ("global", "grab", fused_key)},
                   "test": test, "test_counts": results["counts"], "test_chance_R1": chance_r1(info, "test"),
                   "model": str(model_path)}
        (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("results (best val epoch {}, checkpoint {}, fusion weight a={:g} chosen on val):\n{}".format(
            state["best_epoch"], best, a, results_table({**val_rows, **{f"test {k}": v for k, v in test.items()}})))
        log.info(f"test R@1 chance level: {summary['test_chance_R1']:.2f}")
        log.info(f"written: {run_dir}/ (model.pt, results.json, metrics.jsonl, train.log, config.yaml, "
                 f"deepspeed_config.json, tensorboard/, checkpoints/)")
    log.close()
    return _broadcast(summary, rank)


def _resume_source(resume: str, ckpt_dir: Path) -> tuple[Path, str]:
    if resume == "latest":
        tag = ckpt.latest_tag(ckpt_dir)
        if tag is None:
            raise ConfigError(f"train.resume=latest: no complete checkpoint in {ckpt_dir}")
        return ckpt_dir, tag
    path = Path(resume)
    if not ckpt.is_complete(path.parent, path.name):
        raise ConfigError(f"train.resume: {path} is not a complete checkpoint directory")
    return path.parent, path.name


def _progress(rank: int, epoch: int, epochs: int, total: int, initial: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                dynamic_ncols=True, mininterval=1.0)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


# ----------------------------------------------------------------------------------- script


def main(argv: list[str] | None = None) -> int:
    from itself.presets import PRESETS, resolve_config

    p = argparse.ArgumentParser(
        prog="itself/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted config keys, e.g. train.epochs=5 model.selection=std_max "
               "model.mars_layers=[4,11] (values parsed as YAML). Presets: " + ", ".join(PRESETS))
    p.add_argument("--preset", default="synthetic", help="named configuration (default: synthetic)")
    p.add_argument("--config", help="YAML file of config sections, applied after the preset")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        cfg = resolve_config(args.preset, args.config, args.overrides)
        if args.print_config:
            print(_yaml(to_dict(cfg)), end="")
            return 0
        train(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written and closed: skip the interpreter's teardown, where a C++ thread of the
    # communication libraries was once seen to abort (SIGABRT) a finished 2-rank run under load.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

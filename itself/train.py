"""Train and evaluate ITSELF with DeepSpeed: `deepspeed itself/train.py [--preset NAME] [key=value ...]`.

`train(cfg) -> Results` is a plain function (SLURM jobs and Ray Tune trials call it). The script
runs under `deepspeed` (one or many GPUs, a hostfile over nodes), `torchrun`, SLURM, or plain
`python` (a world of one). Each epoch it evaluates on val, keeps the best checkpoint by val
(the fusion weight and GRAB selection are chosen on val too), and at the end evaluates that
checkpoint's exported weights on test.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable

import itself  # noqa: F401 - (first, before torch: it sets OpenMP's wait policy, read once when torch loads)
import torch

from itself import interrupts, logs
from itself.checkpoint import Checkpointer, TrainState
from itself.config import Config, ConfigError, config_yaml, describe, to_dict
from itself.data.pipeline import train_loader
from itself.data.sources import ensure_dataset
from itself.dist import Process, start
from itself.engine import (build_engine, checkpoint_bytes, deepspeed_config, resolve_precision, restore_torch_linear,
                           skip_shm_all_reduce)
from itself.errors import exit_code
from itself.layout import batched
from itself.losses import total_loss
from itself.meter import StepMeter, progress_bar, show_rate
from itself.model import ITSELF
from itself.model.init import init_from
from itself.nonfinite import BatchNormStats, NonFiniteError, SkipPolicy, drop_nonfinite_grads
from itself.outcome import Outcome
from itself.presets import PRESETS, resolve_config, resolve_references
from itself.records import Interrupted, Results
from itself.resume import discard_empty_run, report_failure, restore
from itself.rundir import RunDir, RunLog


def train(cfg: Config, should_stop: Callable[[], bool] | None = None) -> Results | Interrupted:
    """Train, evaluate on val every `eval.every` epochs, keep the best by val, evaluate it on test.
    Returns the run's `Results` on every rank.

    `should_stop` is polled at every log interval (`train.log_every` steps; a scheduler's
    pre-emption warning, say); when it is true on any rank, every rank saves a checkpoint at that
    step and train returns `Interrupted`; `train.resume=latest` continues."""
    with interrupts.kept():
        return _train(cfg, should_stop)


def _train(cfg: Config, should_stop: Callable[[], bool] | None) -> Results | Interrupted:
    proc, owns_group = start_training(cfg)
    run, new, lock = claim_run_dir(cfg, proc)
    log, trainer = run.open_log(proc.rank, cfg.train.report_to, to_dict(cfg), cfg.train.wandb_project), None
    try:
        run.check_reuse(cfg.train.resume)
        trainer = Trainer(cfg, proc, run, log, should_stop)
        result = trainer.fit()
    except BaseException as e:  # a dead peer, a timeout, a full disk, an interrupt: say how to go on
        started = trainer is not None and trainer.started
        if not isinstance(e, ConfigError):
            where = f"at step {trainer.state.global_step} (epoch {trainer.state.epoch + 1})" if started else "during setup"
            report_failure(e, proc.rank, run, where)
        log.close()
        if not started and new and proc.is_main:
            discard_empty_run(run)
        raise
    finally:
        restore_torch_linear()
        if lock is not None:
            lock.release()
    log.close()
    if owns_group:
        proc.barrier()
        proc.close()
    return result


def start_training(cfg: Config) -> tuple[Process, bool]:
    """This process ready to train `cfg`: the launcher's environment checked, the config validated
    for the world size, the data checked (the synthetic set built on first use), the process group
    and DeepSpeed's communication formed. Returns (the process, whether it formed the group)."""
    import deepspeed
    import torch.distributed as dist

    if not logs.configured():
        logs.setup()
    resolve_references(cfg)
    owns_group = not dist.is_initialized()
    proc = start(cfg.train.device, cfg.train.collective_timeout_s, group="never", cpu_threads=cfg.train.cpu_threads)
    cfg.validate(proc.world)  # fail before any work
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    # Every rank checks the data (one builds the synthetic set under a file lock, the others wait
    # for it) before joining the group, so no collective waits out a long build.
    ensure_dataset(cfg.data.root, cfg.data.build_synthetic)
    if proc.device.type == "cpu":
        skip_shm_all_reduce(deepspeed)
    proc.join_group(cfg.train.collective_timeout_s)
    deepspeed.init_distributed(dist_backend="nccl" if proc.device.type == "cuda" else "gloo", verbose=False)
    return proc, owns_group


def claim_run_dir(cfg: Config, proc: Process):
    """(the run directory, whether this run created it, its lock on rank 0 / None elsewhere): rank 0
    names it, checks it can be written and takes it (one writer per run directory)."""
    held = {}

    def claim() -> tuple[str, bool]:  # (rank 0: the timestamped default name must be one for all ranks)
        path = cfg.run_dir or RunDir.default_path(cfg.name)
        new = not Path(path).exists()
        held["lock"] = RunDir(path).claim()
        return path, new

    path, new = proc.decide(claim)
    return RunDir(path), new, held.get("lock")


def build_model(cfg: Config, num_ids: int, steps_per_epoch: int):
    """(the model of `cfg`, seeded; the record of `model.init_from` or None): a run that starts from
    another run's weights does not read `model.pretrained`."""
    torch.manual_seed(cfg.seed)
    model = ITSELF(dataclasses.replace(cfg.model, pretrained="") if cfg.model.init_from else cfg.model,
                   num_ids, cfg.data.image_size, steps_per_epoch)
    init = init_from(model, cfg.model.init_from, cfg.model.arch) if cfg.model.init_from else None
    model.speed_options(grad_checkpointing=cfg.train.grad_checkpointing, compile=cfg.train.compile)
    return model, init


class Trainer:
    """One training run in a claimed run directory: `__init__` builds (or resumes) the data, model
    and engine, `fit()` trains, evaluates and finishes. The state that checkpoints carry is `state`."""

    def __init__(self, cfg: Config, proc: Process, run: RunDir, log: RunLog,
                 should_stop: Callable[[], bool] | None = None):
        t = cfg.train
        self.cfg, self.proc, self.run, self.log, self.should_stop = cfg, proc, run, log, should_stop
        self.precision = resolve_precision(t.precision, proc.device)
        self.state, self.started, self.bar, self.policy = TrainState(), False, None, SkipPolicy(t)
        self.info = ensure_dataset(cfg.data.root)
        micro_batch = cfg.layout(proc.world).micro_batch
        self.loader = train_loader(cfg.data, rank=proc.rank, world_size=proc.world, micro_batch=micro_batch,
                                   seed=cfg.seed)
        self.loader.set_epoch(0)
        self.steps_per_epoch = len(self.loader) // t.grad_accum
        # (schedule=steps: the data is cycled epoch after epoch until max_steps)
        self.epochs = t.epochs if t.schedule == "epochs" else -(-t.max_steps // self.steps_per_epoch)
        model, init = build_model(cfg, self.loader.num_ids, self.steps_per_epoch)
        n_params = sum(p.numel() for p in model.parameters())
        proc.decide(lambda: run.check_room(checkpoint_bytes(model, self.precision), n_params * 4, t.keep_last))
        ds_config = deepspeed_config(cfg, proc.world, self.precision, proc.device)
        self.engine = build_engine(model, cfg, ds_config, self.steps_per_epoch)
        self.ckpt = Checkpointer(self.engine, run.checkpoints, t.keep_last, proc)
        self.meter = StepMeter(proc.world, proc.device, micro_batch * proc.world)
        self.bn = BatchNormStats(self.engine.module)
        # Without ZeRO and bf16, DeepSpeed would apply non-finite gradients: the trainer drops them.
        self.check_grads = self.engine.zero_optimization_stage() == 0 and not self.engine.bfloat16_enabled()
        self.outcome = Outcome(cfg, proc, run, log, self.info, self.loader.num_ids)
        self.state = restore(run, cfg, proc, self.ckpt, model)
        if init is not None and self.state.global_step == 0:  # (a resumed run has them in its state)
            self.state.init_from = init
            self.state.zero_shot = self.outcome.evaluate_zero_shot(self.engine.module)
        if proc.is_main:  # (after a resume was found possible: a refused one leaves its run as it was)
            run.write_configs(config_yaml(cfg), ds_config)
        log.info(f"run {run.path.resolve()} | {proc.world} rank(s) on {proc.device.type}, {self.precision} | {cfg.model.arch} "
                 f"{n_params / 1e6:.1f}M params | {self.info['splits']['train']['captions']} train pairs, "
                 f"{self.steps_per_epoch} steps/epoch x {self.epochs} epochs, batch {t.batch_size} ({micro_batch}/rank)")

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> Results | Interrupted:
        self.started = True
        while self.state.epoch < self.epochs:
            if not self.train_epoch():
                return self._interrupt()
            if not self._end_epoch():
                break
        interrupts.check()
        return self.outcome.finish(self.engine, self.ckpt, self.state)

    def train_epoch(self) -> bool:
        """The steps left in the current epoch (up to train.max_steps); False when a stop was
        requested (the caller checkpoints)."""
        t, s = self.cfg.train, self.state
        for batches in self._steps_of_epoch():
            self.step(batches)
            if s.global_step % t.log_every == 0:  # (reading the window synchronises the host)
                self._log_window()
                if self.should_stop is not None and self.proc.any(self.should_stop()):
                    return False
            if self._max_steps_reached():  # (the epoch end evaluates and checkpoints)
                break
            if t.schedule == "steps" and self.cfg.eval.every_steps and s.global_step % self.cfg.eval.every_steps == 0:
                self.ckpt.save(s, is_best=self.outcome.validate(self.engine.module, s, s.epoch))
            elif t.checkpoint_every and s.global_step % t.checkpoint_every == 0:
                self.ckpt.save(s)
        return True

    def _steps_of_epoch(self):
        """The optimizer steps left in this epoch, each a list of `grad_accum` micro-batches; the
        time spent waiting for each batch goes to the meter."""
        s, accum = self.state, self.cfg.train.grad_accum
        self.loader.set_epoch(s.epoch, s.micro_step)
        total = (len(self.loader) // accum) * accum
        self.bar = progress_bar(self.proc.rank, s.epoch, self.epochs, total // accum, s.micro_step // accum)
        batches = self.meter.timed(self.loader, total - s.micro_step, self.engine.module, self.precision)
        yield from batched(batches, accum, keep_short=False)

    def step(self, batches: list[dict]) -> None:
        """One optimizer step over `grad_accum` micro-batches; a non-finite one is never applied."""
        interrupts.check()  # (a Ctrl-C dropped since the last step stops the run here)
        engine, s = self.engine, self.state
        self.bn.save()
        skipped_before, dropped = engine.skipped_steps, False
        for batch in batches:
            batch = {k: v.to(self.proc.device, non_blocking=True) for k, v in batch.items()}
            out = engine(batch, step=s.global_step + 1)  # (ATS counts steps from 1, as the reference code)
            loss = total_loss(out)
            engine.backward(loss * self.proc.world)  # shares of a global-batch loss; the engine averages over ranks
            if engine.is_gradient_accumulation_boundary() and self.check_grads:
                dropped = drop_nonfinite_grads(engine.module, self.proc)
            engine.step()
            self.meter.add(out, loss)
        s.global_step += 1
        s.micro_step += len(batches)
        if dropped or engine.skipped_steps > skipped_before:
            self._skip()
        else:
            self.policy.applied()
            self.meter.commit()
        if self.bar is not None:
            self.bar.update(1)

    def _skip(self) -> None:
        """The update was dropped (by DeepSpeed, or by us): weights and optimizer state are those of
        the previous step; the BatchNorm statistics of the bad batch are undone. Count it, maybe stop."""
        self.bn.restore()
        record = self.policy.skipped(self.state, self.meter.discard())
        self.log.record("skipped", self.state.global_step, record)
        if self.policy.must_stop():
            raise self.policy.error(self.state, record["reason"], self.ckpt.save(self.state))

    def _log_window(self) -> None:
        s = self.state
        values = self.meter.read(epoch=s.epoch, lr=self.engine.get_lr()[0], skipped_steps=s.skipped_steps)
        if values is not None:
            self.log.record("train", s.global_step, values)
            total = self.cfg.train.max_steps or self.steps_per_epoch * self.epochs
            show_rate(self.bar, values, (total - s.global_step) * self.cfg.train.batch_size)

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.state.global_step >= self.cfg.train.max_steps

    def _end_epoch(self) -> bool:
        """Record the epoch, evaluate when due, checkpoint. False when training stops here (max_steps)."""
        s, t = self.state, self.cfg.train
        if self.bar is not None:
            self.bar.close()
        epoch, stop = s.epoch, self._max_steps_reached()
        if s.micro_step >= (len(self.loader) // t.grad_accum) * t.grad_accum:  # (else max_steps stopped mid-epoch)
            s.epoch, s.micro_step = epoch + 1, 0
        if self.proc.is_main and self.loader.stats:
            self.log.record("data", s.global_step, self.loader.stats)
        is_best, by_epoch = False, t.schedule == "epochs" and (epoch + 1) % self.cfg.eval.every == 0
        if by_epoch or epoch + 1 == self.epochs or stop:
            is_best = self.outcome.validate(self.engine.module, s, epoch)
        self.ckpt.save(s, is_best=is_best)
        return not stop

    def _interrupt(self) -> Interrupted:
        s = self.state
        tag = self.ckpt.save(s)
        self.log.info(f"stop requested: saved checkpoint {tag} at step {s.global_step} (epoch {s.epoch + 1}); "
                      "continue with train.resume=latest")
        self.log.record("interrupted", s.global_step, {"epoch": s.epoch, "checkpoint": tag})
        return Interrupted(str(self.run), s.global_step, tag)


# ----------------------------------------------------------------------------------- script


def main(argv: list[str] | None = None) -> int:
    """The command: exit 0 when trained, 2 on a usage or configuration mistake (an `error:` line, no
    traceback), 1 when training failed (the failure report says where, and how to continue), 130
    on Ctrl-C (after saying how to continue)."""
    p = argparse.ArgumentParser(
        prog="itself-train" if Path(sys.argv[0]).name == "itself-train" else "itself/train.py",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted config keys, e.g. train.epochs=5 model.selection=std_max "
               "model.mars_layers=[4,11] (values parsed as YAML); --help-config lists them all. Presets: "
               + ", ".join(PRESETS))
    p.add_argument("--preset", default="synthetic", help="named configuration (default: synthetic)")
    p.add_argument("--config", help="YAML file of config sections, applied after the preset")
    p.add_argument("--print-config", action="store_true", help="print the resolved, validated config and exit")
    p.add_argument("--help-config", action="store_true",
                   help="list every config field with its type, value (the preset's) and documentation")
    logs.add_arguments(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:  # (a diverged run is reported with how to go on: exit 1, not a bug's traceback)
        return exit_code(lambda: _run(args), failures=(NonFiniteError,))
    except KeyboardInterrupt:  # (the failure report above said where it stopped and how to continue)
        print("interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    from itself.dist import world_info_from_env

    logs.setup_from(args, world_info_from_env().rank)
    cfg = resolve_config(args.preset, args.config, args.overrides)
    if args.help_config:
        print(describe(cfg))
    elif args.print_config:
        cfg.validate(world_info_from_env().world_size)
        print(config_yaml(cfg), end="")
    else:
        train(cfg)
    return 0


def cli() -> None:
    """`itself-train` and `python itself/train.py`."""
    code = main()
    # Everything is written and closed: skip the interpreter's teardown, where a C++ thread of the
    # communication libraries was once seen to abort (SIGABRT) a finished 2-rank run under load.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()

"""Train and evaluate ITSELF with DeepSpeed: `deepspeed itself/train.py [--preset NAME] [key=value ...]`.

`train(cfg) -> dict` is a plain function (SLURM jobs and Ray Tune trials call it). The script
runs under `deepspeed` (one or many GPUs, a hostfile over nodes), `torchrun`, SLURM, or plain
`python` (a world of one). Each epoch it evaluates on val, keeps the best checkpoint by val
(the fusion weight and GRAB selection are chosen on val too), and at the end evaluates that
checkpoint on test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from itself.checkpoint import (COMPLETE, Checkpointer, TrainState, dataset_fingerprint, full_state_dict,
                               incomplete_tags, saved_state, saved_world_size)
from itself.config import Config, ConfigError, config_yaml, describe, to_dict
from itself.data import dataset_info, ensure_dataset, train_loader
from itself.dist import ensure_process_env, world_info_from_env
from itself.engine import (build_engine, checkpoint_bytes, deepspeed_config, resolve_device, resolve_precision,
                           share_cpu_threads, skip_shm_all_reduce)
from itself.errors import UserError
from itself.evaluate import choose, evaluate
from itself.losses import total_loss
from itself.metrics import fused_at
from itself.model import ITSELF
from itself.model.export import export
from itself.panels import pick, retrieval_panels
from itself.presets import PRESETS, resolve_config, resolve_references
from itself.rundir import EvalRecord, RunDir


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (train.nonfinite)."""


def train(cfg: Config, should_stop: Callable[[], bool] | None = None) -> dict:
    """Train, evaluate on val every `eval.every` epochs, keep the best by val, evaluate it on test.
    Returns {"run_dir", "best_epoch", "fusion_weight", "selection", "val": {...}, "test": {...}} on
    every rank.

    `should_stop` is polled at every log interval (`train.log_every` steps; a scheduler's
    pre-emption warning, say); when it is true on any rank, every rank saves a checkpoint at that
    step and train returns {"interrupted": True, "run_dir", "global_step", "checkpoint"};
    `train.resume=latest` continues."""
    where = ensure_process_env()
    resolve_references(cfg)
    cfg.validate(where.world_size)  # fail before any work
    device = resolve_device(cfg.train.device, where.local_rank)
    if device.type == "cpu":
        share_cpu_threads(where.world_size)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    # Every rank checks the data (one builds the synthetic set under a file lock, the others wait
    # for it) before joining the group, so no collective waits out a long build.
    ensure_dataset(cfg.data.root, cfg.data.build_synthetic)
    import deepspeed

    owns_group = not dist.is_initialized()
    if device.type == "cpu":
        skip_shm_all_reduce(deepspeed)
    if owns_group:
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False,
                                   timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    trainer = Trainer(cfg, dist.get_rank(), dist.get_world_size(), device, should_stop)
    try:
        trainer.setup()
        result = trainer.fit()
    except BaseException as e:  # a dead peer, a timeout, a full disk, an interrupt: say how to go on
        if not isinstance(e, ConfigError):
            trainer.report_failure(e)
        trainer.discard_if_empty()
        raise
    if owns_group:  # a clean exit: a live group aborts the process at interpreter shutdown
        dist.barrier()
        dist.destroy_process_group()
    return result


def _broadcast(obj, rank: int):
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is true on any (so all ranks act at the same step)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Trainer:
    """One training run: `setup()` builds the run directory, data, model and engine (or resumes
    them), `fit()` trains, evaluates and exports. The state that checkpoints carry is `state`."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device,
                 should_stop: Callable[[], bool] | None = None):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.precision = resolve_precision(cfg.train.precision, device)
        self.should_stop = should_stop
        self.state = TrainState()
        self.run: RunDir | None = None  # set once known: a failure report then says how to continue
        self.started = False  # True once the first step began (a failure report names the step)

    # -- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.run = self._run_dir()
        self.log = self.run.open_log(self.rank, t.report_to, to_dict(cfg), t.wandb_project)
        self.info = ensure_dataset(cfg.data.root)
        self.layout = cfg.layout(self.world)
        self.loader = train_loader(cfg.data, rank=self.rank, world_size=self.world,
                                   micro_batch=self.layout.micro_batch, seed=cfg.seed)
        self.loader.set_epoch(0)
        self.steps_per_epoch = len(self.loader) // t.grad_accum
        torch.manual_seed(cfg.seed)
        self.num_ids = self.loader.num_ids  # (a mixture: every dataset's train identities)
        model = ITSELF(cfg.model, self.num_ids, cfg.data.image_size, self.steps_per_epoch)
        model.speed_options(grad_checkpointing=t.grad_checkpointing, compile=t.compile)
        n_params = sum(p.numel() for p in model.parameters())
        problem = self.run.lacks_room(checkpoint_bytes(model, self.precision), n_params * 4, t.keep_last) \
            if self.rank == 0 else None
        if _broadcast(problem, self.rank):
            raise ConfigError(problem)
        ds_config = deepspeed_config(cfg, self.world, self.precision, self.device)
        self.engine = build_engine(model, cfg, ds_config, self.steps_per_epoch)
        self.ckpt = Checkpointer(self.engine, self.run.checkpoints, t.keep_last, self.rank, self.world)
        self.meter = StepMeter(self.world, self.device, self.layout.micro_batch * self.world)
        self.bn = BatchNormStats(self.engine.module)
        # Without ZeRO and bf16, DeepSpeed would apply non-finite gradients: the trainer drops them.
        self.check_grads = self.engine.zero_optimization_stage() == 0 and not self.engine.bfloat16_enabled()
        self.skips_in_a_row = 0
        dataset = dataset_fingerprint([dataset_info(root) for root in (cfg.data.root, *cfg.data.mix)])
        source = self._resume_source()
        if source is not None:
            self._check_resumable(source, model, dataset)
            saved = saved_world_size(source)
            self.state = self.ckpt.load(source)
            self.log.info(f"resumed from {source}: epoch {self.state.epoch + 1}, step {self.state.global_step}"
                          + (f" (written by {saved} rank(s), now {self.world})" if saved != self.world else ""))
        self.state.config, self.state.dataset = to_dict(cfg), dataset
        if self.rank == 0:  # (after a resume was found possible: a refused one leaves its run as it was)
            self.run.write_text(RunDir.CONFIG, config_yaml(cfg))
            self.run.write_text(RunDir.DEEPSPEED_CONFIG, json.dumps(ds_config, indent=2) + "\n")
        self.log.info(
            f"run {self.run} | {self.world} rank(s) on {self.device.type}, {self.precision} | {cfg.model.arch} "
            f"{n_params / 1e6:.1f}M params | {self.info['splits']['train']['captions']} train pairs, "
            f"{self.steps_per_epoch} steps/epoch x {t.epochs} epochs, batch {t.batch_size} "
            f"({self.layout.micro_batch}/rank)")

    def _run_dir(self) -> RunDir:
        """The run directory (rank 0 names it, every rank gets it), checked writable before any work."""
        path = self.cfg.run_dir or RunDir.default_path(self.cfg.name)
        new = not Path(path).exists()
        path, problem, self.new_run_dir = _broadcast(
            (path, RunDir(path).unwritable() if self.rank == 0 else None, new), self.rank)
        if problem:
            raise ConfigError(problem)
        run = RunDir(path)
        run.check_reuse(self.cfg.train.resume)
        return run

    def _check_resumable(self, source: Path, model, dataset: str) -> None:
        """A ConfigError, before anything is loaded or written, when the checkpoint cannot continue
        this run: a model of another shape, or other train data."""
        saved, shapes = saved_state(source)
        ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
        wrong = [f"{n} {shapes.get(n, 'absent')} -> {s}" for n, s in ours.items() if shapes.get(n) != s]
        buffers = dict(model.named_buffers())
        wrong += [f"{n} (not in this model)" for n in shapes if n not in ours and n not in buffers]
        if wrong:
            changed = _changed_fields(saved.config, to_dict(self.cfg))
            raise ConfigError(f"train.resume: {source} holds a model of another shape ({'; '.join(wrong[:3])}): the "
                              f"model config changed since it was written{' (' + changed + ')' if changed else ''}; "
                              "resume with the config it was trained with (the run's config.yaml) or start a new run")
        if saved.dataset and saved.dataset != dataset:
            raise ConfigError(f"train.resume: {source} was trained on other data than data.root={self.cfg.data.root}"
                              f"{' (+ data.mix)' if self.cfg.data.mix else ''} (other shards or identities); resume "
                              "with the data it was trained on, or start a new run")

    def _resume_source(self) -> Path | None:
        """The checkpoint to resume from, or None (half-written ones of this run reported and removed)."""
        source = self.run.resume_source(self.cfg.train.resume)
        if source is None:
            return None
        ours = source.parent == self.run.checkpoints
        for partial in incomplete_tags(source.parent):
            self.log.info(f"ignoring incomplete checkpoint {source.parent / partial} (no {COMPLETE} marker: "
                          "the run stopped while writing it)" + ("; removing it" if ours else ""))
        if ours and self.rank == 0:
            self.run.remove_incomplete()
        return source

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict:
        self.started = True
        while self.state.epoch < self.cfg.train.epochs:
            if not self.train_epoch():
                return self._interrupt()
            if not self._end_epoch():
                break
        return self._finish()

    def train_epoch(self) -> bool:
        """The steps left in the current epoch (up to train.max_steps); False when a stop was
        requested (the caller checkpoints)."""
        t, s = self.cfg.train, self.state
        for batches in self._steps_of_epoch():
            self.step(batches)
            if s.global_step % t.log_every == 0:  # the loop's one synchronisation point
                self._log_train()
                if self.should_stop is not None and _any_rank(self.should_stop(), self.device):
                    return False
            if t.checkpoint_every and s.global_step % t.checkpoint_every == 0:
                self.ckpt.save(s)
            if self._max_steps_reached():
                break
        return True

    def _steps_of_epoch(self):
        """The optimizer steps left in this epoch, each a list of `grad_accum` micro-batches."""
        s, accum = self.state, self.cfg.train.grad_accum
        self.loader.set_epoch(s.epoch, s.micro_step)
        self.micro_total = (len(self.loader) // accum) * accum
        self.bar = _progress(self.rank, s.epoch, self.cfg.train.epochs, self.micro_total // accum, s.micro_step // accum)
        group = []
        for i, batch in enumerate(self.loader, start=s.micro_step):
            if i >= self.micro_total:
                break
            group.append(batch)
            if len(group) == accum:
                yield group
                group = []

    def step(self, batches: list[dict]) -> None:
        """One optimizer step over `grad_accum` micro-batches; a non-finite one is never applied."""
        engine, s = self.engine, self.state
        self.bn.save()
        skipped_before, dropped = engine.skipped_steps, False
        for batch in batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            out = engine(batch, step=s.global_step + 1)  # (ATS counts steps from 1, as the reference code)
            loss = total_loss(out)
            engine.backward(loss * self.world)  # shares of a global-batch loss; the engine averages over ranks
            if engine.is_gradient_accumulation_boundary() and self.check_grads:
                dropped = _drop_nonfinite_grads(engine, self.device)
            engine.step()
            self.meter.add(out, loss)
        s.global_step += 1
        s.micro_step += len(batches)
        if dropped or engine.skipped_steps > skipped_before:
            self._skip()
        else:
            self.skips_in_a_row = 0
            self.meter.commit()
        if self.bar is not None:
            self.bar.update(1)

    def _skip(self) -> None:
        """The update was dropped (by DeepSpeed, or by us): weights and optimizer state are those of
        the previous step; the BatchNorm statistics of the bad batch are undone. Count it, maybe stop."""
        t, s = self.cfg.train, self.state
        self.bn.restore()
        losses = self.meter.discard()
        s.skipped_steps += 1
        self.skips_in_a_row += 1
        what = "non-finite loss" if any(not math.isfinite(v) for v in losses) else "non-finite gradients"
        self.log.info(f"step {s.global_step} (epoch {s.epoch + 1}): {what} (loss "
                      f"{', '.join(f'{v:.4g}' for v in losses)} on rank 0): update skipped "
                      f"({self.skips_in_a_row} in a row, {s.skipped_steps} in all)")
        self.log.record("skipped", s.global_step, {"epoch": s.epoch, "reason": what, "in_a_row": self.skips_in_a_row,
                                                   "skipped_steps": s.skipped_steps})
        too_many = t.max_skipped_steps and self.skips_in_a_row >= t.max_skipped_steps
        if t.nonfinite == "skip" and not too_many:
            return
        tag = self.ckpt.save(s)
        why = ("train.nonfinite=stop" if t.nonfinite == "stop"
               else f"{self.skips_in_a_row} skipped steps in a row reach train.max_skipped_steps={t.max_skipped_steps}")
        raise NonFiniteError(
            f"{what} at step {s.global_step} (epoch {s.epoch + 1}); stopping ({why}). Checkpoint {tag} holds the "
            "last finite weights (the update of this step was not applied). Lower train.lr, set train.grad_clip, "
            "or use train.nonfinite=skip, then continue with train.resume=latest")

    def _log_train(self) -> None:
        s, t = self.state, self.cfg.train
        values = self.meter.read()
        self.meter.restart()
        if values is None:
            return
        values.update(epoch=s.epoch, lr=self.engine.get_lr()[0], skipped_steps=s.skipped_steps)
        self.log.record("train", s.global_step, values)
        if self.bar is not None:
            rate = values["samples_per_s"]
            eta = (self._total_steps() - s.global_step) * t.batch_size / max(rate, 1e-9)
            self.bar.set_postfix(loss=f"{values['loss']:.3f}", samples_s=f"{rate:.0f}", eta=_hms(eta), refresh=False)

    def _total_steps(self) -> int:
        return self.cfg.train.max_steps or self.steps_per_epoch * self.cfg.train.epochs

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.state.global_step >= self.cfg.train.max_steps

    def _end_epoch(self) -> bool:
        """Record the epoch, evaluate when due, checkpoint. False when training stops here (max_steps)."""
        s, t = self.state, self.cfg.train
        if self.bar is not None:
            self.bar.close()
        epoch, finished = s.epoch, s.micro_step >= self.micro_total
        stop = self._max_steps_reached()
        if finished:  # (else max_steps stopped it mid-epoch: a resume continues there)
            s.epoch, s.micro_step = epoch + 1, 0
        if self.rank == 0 and self.loader.stats:
            self.log.record("data", s.global_step, self.loader.stats)
        is_best = False
        if (epoch + 1) % self.cfg.eval.every == 0 or epoch + 1 == t.epochs or stop:
            is_best = self._validate(epoch)
        self.ckpt.save(s, is_best=is_best)
        return not stop

    def _interrupt(self) -> dict:
        s = self.state
        tag = self.ckpt.save(s)
        self.log.info(f"stop requested: saved checkpoint {tag} at step {s.global_step} (epoch {s.epoch + 1}); "
                      "continue with train.resume=latest")
        self.log.record("interrupted", s.global_step, {"epoch": s.epoch, "checkpoint": tag})
        self.log.close()
        return {"interrupted": True, "run_dir": str(self.run), "global_step": s.global_step, "checkpoint": tag}

    # -- evaluation and the end -------------------------------------------------------------------

    def _validate(self, epoch: int) -> bool:
        """Evaluate on val, choose the GRAB selection and fusion weight there; True (on every rank)
        if this is the best evaluation so far."""
        s = self.state
        panels = self.cfg.eval.panels if self.cfg.train.report_to != "none" else 0
        results = evaluate(self.engine.module, self.cfg, "val", self.rank, self.world, self.device,
                           keep_embeddings=bool(panels))
        best = picked = None
        if self.rank == 0:
            choice = choose(results)
            if panels:
                picked = pick(*results.pop("embeddings"), choice.selection, choice.fusion_weight, panels)
            record = EvalRecord("val", epoch, s.global_step, choice.fusion_weight, choice.metrics, choice.selection,
                                choice.candidates, results["counts"])
            self.log.record_eval(record)
            is_best = s.best_score is None or choice.score > tuple(s.best_score)
            fused = record.fused
            skipped = results["counts"]["gallery_skipped"]
            self.log.info(f"epoch {epoch + 1}: val R@1 {fused['R1']:.2f} mAP {fused['mAP']:.2f} (fused a="
                          f"{choice.fusion_weight:g}, {choice.selection}; global R@1 {record.metrics['global']['R1']:.2f})"
                          + ("  * best" if is_best else "")
                          + (f"  ({skipped} corrupt gallery images skipped)" if skipped else ""))
            if is_best:
                best = dict(best_score=list(choice.score), best_epoch=epoch + 1, fusion_weight=choice.fusion_weight,
                            selection=choice.selection, best_val=record.to_record())
        if panels:
            self._log_panels(_broadcast(picked, self.rank))
        best = _broadcast(best, self.rank)
        if best:
            for k, v in best.items():
                setattr(s, k, v)
        return best is not None

    def _log_panels(self, picked: list[dict]) -> None:
        """Every rank renders (MARS runs the model: collective under ZeRO-3), rank 0 logs."""
        images = retrieval_panels(self.engine.module, self.cfg.data.root, "val", picked, tuple(self.cfg.data.image_size))
        self.log.images("val/retrievals", self.state.global_step, [im for im, _ in images], [c for _, c in images])

    def _finish(self) -> dict:
        s, run = self.state, self.run
        best = run.best_checkpoint()
        self.ckpt.load(best)  # optimizer state too: under bf16 it holds the fp32 master weights that model.pt gets
        tests = {root: evaluate(self.engine.module, self.cfg, "test", self.rank, self.world, self.device,
                                selections=(s.selection,), root=root)
                 for root in (self.cfg.data.root, *self.cfg.eval.test_roots)}
        weights = full_state_dict(self.engine)
        summary = None
        if self.rank == 0:
            results, a = tests.pop(self.cfg.data.root), s.fusion_weight
            metrics = results["selections"][s.selection]
            test, val = _branches(metrics, a), EvalRecord.from_record(s.best_val)
            others = {root: {"metrics": _branches(r["selections"][s.selection], a), "counts": r["counts"]}
                      for root, r in tests.items()}
            self.log.record_eval(EvalRecord("test", val.epoch, s.global_step, a, metrics, s.selection,
                                            counts=results["counts"]), kind="test")
            model_path = run.file(RunDir.MODEL)
            export(model_path, weights, to_dict(self.cfg), self.num_ids, a, metrics=test, selection=s.selection)
            summary = {"run_dir": str(run), "best_epoch": s.best_epoch, "checkpoint": best.name,
                       "fusion_weight": a, "selection": s.selection, "selection_candidates": val.candidates,
                       "val": _branches(val.metrics, a), "test": test, "test_counts": results["counts"],
                       "test_chance_R1": chance_r1(self.info, "test"), "test_datasets": others,
                       "model": str(model_path)}
            run.write_text(RunDir.RESULTS, json.dumps(summary, indent=2) + "\n")
            rows = {**{f"val {k}": v for k, v in summary["val"].items()}, **{f"test {k}": v for k, v in test.items()},
                    **{f"{Path(root).name} test {k}": v for root, o in others.items() for k, v in o["metrics"].items()}}
            self.log.info(f"results (best val epoch {s.best_epoch}, checkpoint {best.name}, fusion weight a={a:g} and "
                          f"selection {s.selection} chosen on val):\n{results_table(rows)}")
            self.log.info(f"test R@1 chance level: {summary['test_chance_R1']:.2f}")
            logs = {"tensorboard": ", tensorboard/", "wandb": ", wandb/"}.get(self.cfg.train.report_to, "")
            self.log.info(f"written: {run}/ (model.pt, model.safetensors, config.json, results.json, metrics.jsonl, "
                          f"train.log, config.yaml, deepspeed_config.json{logs}, checkpoints/)")
        self.log.close()
        return _broadcast(summary, self.rank)

    # -- failures ---------------------------------------------------------------------------------

    def discard_if_empty(self) -> None:
        """A run that failed before its first step, in a run directory it created, leaves nothing
        behind (its error is on stderr): no empty run folders to confuse the next run."""
        if self.started or self.run is None or not getattr(self, "new_run_dir", False) or self.rank != 0:
            return
        if getattr(self, "log", None) is not None:
            self.log.close()
        if self.run.latest_checkpoint() is None:
            shutil.rmtree(self.run.path, ignore_errors=True)

    def report_failure(self, error: BaseException) -> None:
        """Tell the user, from every rank that fails, where training stopped and how to continue."""
        s, run = self.state, self.run
        where = f"at step {s.global_step} (epoch {s.epoch + 1})" if self.started else "during setup"
        msg = f"[rank {self.rank}] training failed {where}: {type(error).__name__}: {error}"
        if run is not None:
            latest = run.latest_checkpoint()
            msg += (f"\n[rank {self.rank}] to continue, rerun the same command with run_dir={run} train.resume=latest "
                    f"(newest complete checkpoint: {latest.name})" if latest else
                    f"\n[rank {self.rank}] no complete checkpoint in {run.checkpoints} yet: rerun from the start")
        print(msg, file=sys.stderr, flush=True)
        if run is not None and self.rank == 0:  # (train.log is rank 0's; the others' go to their own stderr)
            try:
                with open(run.file(RunDir.LOG), "a") as f:
                    f.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
            except OSError:
                pass


class StepMeter:
    """Per-step losses and report values, kept on the device and summed over a log window: read
    (one host synchronisation, one all-reduce) only at the log interval."""

    def __init__(self, world: int, device: torch.device, pairs_per_micro_step: int):
        self.world, self.device, self.pairs_per_micro_step = world, device, pairs_per_micro_step
        self.current: dict[str, torch.Tensor] = {}  # the step in progress: sums over its micro-batches
        self.current_losses: list[torch.Tensor] = []
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_steps, self.started = 0, time.time()

    def add(self, out: dict, loss: torch.Tensor) -> None:
        for k, v in {**out, "loss": loss}.items():
            v = (v.detach() if torch.is_tensor(v) else torch.tensor(float(v))).to(self.device, torch.float64)
            self.current[k] = self.current[k] + v if k in self.current else v
        self.current_losses.append(loss.detach())

    def commit(self) -> None:
        """The step was applied: its values join the window."""
        for k, v in self.current.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.micro_steps += len(self.current_losses)
        self.current, self.current_losses = {}, []

    def discard(self) -> list[float]:
        """The step was skipped: its values leave the window. Returns its losses (this rank's, one per
        micro-batch) for the report."""
        losses = [float(v) for v in self.current_losses]
        self.current, self.current_losses = {}, []
        return losses

    def read(self) -> dict | None:
        """Means per micro-batch over the window's applied steps, loss shares summed over ranks and
        the other report values (k_image, k_text) as on this rank, and the pairs per second; None
        when every step of the window was skipped (all ranks skip the same steps)."""
        if not self.micro_steps:
            return None
        keys = sorted(self.sums)
        local = torch.stack([self.sums[k] for k in keys]) / self.micro_steps
        total = local.clone()
        if self.world > 1:
            dist.all_reduce(total)
        total, local = total.tolist(), local.tolist()
        values = {k: (total[i] if k.endswith("loss") else local[i]) for i, k in enumerate(keys)}
        pairs = self.micro_steps * self.pairs_per_micro_step
        return values | {"samples_per_s": pairs / max(time.time() - self.started, 1e-9)}


class BatchNormStats:
    """The running statistics of the model's BatchNorm layers, copied before a step so that a
    skipped step can undo what its batch changed (into preallocated buffers: no allocation per step)."""

    def __init__(self, module: torch.nn.Module):
        self.buffers = [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        for b, s in zip(self.buffers, self.saved):
            s.copy_(b)

    def restore(self) -> None:
        with torch.no_grad():
            for b, s in zip(self.buffers, self.saved):
                b.copy_(s)


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


def _changed_fields(old: dict | None, new: dict) -> str:
    """`section.field: old -> new` of the config fields that differ (model and data only)."""
    if not old:
        return ""
    changes = [f"{s}.{k}: {old[s].get(k)!r} -> {v!r}" for s in ("model", "data") for k, v in new[s].items()
               if s in old and old[s].get(k) != v]
    return ", ".join(changes[:4])


def _branches(metrics: dict, a: float) -> dict:
    """{"global", "grab", "fused"} rows of a selection's results at fusion weight a."""
    return {"global": metrics["global"], **({"grab": metrics["grab"], "fused": fused_at(metrics, a)}
                                           if "grab" in metrics else {})}


def results_table(rows: dict[str, dict]) -> str:
    lines = [f"{'':<22} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'mAP':>7} {'mINP':>7}"]
    for name, m in rows.items():
        lines.append(f"{name:<22} {m['R1']:>7.2f} {m['R5']:>7.2f} {m['R10']:>7.2f} {m['mAP']:>7.2f} {m['mINP']:>7.2f}")
    return "\n".join(lines)


def chance_r1(info: dict, split: str) -> float:
    """R@1 of a random ranking: the share of the gallery that matches a query, about 1 / identities."""
    return 100.0 / info["splits"][split]["identities"]


def _progress(rank: int, epoch: int, epochs: int, total: int, initial: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                dynamic_ncols=True, mininterval=1.0)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------- script


def main(argv: list[str] | None = None) -> int:
    """The command: exit 0 when trained, 2 on a usage or configuration mistake (an `error:` line, no
    traceback), 1 when training failed (the failure report says where, and how to continue)."""
    p = argparse.ArgumentParser(
        prog="itself-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted config keys, e.g. train.epochs=5 model.selection=std_max "
               "model.mars_layers=[4,11] (values parsed as YAML); --help-config lists them all. Presets: "
               + ", ".join(PRESETS))
    p.add_argument("--preset", default="synthetic", help="named configuration (default: synthetic)")
    p.add_argument("--config", help="YAML file of config sections, applied after the preset")
    p.add_argument("--print-config", action="store_true", help="print the resolved, validated config and exit")
    p.add_argument("--help-config", action="store_true",
                   help="list every config field with its type, value (the preset's) and documentation")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        cfg = resolve_config(args.preset, args.config, args.overrides)
        if args.help_config:
            print(describe(cfg))
            return 0
        if args.print_config:
            cfg.validate(world_info_from_env().world_size)
            print(config_yaml(cfg), end="")
            return 0
        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # (reported with how to go on: a diverged run, not a bug)
        print(f"error: {e}", file=sys.stderr)
        return 1
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

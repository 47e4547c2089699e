"""Where a run continues from, whether it can, and how to tell the user to continue a failed one.

The decision itself (`train.resume`: "", `latest`, `auto`, a folder) is `RunDir.resume_source`;
launch/ and tune/ pass `auto` or a folder and never decide on their own.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from .checkpoint import TrainState, dataset_fingerprint, saved_state, saved_world_size
from .filenames import COMPLETE, incomplete_tags
from .config import Config, ConfigError, to_dict
from .rundir import RunDir
from .safeio import UnsafePath, open_append

log = logging.getLogger(__name__)


def resume_point(run: RunDir, cfg: Config, is_main: bool) -> Path | None:
    """The checkpoint `train.resume` names for this run, or None to start; half-written checkpoints
    of this run are reported and (by rank 0) removed."""
    source = run.resume_source(cfg.train.resume)
    if source is None:
        return None
    ours = source.parent == run.checkpoints
    for partial in incomplete_tags(source.parent):
        log.info(f"ignoring incomplete checkpoint {source.parent / partial} (no {COMPLETE} marker: the run stopped "
                 "while writing it)" + ("; removing it" if ours else ""))
    if ours and is_main:
        run.remove_incomplete()
    return source


def restore(run: RunDir, cfg: Config, proc, ckpt, model) -> TrainState:
    """The training state to start from: the checkpoint `train.resume` names loaded into the engine
    (after checking it can continue this run), or a fresh state; either records the config and data."""
    from .data.catalog import dataset_info

    dataset = dataset_fingerprint([dataset_info(root) for root in (cfg.data.root, *cfg.data.mix)])
    state, source = TrainState(), resume_point(run, cfg, proc.is_main)
    if source is not None:
        check_resumable(source, model, cfg, dataset)
        saved = saved_world_size(source)
        state = ckpt.load(source)
        log.info(f"resumed from {source}: epoch {state.epoch + 1}, step {state.global_step}"
                 + (f" (written by {saved} rank(s), now {proc.world})" if saved != proc.world else ""))
    state.config, state.dataset = to_dict(cfg), dataset
    return state


def check_resumable(source: Path, model, cfg: Config, dataset: str) -> None:
    """A ConfigError, before anything is loaded or written, when the checkpoint cannot continue
    this run: a model of another shape, or other train data."""
    saved, shapes = saved_state(source)
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    wrong = [f"{n} {shapes.get(n, 'absent')} -> {s}" for n, s in ours.items() if shapes.get(n) != s]
    buffers = dict(model.named_buffers())
    wrong += [f"{n} (not in this model)" for n in shapes if n not in ours and n not in buffers]
    if wrong:
        changed = changed_fields(saved.config, to_dict(cfg))
        raise ConfigError(f"train.resume: {source} holds a model of another shape ({'; '.join(wrong[:3])}): the "
                          f"model config changed since it was written{' (' + changed + ')' if changed else ''}; "
                          "resume with the config it was trained with (the run's config.yaml) or start a new run")
    if saved.dataset and saved.dataset != dataset:
        raise ConfigError(f"train.resume: {source} was trained on other data than data.root={cfg.data.root}"
                          f"{' (+ data.mix)' if cfg.data.mix else ''} (other shards or identities); resume "
                          "with the data it was trained on, or start a new run")


def changed_fields(old: dict | None, new: dict) -> str:
    """`section.field: old -> new` of the config fields that differ (model and data only)."""
    if not old:
        return ""
    changes = [f"{s}.{k}: {old[s].get(k)!r} -> {v!r}" for s in ("model", "data") for k, v in new[s].items()
               if s in old and old[s].get(k) != v]
    return ", ".join(changes[:4])


def report_failure(error: BaseException, rank: int, run: RunDir | None, where: str) -> None:
    """Tell the user, from every rank that fails, where training stopped (`where`) and how to continue."""
    msg = f"[rank {rank}] training failed {where}: {type(error).__name__}: {error}"
    if run is not None:
        latest = run.latest_checkpoint()
        msg += (f"\n[rank {rank}] to continue, rerun the same command with run_dir={run} train.resume=latest "
                f"(newest complete checkpoint: {latest.name})" if latest else
                f"\n[rank {rank}] no complete checkpoint in {run.checkpoints} yet: rerun from the start")
    print(msg, file=sys.stderr, flush=True)
    if run is not None and rank == 0:  # (train.log is rank 0's; the others' go to their own stderr)
        try:
            with open_append(run.file(RunDir.LOG), "run_dir") as f:
                f.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
        except (OSError, UnsafePath):  # (no log to add it to: it is on stderr)
            pass


def discard_empty_run(run: RunDir) -> None:
    """A run that failed before its first step, in a run directory it created, leaves nothing
    behind (its error is on stderr): no empty run folders to confuse the next run."""
    if run.latest_checkpoint() is None:
        shutil.rmtree(run.path, ignore_errors=True)

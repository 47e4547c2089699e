"""The run directory: every file a training run writes, and the one place that knows their names
and formats (the names the writers share, torch-free, are in itself.filenames). The trainer writes through it; SLURM jobs, Tune trials and the retrieval tools read
through it.

    config.yaml            the resolved config (runs again as --config)
    deepspeed_config.json  the resolved DeepSpeed dict
    train.log              the text log
    metrics.jsonl          one JSON record per line: train (losses, lr, samples/s, step time, MFU,
                           memory), data, eval, test, ...
    tensorboard/           TensorBoard events;  wandb/  the W&B run (unless WANDB_DIR says elsewhere)
    checkpoints/           stepNNNNNNNN/ (COMPLETE-marked), latest, best   (see itself.filenames)
    model.pt               the exported model (see itself.model.export), and the same as
    model.safetensors      weights, with
    config.json            the rest of model.pt
    results.json           the final summary: val (best epoch) and test metrics (itself.records.Results)
    .itself-run.lock       held while a training writes here: one writer per run directory
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from shards.locking import FolderLock, LockBusy, LockUnavailable
from shards.ownership import not_yours

from . import filenames
from .errors import ConfigError
from .logs import add_file, remove
from .paths import Folder
from .records import EvalRecord, Results
from .safeio import UnsafePath, open_append, write_atomic

log = logging.getLogger(__name__)
__all__ = ["EvalRecord", "RunDir", "RunLog", "timestamped"]


def timestamped(name: str) -> str:
    """`<name>-YYYYmmdd-HHMMSS`: the folder name of a new run, job or search."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir(Folder):
    """The files of one training run (see the module docstring)."""

    CONFIG = "config.yaml"
    DEEPSPEED_CONFIG = "deepspeed_config.json"
    LOG = "train.log"
    METRICS = "metrics.jsonl"
    TENSORBOARD = "tensorboard"
    CHECKPOINTS = "checkpoints"
    MODEL = "model.pt"
    WEIGHTS, EXPORT_CONFIG = filenames.WEIGHTS, filenames.EXPORT_CONFIG  # (model.pt's companions)
    RESULTS = Results.FILE
    WANDB = "wandb"
    LOCK = ".itself-run.lock"
    OWN = (CONFIG, DEEPSPEED_CONFIG, LOG, METRICS, TENSORBOARD, CHECKPOINTS, MODEL, WEIGHTS, EXPORT_CONFIG, RESULTS,
           WANDB, LOCK)
    """The names a run writes here (`check_owned`)."""

    @staticmethod
    def default_path(name: str) -> str:
        return f"runs/{timestamped(name)}"

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    # -- checkpoints ---------------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        tag = filenames.latest_tag(self.checkpoints)
        return self.checkpoints / tag if tag else None

    def best_checkpoint(self) -> Path | None:
        """The checkpoint chosen on val (the newest complete one when none was chosen yet)."""
        tag = filenames.read_pointer(self.checkpoints, "best")
        return self.checkpoints / tag if tag else self.latest_checkpoint()

    def check_reuse(self, resume: str) -> None:
        """A ConfigError when this folder already holds checkpoints and the run does not continue
        them: a new run must never silently mix with (or continue) an old one."""
        if not resume and self.latest_checkpoint() is not None:
            raise ConfigError(f"run_dir: {self.path} already holds checkpoints; pass train.resume=latest to "
                              "continue that run, or choose another run_dir")

    def resume_source(self, resume: str) -> Path | None:
        """The one resume decision: the checkpoint folder `train.resume` names (`latest` of this
        run, `auto`: latest if any, or a folder), or None to start from the beginning."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest_checkpoint()
        if resume == "latest":
            found = self.latest_checkpoint()
            if found is None:
                raise ConfigError(f"train.resume=latest: no complete checkpoint in {self.checkpoints}")
            return found
        path = Path(resume)
        if not filenames.is_complete(path.parent, path.name):
            raise ConfigError(f"train.resume: {path} is not a complete checkpoint directory")
        return path

    def remove_incomplete(self) -> list[str]:
        """Delete checkpoint folders a stopped run left half-written; returns their names."""
        names = filenames.incomplete_tags(self.checkpoints)
        for name in names:
            shutil.rmtree(self.checkpoints / name, ignore_errors=True)
        return names

    # -- preflight -------------------------------------------------------------------------------

    def unwritable(self) -> str | None:
        """Why files cannot be written here (a read-only or full file system, a file in the way, no
        permission), or None: found now rather than at the first checkpoint."""
        probe = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # (a new file of a random name, O_EXCL: a link planted at a predictable name is never followed)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.path)
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            return f"run_dir: cannot write to {self.path}: {e.strerror or e}; choose a writable run_dir"
        finally:
            if probe is not None:
                try:
                    Path(probe).unlink(missing_ok=True)
                except OSError:
                    pass
        return None

    def check_owned(self) -> None:
        """UnsafePath unless this run folder is the user's own: the folder (and those of it the run
        writes into: checkpoints/ and each checkpoint, tensorboard/, wandb/) owned by the user and
        writable by no one else, and every entry at a name the run writes owned by the user. A
        folder someone else made or can change could hold, or later get, a link at a name the run
        writes: the run (maybe as root) would append to, replace or delete what it points at. The
        user's own links (checkpoints/ on a bigger disk) are theirs to make."""
        folders = [self.path] + [self.file(name) for name in (self.CHECKPOINTS, self.TENSORBOARD, self.WANDB)]
        if self.checkpoints.is_dir():
            folders += [p for p in self.checkpoints.iterdir() if p.is_dir() and not p.is_symlink()]
        for folder in folders:
            for st in (_lstat(folder), _stat(folder)):
                why = not_yours(st) if st is not None else None
                if why:
                    raise UnsafePath(f"run_dir: {folder} {why}: a run writes only into folders of your own that no "
                                     f"one else can change (`chmod o-w {folder}` if it is yours), or choose another "
                                     "run_dir")
        entries = [self.file(name) for name in self.OWN]
        entries += [p for folder in folders[1:] if _is_dir(folder) for p in folder.iterdir()]
        for path in entries:
            st = _lstat(path)
            why = not_yours(st, owner_only=True) if st is not None else None
            if why:
                raise UnsafePath(f"run_dir: {path} {why}; the files of a run folder are the run's own: choose another "
                                 "run_dir")

    def check_room(self, checkpoint_bytes: int, model_bytes: int, keep_last: int) -> None:
        """A ConfigError when this folder cannot hold the run's checkpoints (the last `keep_last`, the
        best, the one being written) and the exported model."""
        need = checkpoint_bytes * (keep_last + 2) + model_bytes
        # A resumed run's checkpoints are already there, and give their room to the new ones.
        held = sum(f.stat().st_size for f in self.checkpoints.rglob("*") if f.is_file())
        free = shutil.disk_usage(self.path).free
        if free + held >= need:
            return
        mib = 2 ** 20
        raise ConfigError(f"run_dir: {self.path} has {free / mib:.1f} MiB free"
                f"{f' (+{held / mib:.1f} MiB of checkpoints)' if held else ''}, but this run needs about "
                f"{need / mib:.1f} MiB ({keep_last + 2} checkpoints of {checkpoint_bytes / mib:.1f} MiB: "
                f"train.keep_last={keep_last}, the best, the one being written; and {self.MODEL}). Free space, "
                "lower train.keep_last, or choose another run_dir")

    # -- records ---------------------------------------------------------------------------------

    def read_records(self, offset: int = 0) -> tuple[list[dict], int]:
        """The complete metrics.jsonl records from byte `offset` on, and the offset after them (a
        line still being written is left for the next call)."""
        path = self.file(self.METRICS)
        if not path.exists():
            return [], offset
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)

    def records(self, kind: str | None = None) -> list[dict]:
        return [r for r in self.read_records()[0] if kind is None or r["type"] == kind]

    def evals(self, split: str = "val") -> list[EvalRecord]:
        return [EvalRecord.from_record(r) for r in self.records("eval") if r["split"] == split]

    def results(self) -> Results:
        return Results.read(self.file(self.RESULTS))

    def config(self) -> dict | None:
        """The run's config.yaml as a dict, or None when there is none (a run that never started)."""
        from .config import load_yaml

        path = self.file(self.CONFIG)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
        values = load_yaml(text, str(path))
        return values if isinstance(values, dict) else None

    # -- one writer ----------------------------------------------------------------------------------

    def claim(self) -> FolderLock:
        """Check that this folder can be written and take it for one training (see `lock`)."""
        problem = self.unwritable()
        if problem:
            raise ConfigError(problem)
        self.check_owned()
        return self.lock()

    def lock(self) -> FolderLock:
        """Take this run directory for one training (held until released or the process ends): a
        second training into it is refused at once, naming the first (host, pid, command)."""
        try:
            return FolderLock(self.file(self.LOCK)).acquire(
                f"run_dir {self.path}", "wait for it to finish, or choose another run_dir")
        except (LockBusy, LockUnavailable) as e:
            raise ConfigError(str(e)) from None

    # -- writing -----------------------------------------------------------------------------------

    def write_text(self, name: str, text: str) -> Path:
        """Write the file `name` whole (a new file renamed over it: a link there is replaced, not followed)."""
        path = self.file(name)
        write_atomic(path, text)
        return path

    def write_configs(self, config_yaml: str, deepspeed_config: dict) -> None:
        """config.yaml (runs again as --config) and the resolved deepspeed_config.json."""
        self.write_text(self.CONFIG, config_yaml)
        self.write_text(self.DEEPSPEED_CONFIG, json.dumps(deepspeed_config, indent=2) + "\n")

    def open_log(self, rank: int, report_to: str = "tensorboard", config: dict | None = None,
                 project: str = "itself") -> "RunLog":
        return RunLog(self, rank, report_to, config, project)

    def wandb_id(self) -> str:
        """The W&B run id of this run directory: the same for a resumed run, so its charts continue."""
        import hashlib

        return hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:16]


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _is_dir(path: Path) -> bool:
    st = _stat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # (a broken link: nothing there to write into)
        return None


class RunLog:
    """Rank 0's text log (train.log: the project's log records, as on the console), metrics.jsonl,
    and TensorBoard events or a Weights & Biases run (`report_to`); silent on the other ranks."""

    def __init__(self, run: RunDir, rank: int, report_to: str = "tensorboard", config: dict | None = None,
                 project: str = "itself"):
        self.active = rank == 0
        self.tb = self.wandb = self.text = None
        if not self.active:
            return
        run.path.mkdir(parents=True, exist_ok=True)
        try:
            self.text = add_file(open_append(run.file(RunDir.LOG), "run_dir"))
            self.jsonl = open_append(run.file(RunDir.METRICS), "run_dir")
        except OSError as e:  # (a folder in the way, no permission: the run cannot log, so it does not start)
            if self.text is not None:
                remove(self.text)
            raise ConfigError(f"run_dir: cannot write {e.filename}: {e.strerror or e}; choose another run_dir") from None
        if report_to == "tensorboard":
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run.file(RunDir.TENSORBOARD)))
        elif report_to == "wandb":  # (offline with WANDB_MODE=offline: written under the run directory)
            import wandb

            # The user's WANDB_DIR wins (W&B's own variable); else the run directory holds it.
            self.wandb = wandb.init(project=project, name=run.path.name, dir=os.environ.get("WANDB_DIR") or
                                    str(run.path), config=config or {}, id=run.wandb_id(), resume="allow")

    def info(self, msg: str, *args) -> None:
        """A line of the run's story: on the console and in train.log (rank 0)."""
        log.info(msg, *args)

    def warning(self, msg: str, *args) -> None:
        log.warning(msg, *args)

    def record(self, kind: str, step: int, values: dict) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"type": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()
        scalars = {f"{kind}/{k}": v for k, v in _flatten(values).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def images(self, tag: str, step: int, images: list, captions: list[str]) -> None:
        """PIL images (e.g. queries with their retrievals) to TensorBoard or W&B."""
        if not self.active or not images:
            return
        if self.tb is not None:
            import numpy as np

            for i, image in enumerate(images):
                self.tb.add_image(f"{tag}/{i}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)

    def record_eval(self, record: EvalRecord, kind: str = "eval") -> None:
        values = record.to_record()
        self.record(kind, values.pop("step"), values)

    def close(self) -> None:
        if self.active and self.text is not None:
            remove(self.text)
            self.text = None
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out

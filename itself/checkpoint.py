"""DeepSpeed checkpoints that are never taken half-written, pruned to the last K plus the best,
and the training state they carry (the folder layout and its names: `itself.filenames`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .filenames import COMPLETE, complete_tags, is_complete, read_pointer, tag_for
from .records import EvalRecord
from .safeio import UnsafeCheckpointError, fsync_dir, read_regular, safe_load, write_atomic

log = logging.getLogger(__name__)

@dataclasses.dataclass
class TrainState:
    """Where training stands; checkpoints persist it, so a resumed run continues exactly."""

    epoch: int = 0
    """The epoch in progress (0-based); after an epoch's last step, the next one."""
    micro_step: int = 0
    """Micro-batches of `epoch` already trained (a mid-epoch checkpoint resumes after them)."""
    global_step: int = 0
    """Optimizer steps taken (skipped ones included: they consumed their data)."""
    skipped_steps: int = 0
    """Steps whose update was dropped (non-finite loss or gradients)."""
    best: EvalRecord | None = None
    """The best val evaluation so far (its weight, selection and metrics), or None."""
    init_from: dict | None = None
    """Where the weights started (`model.init_from`: path, sha256, what was loaded), or None."""
    zero_shot: dict | None = None
    """With init_from: test metrics of the initial weights, measured before the first step."""
    config: dict | None = None
    """The run's resolved config when the checkpoint was written (a resume compares)."""
    dataset: str = ""
    """A fingerprint of the train data (`dataset_fingerprint`): a resume on other data is refused."""

    @property
    def best_epoch(self) -> int | None:
        """1-based epoch of the best evaluation."""
        return self.best.epoch + 1 if self.best else None

    @property
    def fusion_weight(self) -> float:
        return self.best.fusion_weight if self.best else 1.0

    @property
    def selection(self) -> str:
        return self.best.selection if self.best else "train"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        """From a checkpoint's client state; checkpoints written before the typed `best` kept it as
        `best_val` (a record) beside its parts: read either."""
        names = {f.name for f in dataclasses.fields(cls)} - {"best"}
        state = cls(**{k: v for k, v in values.items() if k in names})
        best = values.get("best") or values.get("best_val")
        state.best = EvalRecord.from_record(best) if isinstance(best, dict) else None
        return state


def rng_state() -> dict:
    """This process's random state as tensors and plain values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and restores one run's DeepSpeed checkpoints in `ckpt_dir`, bound once to the engine.

    Every rank calls `save` at the same step: each writes its part, then rank 0 marks the folder
    COMPLETE, moves `latest` (and `best`) and prunes all but the last `keep_last` and the best."""

    def __init__(self, engine, ckpt_dir: str | os.PathLike, keep_last: int, proc):
        self.engine, self.dir, self.keep_last, self.proc = engine, Path(ckpt_dir), keep_last, proc
        self.rank, self.world = proc.rank, proc.world

    def save(self, state: TrainState, is_best: bool = False) -> str:
        tag = tag_for(state.global_step)
        folder = self.dir / tag
        if self.rank == 0 and folder.exists():  # a leftover of this step (a resumed run redoing it)
            (folder / COMPLETE).unlink(missing_ok=True)  # unmark first: never complete while rewritten
            shutil.rmtree(folder)
        self.proc.barrier()
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=state.to_dict(), save_latest=False)
        torch.save(rng_state(), folder / f"rng_rank{self.rank}.pt")
        _fsync_tree(folder)  # every rank, for what it wrote (on NFS only the writer's fsync counts)
        self.proc.barrier()
        if self.rank == 0:  # durable before it is marked complete; the marker lists every file's size
            write_atomic(folder / COMPLETE, json.dumps(_file_sizes(folder), indent=0))
            write_atomic(self.dir / "latest", tag)
            if is_best:
                write_atomic(self.dir / "best", tag)
            self._prune(tag)
        self.proc.barrier()
        return tag

    def _prune(self, newest: str) -> None:
        done = sorted(p.name for p in self.dir.glob("step*") if is_complete(self.dir, p.name))
        keep = {newest, read_pointer(self.dir, "best"), *done[-self.keep_last:]}
        for name in done:
            if name not in keep:
                shutil.rmtree(self.dir / name, ignore_errors=True)

    def load(self, folder: str | os.PathLike, *, weights_only: bool = False) -> TrainState:
        """Restore the checkpoint `folder` (a complete one, of this run or another) into the engine and
        this rank's random state; returns the training state it holds. A ZeRO 1-3 checkpoint written
        by another number of ranks is loaded through its universal copy (rank 0 makes it)."""
        folder = Path(folder)
        if not is_complete(folder.parent, folder.name):
            raise FileNotFoundError(f"checkpoint {folder} is missing or incomplete (no {COMPLETE} marker)")
        check_safe(folder)
        verify_files(folder)
        universal = self.engine.zero_optimization_stage() > 0 and saved_world_size(folder) != self.world
        if universal:
            folder = Path(self.proc.decide(lambda: str(to_universal(folder, self.dir))))
        # (DeepSpeed reads this flag when loading only: set it for this checkpoint's kind)
        self.engine._config.load_universal_checkpoint = universal
        _, client = self.engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                                load_optimizer_states=not weights_only,
                                                load_lr_scheduler_states=not weights_only,
                                                load_module_only=weights_only)
        if universal:  # DeepSpeed restores the parameters from the universal files, not the buffers
            self._restore_buffers(folder)
        rng_file = folder / f"rng_rank{self.rank}.pt"
        if not weights_only and rng_file.exists():
            set_rng_state(safe_load(rng_file))
        return TrainState.from_dict(client or {})


    def _restore_buffers(self, folder: Path) -> None:
        """The module's buffers (BatchNorm statistics) as the checkpoint's model states hold them."""
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            saved = safe_load(sorted(folder.glob("*model_states.pt"))[0])["module"]
        with torch.no_grad():
            for name, buf in self.engine.module.named_buffers():
                if name in saved:
                    buf.copy_(saved[name])


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def _model_states(folder: str | os.PathLike) -> dict:
    """The (first) model states file of a checkpoint, read without DeepSpeed (weights only, mapped)."""
    folder = Path(folder)
    found = sorted(folder.glob("*model_states.pt"))
    if not found:
        raise DamagedCheckpointError(f"checkpoint {folder} holds no model states file{_previous(folder)}")
    check_safe(folder)  # (never unpickles code; names a damaged file)
    verify_files(folder)
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return safe_load(found[0], mmap=True)


def saved_world_size(folder: str | os.PathLike) -> int:
    """The number of data-parallel ranks that wrote a checkpoint."""
    return int(_model_states(folder).get("dp_world_size") or 1)


def saved_state(folder: str | os.PathLike) -> tuple[TrainState, dict[str, tuple]]:
    """(the training state, the parameter shapes) a checkpoint holds, without loading it."""
    blob = _model_states(folder)
    if blob.get("param_shapes"):  # ZeRO 1-3: the shapes of the partitioned parameters
        shapes = {k: tuple(v) for group in blob["param_shapes"] for k, v in group.items()}
    else:
        shapes = {k: tuple(v.shape) for k, v in (blob.get("module") or {}).items()}
    return TrainState.from_dict(blob), shapes


def dataset_fingerprint(infos: list[dict]) -> str:
    """What identifies the train data of a run, as a short digest: each dataset's content digest
    (dataset.json's `content_sha256`; for older builds its name, shards and identity count)."""
    import hashlib

    parts = [i.get("content_sha256") or [i.get("name"), i.get("train_identities"), i["splits"]["train"]["shards"]]
             for i in infos]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


UNIVERSAL = "universal-"
"""Prefix of the universal copy of a checkpoint (not a `step*` folder: never taken as `latest`)."""


def to_universal(folder: str | os.PathLike, into: str | os.PathLike) -> Path:
    """DeepSpeed's universal checkpoint of `folder` (ZeRO 1-3), loadable on any number of ranks,
    written into `into` (the resuming run's own checkpoint folder: a checkpoint of another run, which
    may be read-only or not ours, is only read) and stamped with the source it was made from. The
    optimizer state of ZeRO 1-3 is partitioned by rank: this is how a run continues on more or fewer
    ranks. DeepSpeed unpickles the universal files without restriction: a copy is reused only when
    its stamp names this very source, and is checked like any checkpoint before it is loaded."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    folder, into = Path(folder), Path(into)
    out = into / f"{UNIVERSAL}{folder.name}"
    stamp = json.dumps({"source": str(folder.resolve()), "marked_ns": (folder / COMPLETE).stat().st_mtime_ns,
                        "files": marker_text(folder)})
    if not out.is_symlink() and is_complete(into, out.name) and marker_text(out) == stamp:
        check_safe(out)
        return out
    check_safe(folder)  # (the converter unpickles without restriction)
    into.mkdir(parents=True, exist_ok=True)
    if out.is_symlink():
        out.unlink()
    shutil.rmtree(out, ignore_errors=True)
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(folder), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True))
    (into / "latest_universal").unlink(missing_ok=True)  # (the converter's pointer: unused here)
    for rng in folder.glob("rng_rank*.pt"):
        shutil.copy2(rng, out / rng.name)
    _fsync_tree(out)
    write_atomic(out / COMPLETE, stamp)
    return out


class DamagedCheckpointError(DataError):
    """A checkpoint marked complete has a file missing, truncated or unreadable."""


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE}


MAX_MARKER_BYTES = 1 << 20
"""A COMPLETE marker lists a checkpoint's files and sizes: a few KiB even for 64 ranks."""


def marker_text(folder: Path) -> str:
    """The text of a checkpoint's COMPLETE marker, read as a bounded regular file: the folder may be
    another run's, and a FIFO there would block the read, a link to /dev/zero fill memory
    (UnsafePath naming it instead)."""
    return read_regular(folder / COMPLETE, f"checkpoint {folder}", MAX_MARKER_BYTES).decode("utf-8", "replace")


def verify_files(folder: Path) -> None:
    """Every file the COMPLETE marker lists is there with its size (a disk or copy that lost data
    is found here, naming the file, instead of deep in DeepSpeed's loader)."""
    try:
        listed = json.loads(marker_text(folder) or "{}")
    except (OSError, ValueError):
        listed = {}
    for name, size in listed.items():
        path = folder / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            state = "is missing" if actual is None else f"has {actual} of its {size} bytes"
            raise DamagedCheckpointError(f"checkpoint {folder}: {name} {state}{_previous(folder)}")


def _previous(folder: Path) -> str:
    older = [t for t in complete_tags(folder.parent) if t < folder.name]
    return (f"; continue from the previous complete checkpoint with train.resume={folder.parent / older[-1]}"
            if older else "; no earlier complete checkpoint: start the run again")


def check_safe(folder: Path) -> None:
    """Refuse a checkpoint folder unless every file in it loads with weights_only=True. DeepSpeed's
    loader unpickles without that restriction; a file that passes here holds nothing it could run.
    A link to a folder is refused (the walk does not enter it, DeepSpeed's loader would), and so is
    anything but folders and regular files (a FIFO would block the read, a device never end)."""
    paths = sorted(folder.rglob("*"))
    for path in paths:
        if path.is_symlink() and path.is_dir():
            raise UnsafeCheckpointError(f"checkpoint {folder}: {path.relative_to(folder)} is a link to a folder "
                                        f"({os.path.realpath(path)}): refused (checkpoints hold files only)")
        if not path.is_dir() and not path.is_file():
            raise UnsafeCheckpointError(f"checkpoint {folder}: {path.relative_to(folder)} is not a regular file "
                                        f"(a FIFO, device or broken link): refused")
    for path in (p for p in paths if p.name.endswith(".pt")):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            try:
                safe_load(path, mmap=True)  # (mapped: the check reads the pickle, not the tensor data)
            except UnsafeCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged file: say which, and what to do
                raise DamagedCheckpointError(f"checkpoint {folder}: {path.name} cannot be read ({type(e).__name__}: "
                                             f"{str(e)[:200]}){_previous(folder)}") from None


def _deepspeed_safe_globals() -> list:
    """The plain-data classes DeepSpeed's own checkpoint files name besides tensors."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def full_state_dict(engine) -> dict:
    """The model's weights as fp32 tensors on CPU, on every rank (a collective under ZeRO-3).

    Under bf16 these are the optimizer's fp32 master weights, assembled by DeepSpeed's public
    `safe_get_full_fp32_param` (ZeRO 1-3) or read from the optimizer's fp32 groups (no ZeRO):
    never the bf16 weights cast back to fp32, which would lose what the last updates added.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    if engine.bfloat16_enabled():
        masters = _unpartitioned_masters(engine.optimizer) if engine.zero_optimization_stage() == 0 else {}
        params = {name: (masters[id(p)] if masters else safe_get_full_fp32_param(p))
                  for name, p in module.named_parameters()}
        missing = [name for name, v in params.items() if v is None]
        if missing:
            raise RuntimeError(f"no fp32 master weights for {missing[:3]} (DeepSpeed optimizer "
                               f"{type(engine.optimizer).__name__}); export them with train.precision=fp32")
        sd = {**module.state_dict(), **params}  # (buffers as the module holds them)
    elif engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict() or {}  # (fp32 training: the weights themselves)
    else:
        sd = module.state_dict()
    return {k: (v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()) for k, v in sd.items()}


def _unpartitioned_masters(optimizer) -> dict[int, torch.Tensor]:
    """{id(low-precision param): its fp32 master} of DeepSpeed's optimizer without ZeRO."""
    from torch._utils import _unflatten_dense_tensors

    groups = getattr(optimizer, "fp16_groups", None) or getattr(optimizer, "bf16_groups", None)
    if groups is None:
        return {}
    if hasattr(optimizer, "fp32_groups"):  # one fp32 tensor per parameter
        masters = [m for group in optimizer.fp32_groups for m in group]
    else:  # one flat fp32 tensor per group
        masters = [m for g, flat in zip(groups, optimizer.fp32_groups_flat) for m in _unflatten_dense_tensors(flat, g)]
    return {id(p): m for p, m in zip((p for g in groups for p in g), masters)}

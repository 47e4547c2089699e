"""DeepSpeed checkpoints that are never taken half-written, pruned to the last K plus the best,
and the single-file fp32 export for inference without DeepSpeed.

Layout of `<run_dir>/checkpoints/`: one folder per checkpoint, `step00001234/`, written by
DeepSpeed, then marked complete with a `COMPLETE` file once every rank has finished; the
pointer files `latest` and `best` (written atomically by rank 0) name complete checkpoints.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename, fsync the folder: after a crash the file is the old or the new one."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_complete(ckpt_dir: Path, tag: str) -> bool:
    return (ckpt_dir / tag / COMPLETE).exists()


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint: the `latest` pointer if it is complete, else the newest
    folder marked complete (a crash between writing and marking leaves an unmarked folder)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if pointer.exists() and is_complete(ckpt_dir, pointer.read_text().strip()):
        return pointer.read_text().strip()
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if is_complete(ckpt_dir, p.name))
    return tags[-1] if tags else None


def incomplete_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """Checkpoint folders without the COMPLETE marker: left by a run that stopped while writing."""
    return sorted(p.name for p in Path(ckpt_dir).glob("step*") if p.is_dir() and not is_complete(Path(ckpt_dir), p.name))


def read_pointer(ckpt_dir: str | os.PathLike, name: str) -> str | None:
    p = Path(ckpt_dir) / name
    return p.read_text().strip() if p.exists() else None


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


def save(engine, ckpt_dir: str | os.PathLike, step: int, client_state: dict, *, keep_last: int,
         is_best: bool, rank: int) -> str:
    """Save a checkpoint on every rank; mark it complete, move `latest` (and `best`), prune."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    if rank == 0 and (ckpt_dir / tag).exists():  # a leftover of this step (a resumed run redoing it)
        (ckpt_dir / tag / COMPLETE).unlink(missing_ok=True)  # unmark first: never complete while rewritten
        shutil.rmtree(ckpt_dir / tag)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    _fsync_tree(ckpt_dir / tag)  # every rank, for what it wrote (on NFS only the writer's fsync counts)
    _barrier()
    if rank == 0:  # durable before it is marked complete
        _write_atomic(ckpt_dir / tag / COMPLETE, "")
        _write_atomic(ckpt_dir / "latest", tag)
        if is_best:
            _write_atomic(ckpt_dir / "best", tag)
        keep = {tag, read_pointer(ckpt_dir, "best")}
        done = sorted(p.name for p in ckpt_dir.glob("step*") if is_complete(ckpt_dir, p.name))
        keep.update(done[-keep_last:])
        for name in done:
            if name not in keep:
                shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    _barrier()
    return tag


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def load(engine, ckpt_dir: str | os.PathLike, tag: str, rank: int, *, weights_only: bool = False) -> dict:
    """Restore a checkpoint into the engine (and this rank's random state); returns the client state."""
    ckpt_dir = Path(ckpt_dir)
    if not is_complete(ckpt_dir, tag):
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} is missing or incomplete (no {COMPLETE} marker)")
    check_safe(ckpt_dir / tag)
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=not weights_only,
                                       load_lr_scheduler_states=not weights_only,
                                       load_module_only=weights_only)
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if not weights_only and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client or {}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds more than tensors and plain values: it is not unpickled."""


def safe_load(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """torch.load with weights_only=True (tensors, numbers, strings, containers: never code), with
    an error that says why a file is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        raise UnsafeCheckpointError(
            f"{path}: refused, it holds more than tensors and plain values"
            f"{f' ({found.group(1)})' if found else ''}; torch.load(weights_only=True) will not unpickle it. "
            "Only load checkpoints written by itself/train.py from a source you trust") from None


def check_safe(folder: Path) -> None:
    """Refuse a checkpoint folder unless every file in it loads with weights_only=True. DeepSpeed's
    loader unpickles without that restriction; a file that passes here holds nothing it could run."""
    for path in sorted(folder.rglob("*.pt")):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            safe_load(path, mmap=True)  # (mapped: the check reads the pickle, not the tensor data)


def _deepspeed_safe_globals() -> list:
    """The plain-data classes DeepSpeed's own checkpoint files name besides tensors."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def full_state_dict(engine) -> dict:
    """The model's weights as fp32 tensors on CPU (gathered from ZeRO-3 partitions if needed)."""
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict()
    if sd is None:  # ZeRO-3 consolidates on rank 0 only
        return {}
    return {k: (v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()) for k, v in sd.items()}


def export(path: str | os.PathLike, state_dict: dict, config: dict, num_ids: int, fusion_weight: float,
           metrics: dict | None = None) -> None:
    """Write model.pt: everything inference needs, without DeepSpeed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"format": "itself-model/1", "config": config, "num_ids": num_ids, "fusion_weight": fusion_weight,
                "state_dict": state_dict, "metrics": metrics or {}}, tmp)
    os.replace(tmp, path)


def load_exported(path: str | os.PathLike, map_location="cpu"):
    """(model in eval mode, config, fusion weight) from an exported model.pt."""
    import dataclasses

    from .config import Config, apply_dict
    from .model import ITSELF

    blob = safe_load(path, map_location)
    if not isinstance(blob, dict) or blob.get("format") != "itself-model/1":
        raise ValueError(f"{path}: not an exported ITSELF model (expected model.pt written by itself/train.py)")
    cfg = Config()
    apply_dict(cfg, blob["config"])
    # The exported weights replace any pretrained ones: build the backbone without loading them.
    model = ITSELF(dataclasses.replace(cfg.model, pretrained=""), blob["num_ids"], cfg.data.image_size)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), cfg, blob["fusion_weight"]

"""DeepSpeed checkpoints that are never taken half-written, pruned to the last K plus the best,
and the single-file fp32 export for inference without DeepSpeed.

Layout of `<run_dir>/checkpoints/`: one folder per checkpoint, `step00001234/`, written by
DeepSpeed, then marked complete with a `COMPLETE` file once every rank has finished; the
pointer files `latest` and `best` (written atomically by rank 0) name complete checkpoints.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def read_pointer(ckpt_dir: str | os.PathLike, name: str) -> str | None:
    p = Path(ckpt_dir) / name
    return p.read_text().strip() if p.exists() else None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: str | os.PathLike, step: int, client_state: dict, *, keep_last: int,
         is_best: bool, rank: int) -> str:
    """Save a checkpoint on every rank; mark it complete, move `latest` (and `best`), prune."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        (ckpt_dir / tag / COMPLETE).write_text("")
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


def load(engine, ckpt_dir: str | os.PathLike, tag: str, rank: int, *, weights_only: bool = False) -> dict:
    """Restore a checkpoint into the engine (and this rank's random state); returns the client state."""
    ckpt_dir = Path(ckpt_dir)
    if not is_complete(ckpt_dir, tag):
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} is missing or incomplete (no {COMPLETE} marker)")
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=not weights_only,
                                       load_lr_scheduler_states=not weights_only,
                                       load_module_only=weights_only)
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if not weights_only and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client or {}


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

    blob = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != "itself-model/1":
        raise ValueError(f"{path}: not an exported ITSELF model (expected model.pt written by itself/train.py)")
    cfg = Config()
    apply_dict(cfg, blob["config"])
    # The exported weights replace any pretrained ones: build the backbone without loading them.
    model = ITSELF(dataclasses.replace(cfg.model, pretrained=""), blob["num_ids"], cfg.data.image_size)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), cfg, blob["fusion_weight"]

"""Names that code on both sides of torch needs (a submission, Tune's workers and a run folder's
readers load no torch): how a run's checkpoints folder is laid out, and the exported model's
companion files. Written by `itself.checkpoint` and `itself.model.export`, found through
`itself.rundir.RunDir`.

Layout of `<run_dir>/checkpoints/`: one folder per checkpoint, `step00001234/`, written by
DeepSpeed, then marked complete with a `COMPLETE` file once every rank has finished; the
pointer files `latest` and `best` (written atomically by rank 0) name complete checkpoints.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("itself.checkpoint")  # (the checkpoints' logger, as before these names moved here)

WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"
"""The exported model.pt's companions: its weights as safetensors, its config as JSON."""

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    """The folder name of the checkpoint taken after optimizer step `step`."""
    return f"step{step:08d}"


TAG = re.compile(r"step\d{8,}")
"""What a checkpoint folder (and so a `latest` / `best` pointer) may be called: nothing else is
followed, so a pointer never leads outside the checkpoints folder."""


def is_complete(ckpt_dir: Path, tag: str) -> bool:
    return (ckpt_dir / tag / COMPLETE).exists()


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint: the `latest` pointer if it names a complete one, else the
    newest folder marked complete (a crash between writing and marking leaves an unmarked folder)."""
    ckpt_dir = Path(ckpt_dir)
    pointed = read_pointer(ckpt_dir, "latest")
    if pointed and is_complete(ckpt_dir, pointed):
        return pointed
    tags = complete_tags(ckpt_dir)
    if (ckpt_dir / "latest").exists() or (ckpt_dir / "latest").is_symlink():
        log.warning("%s names %s, not a complete checkpoint of this run: ignored; taking the newest complete one "
                    "(%s)", ckpt_dir / "latest", "something else" if pointed is None else pointed,
                    tags[-1] if tags else "none")
    return tags[-1] if tags else None


def complete_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """Complete checkpoints, oldest first."""
    return sorted(p.name for p in Path(ckpt_dir).glob("step*") if TAG.fullmatch(p.name) and is_complete(Path(ckpt_dir), p.name))


def incomplete_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """Checkpoint folders without the COMPLETE marker: left by a run that stopped while writing."""
    return sorted(p.name for p in Path(ckpt_dir).glob("step*") if p.is_dir() and not is_complete(Path(ckpt_dir), p.name))


def read_pointer(ckpt_dir: str | os.PathLike, name: str) -> str | None:
    """The checkpoint a pointer file names, or None (no pointer, or one that names no checkpoint
    folder of this run: `../elsewhere` is never followed)."""
    p = Path(ckpt_dir) / name
    try:  # (a link is never followed: the pointer is a small file this run wrote)
        tag = p.read_text(errors="replace")[:64].strip() if p.is_file() and not p.is_symlink() else None
    except OSError:
        return None
    return tag if tag and TAG.fullmatch(tag) else None

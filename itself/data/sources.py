"""Which shards a run reads, and how many steps an epoch of them makes, without torch.

The search driver counts an epoch's steps to place ASHA's first rung (tune/rungs.py); importing
torch for that would cost it seconds of CPU before anything starts. The count is the one the train
pipeline serves: both lay the epoch out with `epoch_plan`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from shards import schema

from ..config import DataConfig
from ..errors import DataError
from ..layout import DataLayout, data_layout
from ..safeio import check_relative
from .catalog import TrainData, dataset_info, is_url, join
from .locations import is_command
from .plan import EpochLayout, epoch_layout

log = logging.getLogger(__name__)


def ensure_dataset(root: str | os.PathLike, build_synthetic: bool = False) -> dict:
    """dataset.json of `root` (a folder or a URL); with `build_synthetic`, build the embedded
    synthetic set there first when missing (one process builds under a file lock, the others wait
    and reuse it)."""
    root = str(root)
    if build_synthetic and not is_url(root) and not (Path(root) / schema.DATASET_FILE).exists():
        Path(root).parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(root + ".lock"):
            if not (Path(root) / schema.DATASET_FILE).exists():
                import shards

                log.info(f"building the synthetic dataset in {Path(root).resolve()} (first use)")
                shards.build_synthetic(root, progress=False)
    return dataset_info(root)


@contextlib.contextmanager
def _build_lock(path: str):
    """Wait for, then hold, the lock file `path` (created if missing, never truncated, never
    through a link planted at its name: root would otherwise empty whatever it points at)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise DataError(f"data.root: cannot use the lock {path}: "
                         + ("it is a symbolic link or a FIFO" if e.errno in (errno.ELOOP, errno.ENXIO) else
                            str(e.strerror or e))) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"data.root: the lock {path} is not a regular file")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def split_urls(root: str, split: str, info: dict | None = None, override: str = "") -> list[str]:
    """Shard URLs of a dataset's split: those in dataset.json, or `override` (a brace pattern or
    a `::`-joined list, as `data.train_shards`)."""
    if override:
        from webdataset.shardlists import expand_urls  # (webdataset loads torch: only when asked)

        urls = expand_urls(override)
    else:
        info = info or ensure_dataset(root)
        urls = [_shard_inside(root, split, i, s) for i, s in enumerate(info["splits"][split]["shards"])]
    if not urls:
        raise DataError(f"no {split} shards: dataset {root} has none" + (" and data.train_shards is empty"
                                                                        if split == "train" else ""))
    for url in urls:
        if not is_url(url) and not is_command(url) and not os.path.isfile(url):
            raise DataError(f"shard {url} is not a regular file (a FIFO, device or folder): refused unread"
                            if os.path.exists(url) else f"shard not found: {url}")
    return urls


def _shard_inside(root: str, split: str, index: int, shard) -> str:
    """The URL of a shard dataset.json names: a plain path inside the dataset's folder (the file
    comes from whoever built the dataset: a `..`, an absolute path or a command is refused, naming
    the entry; links are followed, as the builder's own, e.g. train/ on another disk)."""
    entry = f"{join(root, schema.DATASET_FILE)}: entry splits.{split}.shards[{index}].name"
    name = check_relative(shard.get("name") if isinstance(shard, dict) else shard, entry)
    return join(root, check_relative(f"{split}/{name}", entry))


def train_sources(cfg: DataConfig) -> list[tuple[str, list[str], float]]:
    """(root, train shard URLs, weight) of every dataset trained on: `root`, then `mix`."""
    weights = list(cfg.mix_weights) or [1.0] * (1 + len(cfg.mix))
    roots = [cfg.root, *cfg.mix]
    return [(root, split_urls(root, "train", override=cfg.train_shards if i == 0 else ""), w)
            for i, (root, w) in enumerate(zip(roots, weights))]


def rank_layout(cfg: DataConfig, world_size: int, micro_batch: int) -> DataLayout:
    """How one rank's micro-batches split into data slots (one micro-batch per step: the loader
    serves micro-batches, the trainer groups them for gradient accumulation)."""
    return data_layout(micro_batch * world_size, world_size, 1, cfg.num_instance, cfg.num_workers, cfg.num_slots)


def epoch_plan(data: TrainData, cfg: DataConfig, layout: DataLayout, seed: int, epoch: int) -> EpochLayout:
    """The layout of one epoch of `data`: the same on every rank and loader worker."""
    return epoch_layout(data.table, num_slots=layout.num_slots, slot_batch=layout.slot_batch,
                        num_instance=cfg.num_instance, window_shards=cfg.window_shards, seed=seed, epoch=epoch,
                        identity_order=cfg.identity_order)


def micro_batches_per_epoch(cfg: DataConfig, *, world_size: int, micro_batch: int, seed: int = 0,
                            epoch: int = 0) -> int:
    """The micro-batches a rank's train loader serves in `epoch` (`len(train_loader(...))`)."""
    cfg.validate()
    return epoch_plan(TrainData(train_sources(cfg)), cfg, rank_layout(cfg, world_size, micro_batch), seed,
                      epoch).steps

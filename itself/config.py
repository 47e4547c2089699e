"""Typed configuration. Each field's docstring is its documentation; `validate()` names the field
at fault. Later parts of the system (model, training) add their own sections here."""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what to do."""


@dataclasses.dataclass
class DataConfig:
    root: str = "data/synthetic"
    """Dataset directory written by `python -m shards build` (dataset.json, manifest.parquet,
    train/ val/ test/). The default synthetic set is built there on first use when missing."""
    train_shards: str = ""
    """Train shard URLs overriding `<root>/train/*.tar`: a brace pattern (`dir/train-{000000..000009}.tar`),
    several joined by `::`, or any URL webdataset opens (`pipe:`, `https://`). Shards are matched
    to the manifest by file name, so they may live elsewhere than the manifest."""
    image_size: tuple[int, int] = (384, 128)
    """Height x width the images are resized to (paper: 384x128, a 24x8 grid of 16-pixel patches)."""
    text_length: int = 77
    """Tokens per caption, including start and end tokens (CLIP: 77)."""
    num_instance: int = 2
    """(image, caption) pairs of each identity in a batch (paper: 2). Holds for the global batch."""
    num_workers: int = 2
    """DataLoader worker processes per rank; each reads whole shards, so the train split needs at
    least world_size x max(1, num_workers) shards."""
    window_shards: int = 16
    """Shards a worker pools before forming batches: bigger mixes identities from more shards,
    smaller bounds memory (at most about this many shards of encoded images per worker)."""
    image_aug: bool = True
    """Paper image augmentation: flip, pad 10 + random crop, random erasing."""
    text_aug: bool = True
    """Paper text augmentation: each real token with probability 0.2 is masked (60%), replaced by a
    random token (20%) or removed (20%)."""

    def validate(self) -> None:
        h, w = self.image_size
        if h < 1 or w < 1:
            raise ConfigError(f"data.image_size: expected positive height x width, got {self.image_size}")
        if self.text_length < 3:
            raise ConfigError(f"data.text_length: must be at least 3 (start, one token, end), got {self.text_length}")
        if self.num_instance < 1:
            raise ConfigError(f"data.num_instance: must be >= 1, got {self.num_instance}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if self.window_shards < 1:
            raise ConfigError(f"data.window_shards: must be >= 1, got {self.window_shards}")

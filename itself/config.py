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
    num_slots: int = 0
    """Data slots: disjoint shard sets, each contributing an equal share of every global batch.
    0 = ranks x workers. A fixed value (a multiple of ranks x workers, at most the number of train
    shards) makes the batches, and so the results, independent of the world size."""
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
        if self.num_slots < 0:
            raise ConfigError(f"data.num_slots: must be >= 0 (0 = ranks x workers), got {self.num_slots}")
        if self.window_shards < 1:
            raise ConfigError(f"data.window_shards: must be >= 1, got {self.window_shards}")


@dataclasses.dataclass
class ModelConfig:
    arch: str = "tiny"
    """Backbone: `ViT-B-16` (paper), `ViT-B-32` (supplementary Tab. 2), any open_clip ViT name, or the
    CPU-sized random `tiny` / `tiny-deep`."""
    pretrained: str = ""
    """CLIP weights: "" for random, a local state-dict file, or an open_clip pretrained tag
    (e.g. `openai`; downloaded by open_clip). Position embeddings are interpolated to the image grid."""
    global_only: bool = False
    """Baseline: train the global branch only (no GRAB, no attention capture)."""
    grab_dim: int = 4096
    """Output size of the GRAB embedding (paper: 4096; the MLP's hidden layer is half of it)."""
    selection: str = "mars"
    """Saliency strategy for top-k: `mars`, `mean_max` (Tab. 3 B), `mean_min` (A), `std_max` (D),
    `std_min` (C) or `layer:<i>` (one layer)."""
    mars_layers: tuple[int, ...] = (4, 11)
    """Layers MARS rolls out, ascending (paper: middle + late = 4 and 11 of 12)."""
    discard_ratio: float = 0.25
    """Fraction of each rolled-out layer's lowest attention entries set to zero (paper: 0.25)."""
    ats: str = "step"
    """Token scheduler: `step` (ATS per step, the paper's best), `epoch` (ATS per epoch) or `fixed`."""
    p_start: float = 0.65
    """ATS keep ratio at the start (paper: 0.65)."""
    p_end: float = 0.5
    """ATS keep ratio from t_small on, and at inference (paper: 0.5)."""
    t_small: float = 10.0
    """ATS decay length T in epochs: when the baseline peaks (paper: 10)."""
    fixed_ratio: float = 0.5
    """Keep ratio when `ats` is `fixed`."""
    tau: float = 0.015
    """TAL temperature (paper: 0.015)."""
    margin: float = 0.1
    """TAL margin (paper: 0.1)."""
    cid: bool = True
    """Train with the CID loss (cross-modal identity classification with hard negatives)."""
    id_loss: bool = True
    """Train with the ID loss (identity classification of image and text embeddings)."""

    def validate(self, num_layers: int | None = None) -> None:
        from .model.ats import MODES

        if self.ats not in MODES:
            raise ConfigError(f"model.ats: must be one of {', '.join(MODES)}, got {self.ats!r}")
        if not 0 < self.p_end <= self.p_start <= 1:
            raise ConfigError(f"model.p_start / model.p_end: need 0 < p_end <= p_start <= 1, "
                              f"got p_start={self.p_start}, p_end={self.p_end}")
        if not 0 < self.fixed_ratio <= 1:
            raise ConfigError(f"model.fixed_ratio: must be in (0, 1], got {self.fixed_ratio}")
        if self.t_small <= 0:
            raise ConfigError(f"model.t_small: must be > 0 epochs, got {self.t_small}")
        if not 0 <= self.discard_ratio < 1:
            raise ConfigError(f"model.discard_ratio: must be in [0, 1), got {self.discard_ratio}")
        if self.grab_dim < 2 or self.grab_dim % 2:
            raise ConfigError(f"model.grab_dim: must be a positive even number, got {self.grab_dim}")
        if self.tau <= 0:
            raise ConfigError(f"model.tau: must be > 0, got {self.tau}")
        layers = list(self.mars_layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < 0:
            raise ConfigError(f"model.mars_layers: need ascending distinct layer indices, got {self.mars_layers}")
        strategies = ("mars", "mean_max", "mean_min", "std_max", "std_min")
        if self.selection not in strategies and not self.selection.startswith("layer:"):
            raise ConfigError(f"model.selection: must be one of {', '.join(strategies)} or layer:<i>, "
                              f"got {self.selection!r}")
        if self.selection.startswith("layer:"):
            try:
                int(self.selection.split(":", 1)[1])
            except ValueError:
                raise ConfigError(f"model.selection: layer:<i> needs an integer, got {self.selection!r}") from None
        if num_layers is not None:
            used = layers if self.selection == "mars" else (
                [int(self.selection.split(":")[1])] if self.selection.startswith("layer:") else [])
            bad = [i for i in used if not 0 <= i < num_layers]
            if bad:
                field = "model.mars_layers" if self.selection == "mars" else "model.selection"
                raise ConfigError(f"{field}: layer {bad[0]} does not exist; {self.arch} has {num_layers} layers "
                                  f"(0..{num_layers - 1})")

"""The `data` section: which datasets, how they are read and batched."""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .values import short_repr


@dataclasses.dataclass
class DataConfig:
    root: str = "data/synthetic"
    """Dataset written by `python -m shards build` (dataset.json, manifest.parquet, train/ val/
    test/): a local folder or a URL (`https://`, `s3://`, `gs://`: anything fsspec opens)."""
    mix: tuple[str, ...] = ()
    """Further built datasets (folders or URLs) whose train splits are trained on with `root`'s
    (joint training). Their identities stay apart (labels offset); val and test are `root`'s."""
    mix_weights: tuple[float, ...] = ()
    """Per dataset, `root` first, then each of `mix`: how many times its train pairs are used per
    epoch on average (1: once; 0.5: half of its identities, drawn anew each epoch; 2: twice).
    Empty: 1 for every dataset."""
    build_synthetic: bool = False
    """Build the embedded synthetic dataset at `root` when it is missing (the synthetic presets).
    Switched off, with a note, when `data.root` is overridden and this is not set too."""
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
    num_workers: int = -1
    """DataLoader worker processes per rank (at most: a worker adds at least one identity to each
    step, so a rank uses no more than micro-batch / num_instance, and a divisor of its data slots).
    Each reads its slots' identities. -1 = auto: 8 for the data layout (the batches do not depend on
    the host), read by at most the rank's cores - 1 processes; 0 = read in the training process."""
    num_slots: int = 0
    """Data slots: runs of whole identities (not whole shards), each an equal share of every global batch.
    0 = ranks x workers. A fixed value (a multiple of the world size, at most the number of train
    identities) makes the batches, and so the results, independent of the world size."""
    window_shards: int = 16
    """Shards a worker pools before forming batches: bigger mixes identities from more shards,
    smaller bounds memory (at most about this many shards of encoded images per worker)."""
    identity_order: str = "uniform"
    """How a batch's identities are drawn. `uniform`: uniformly from the whole train set, as the
    reference code's sampler (identities permuted each epoch, then dealt to data slots). `slots`:
    from the shards of the batch's data slot and window (shards permuted each epoch, identities in
    shard order: a batch's identities are neighbours in the shard layout, typically close person
    ids). Both use every pair once per epoch and keep batches independent of the world size.
    `uniform` costs I/O that grows with identities rather than shards: each reader loads the
    manifest rows of every shard (not only its own) and reads one byte range per identity instead
    of one per shard. That is cheap on local disks and servers answering HTTP ranges (the synthetic
    benchmark's loader runs as fast either way), hence the default; over streamed sources (`pipe:`,
    servers without ranges) each window streams every shard it touches: use `slots` there, and for
    corpora of millions of pseudo-identities (the pre-training presets do)."""
    image_aug: bool = True
    """Paper image augmentation: flip, pad 10 + random crop, random erasing."""
    text_aug: bool = True
    """Paper text augmentation: each real token with probability 0.2 is masked (60%), replaced by a
    random token (20%) or removed (20%)."""

    def validate(self) -> None:
        if not self.root:
            raise ConfigError(f"data.root: must be a non-empty dataset directory, got {short_repr(self.root)}")
        h, w = self.image_size
        if h < 1 or w < 1:
            raise ConfigError(f"data.image_size: expected positive height x width, got {self.image_size}")
        if self.text_length < 3:
            raise ConfigError(f"data.text_length: must be at least 3 (start, one token, end), got {self.text_length}")
        if self.num_instance < 1:
            raise ConfigError(f"data.num_instance: must be >= 1, got {self.num_instance}")
        if self.num_workers < -1:
            raise ConfigError(f"data.num_workers: must be >= 0, or -1 (auto), got {self.num_workers}")
        if self.num_slots < 0:
            raise ConfigError(f"data.num_slots: must be >= 0 (0 = ranks x workers), got {self.num_slots}")
        if self.identity_order not in ("slots", "uniform"):
            raise ConfigError(f"data.identity_order: must be slots or uniform, got {short_repr(self.identity_order)}")
        if self.window_shards < 1:
            raise ConfigError(f"data.window_shards: must be >= 1, got {self.window_shards}")
        if self.mix_weights and len(self.mix_weights) != 1 + len(self.mix):
            raise ConfigError(f"data.mix_weights: need one weight per dataset (data.root, then each of data.mix: "
                              f"{1 + len(self.mix)}), got {len(self.mix_weights)}")
        if any(w < 0 for w in self.mix_weights) or (self.mix_weights and not any(self.mix_weights)):
            raise ConfigError(f"data.mix_weights: each must be >= 0 and one > 0, got {self.mix_weights}")
        if not all(self.mix):
            raise ConfigError(f"data.mix: every entry must be a dataset folder or URL, got {self.mix}")
        named = [self.root, *self.mix]
        if len(set(named)) != len(named):  # (its identities would be trained as two people's each)
            raise ConfigError(f"data.mix: a dataset is named twice in data.root + data.mix {named}; "
                              "data.mix_weights sets how often one is used")

"""Shared fixtures: small synthetic datasets built once per test session."""

from __future__ import annotations

import pytest

import shards
from shards.synthetic import SyntheticSpec

# 48 identities -> 32 train / 8 val / 8 test; 2 images x 2 captions = 4 pairs (2 groups of 2) per
# identity; 8 images (4 identities) per shard -> 8 train shards: one per slot at 4 ranks x 2 workers.
SMALL = SyntheticSpec(num_ids=48, images_per_id=2, captions_per_image=2, image_size=(48, 16), seed=3)
SMALL_SHARD_SAMPLES = 8


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """Path of a small synthetic dataset (treat as read-only; copy it to modify)."""
    out = tmp_path_factory.mktemp("data") / "small"
    shards.build_synthetic(out, SMALL, max_samples=SMALL_SHARD_SAMPLES, progress=False)
    return out

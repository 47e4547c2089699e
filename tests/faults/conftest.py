"""Indexes the retrieval fault tests share (built once per session, in this process; treat them as
read-only: tests copy them before changing anything)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from retrieving import cli, ok


@pytest.fixture(scope="session")
def photos(small_dataset, tmp_path_factory) -> Path:
    """A folder gallery: the 8 JPEGs of the small dataset's first test shard."""
    folder = tmp_path_factory.mktemp("photos") / "photos"
    folder.mkdir()
    with tarfile.open(next((small_dataset / "test").glob("*.tar"))) as t:
        for m in t.getmembers():
            if m.name.endswith(".jpg"):
                (folder / m.name).write_bytes(t.extractfile(m).read())
    return folder


@pytest.fixture(scope="session")
def folder_index(untrained_model, photos, tmp_path_factory) -> Path:
    """`photos` indexed (8 images, one part)."""
    out = tmp_path_factory.mktemp("folder-index") / "index"
    ok(cli("index", "--model", untrained_model, "--gallery", photos, "--out", out))
    return out


@pytest.fixture(scope="session")
def shard_index(untrained_model, small_dataset, tmp_path_factory) -> Path:
    """The small dataset's test split indexed (16 images in 2 shards: 2 parts)."""
    out = tmp_path_factory.mktemp("shard-index") / "index"
    ok(cli("index", "--model", untrained_model, "--gallery", small_dataset, "--out", out))
    return out

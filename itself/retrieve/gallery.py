"""What a gallery is and how its images are found again.

A gallery is a built dataset folder (one split), a shard pattern, or a plain folder of images. An
index build cuts it into *units*: one per shard, or `part_size` files of a folder. A unit is the
piece one rank embeds and writes as one part, so a failed build resumes unit by unit, whatever
the number of ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

from shards import schema

from ..data.catalog import image_member, iter_shard
from .errors import RetrieveError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_PART_SIZE = 4096  # images per unit of a folder gallery (a shard is always one unit)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One shard (all its images), or some files of a folder (paths relative to `folder`)."""

    shard: str | None = None
    folder: str | None = None
    files: tuple[str, ...] = ()
    images: int | None = None  # how many images, when known without reading (progress bars)


@dataclasses.dataclass(frozen=True)
class Item:
    name: str  # what the user calls it: the file's relative path, or the sample's source
    data: bytes  # the encoded image
    pid: int | None  # the person's identity, when the gallery knows it
    locator: str  # where the image is: a file path, or "<shard>#<key>"


def plan_units(source: str, split: str = "test", part_size: int = DEFAULT_PART_SIZE) -> list[Unit]:
    """The units of a gallery, in gallery order."""
    path = Path(source)
    if path.is_dir() and (path / schema.DATASET_FILE).exists():
        splits = json.loads((path / schema.DATASET_FILE).read_text())["splits"]
        if split not in splits:
            raise RetrieveError(f"--split {split!r}: the dataset {source} has the splits {', '.join(splits)}")
        return [Unit(shard=str(path.resolve() / split / s["name"]), images=s.get("samples"))
                for s in splits[split]["shards"]]
    if path.is_dir():
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        root = str(path.resolve())
        return [Unit(folder=root, files=tuple(files[i:i + part_size]), images=len(files[i:i + part_size]))
                for i in range(0, len(files), part_size)]
    from webdataset.shardlists import expand_urls

    urls = expand_urls(source)
    missing = [u for u in urls if _is_local(u) and not os.path.exists(u)]
    if missing:
        raise RetrieveError(f"--gallery {source}: no such folder or shard ({missing[0]}); give a dataset folder, "
                            "a shard pattern such as data/test/test-{000000..000003}.tar, or a folder of images")
    return [Unit(shard=str(Path(u).resolve()) if _is_local(u) else u) for u in urls]


def plan_digest(units: list[Unit]) -> str:
    """A fingerprint of a plan: two builds with the same digest embed the same images in the same order."""
    text = json.dumps([dataclasses.asdict(u) for u in units], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def unit_items(unit: Unit) -> Iterator[Item]:
    if unit.shard is not None:
        for sample in iter_shard(unit.shard):
            meta = json.loads(sample[schema.META_EXT])
            yield Item(meta.get("source", sample["__key__"]), image_member(sample), meta.get("pid"),
                       f"{unit.shard}#{sample['__key__']}")
        return
    for name in unit.files:
        file = Path(unit.folder, name)
        yield Item(name, file.read_bytes(), None, str(file))


def read_image(locator: str) -> bytes:
    """The encoded image at a locator written by `unit_items`."""
    if "#" in locator and not os.path.exists(locator):
        url, key = locator.rsplit("#", 1)
        if _is_local(url):
            offset, size = _shard_members(url).get(key, (None, None))
            if offset is None:
                raise RetrieveError(f"image {key} not found in {url}")
            with open(url, "rb") as f:
                f.seek(offset)
                return f.read(size)
        for sample in iter_shard(url):
            if sample["__key__"] == key:
                return image_member(sample)
        raise RetrieveError(f"image {key} not found in {url}")
    return Path(locator).read_bytes()


_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key / extension split


@functools.lru_cache(maxsize=64)
def _shard_members(url: str) -> dict[str, tuple[int, int]]:
    """{key: (offset, size)} of the images of a local shard: a thumbnail is then one seek, not a
    scan of the shard (the tar headers are read once per shard)."""
    members = {}
    with tarfile.open(url) as tar:
        for m in tar:
            match = _MEMBER.match(m.name)
            if m.isfile() and match and match.group(2) in schema.IMAGE_EXTS:
                members[match.group(1)] = (m.offset_data, m.size)
    return members


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")

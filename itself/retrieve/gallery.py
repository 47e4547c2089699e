"""What a gallery is, how its images are found again, and the rules its files must meet.

A gallery is a built dataset folder (one split), a shard pattern, or a plain folder of images. It
has a *root* (the folder, the dataset folder, the shards' common folder or URL prefix) and every
image is named relative to it: a file (`cam1/0001.jpg`) or a shard and a key
(`test/test-000000.tar` + `0001`). The index stores the root once per batch and these relative
names per image, so reading an image back never leaves the root: a name from an index folder is
resolved inside it (`itself.safeio.resolve_inside`), and nothing read from an index is ever
handed to an opener that runs programs (`pipe:` galleries are refused outright).

Folder galleries follow the dataset builder's rules (`shards.converters`): a link leaving the
folder, a file that is not a regular file (FIFO, device) and a file over 64 MiB are left out and
counted; images are decoded by the project's one decoder (`shards.imaging.decode_array`: pixel
limit, EXIF orientation). A shard holding one key twice is refused.

An index build cuts a gallery into *units*: one per shard, or `part_size` files of a folder. A
unit is the piece one rank embeds and writes as one part, so a failed build resumes unit by unit,
whatever the number of ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Iterator

from shards import schema
from shards.converters import MAX_IMAGE_BYTES

from ..data.catalog import BoundedTarInfo, image_member, is_command, iter_shard, split_member
from ..safeio import UnsafePath, check_relative, read_regular, resolve_inside, shown
from .errors import RetrieveError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_PART_SIZE = 4096  # images per unit of a folder gallery (a shard is always one unit)
URL_SCHEMES = ("http", "https", "s3", "gs", "gcs", "az", "abfs", "abfss", "hdfs")  # fsspec's remote stores
MAX_DATASET_JSON = 64 << 20


class GalleryChanged(RetrieveError):
    """An image read back is not the one that was indexed (its bytes differ)."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """One shard (all its images), or some files of a folder; names relative to `root`."""

    root: str
    shard: str | None = None
    files: tuple[str, ...] = ()
    images: int | None = None  # how many images, when known without reading (progress bars)


@dataclasses.dataclass(frozen=True)
class Item:
    name: str  # what the user calls it: the file's relative path, or the sample's source
    data: bytes  # the encoded image
    pid: int | str | None  # the person's identity, when the gallery knows it
    where: dict  # {"file": rel} or {"shard": rel, "key": key}: where it is, relative to the root


@dataclasses.dataclass
class Gallery:
    """A planned gallery: its root, its units, and the files left out by the rules (name, why)."""

    root: str
    units: list[Unit]
    refused: list[tuple[str, str]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------- roots


def is_remote(root: str) -> bool:
    return "://" in root


def check_root(root, what: str) -> str:
    """A gallery root read from an index: an absolute local folder, or a URL of a remote store
    (URL_SCHEMES); never a command or a chained URL. UnsafePath naming `what` otherwise."""
    if not isinstance(root, str) or not root or "\x00" in root or len(root) > 4096:
        raise UnsafePath(f"{what}: {shown(root)} is not a gallery folder or URL")
    if is_command(root) or "::" in root:
        raise UnsafePath(f"{what}: {shown(root)} is a command, not a gallery folder or URL")
    if is_remote(root):
        scheme = root.split("://", 1)[0].lower()
        if scheme not in URL_SCHEMES:
            raise UnsafePath(f"{what}: {shown(root)}: {scheme}:// is not a gallery store "
                             f"({', '.join(URL_SCHEMES)})")
    elif not os.path.isabs(root):
        raise UnsafePath(f"{what}: {shown(root)} is not an absolute folder")
    return root


def _url_join(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel


# ----------------------------------------------------------------------------------- planning


def plan_gallery(source: str, split: str = "test", part_size: int = DEFAULT_PART_SIZE) -> Gallery:
    """The root and units of the gallery the user named (`--gallery`), in gallery order."""
    if is_command(source):
        raise RetrieveError(f"--gallery {source[:200]!r}: a command (pipe:) cannot be a gallery: the index would "
                            "have to run it again to show an image; give a folder, a dataset, a shard pattern or a URL")
    path = Path(source)
    if path.is_dir() and (path / schema.DATASET_FILE).exists():
        return _dataset_units(path.resolve(), split)
    if path.is_dir():
        return _folder_units(path.resolve(), part_size)
    if path.is_file() and path.suffix != ".tar":
        raise RetrieveError(f"--gallery {source}: a file, not a gallery: give a folder of images, a dataset folder, "
                            "or shards (.tar, or a pattern such as data/test/test-{000000..000003}.tar)")
    return _shard_units(source)


def _dataset_units(root: Path, split: str) -> Gallery:
    where = f"{root / schema.DATASET_FILE}"
    try:
        info = json.loads(read_regular(resolve_inside(root, schema.DATASET_FILE, where), where, MAX_DATASET_JSON))
        splits = info["splits"]
        shards = splits[split]["shards"] if split in splits else None
    except (ValueError, RecursionError, KeyError, TypeError) as e:
        raise RetrieveError(f"{where}: not a dataset description ({type(e).__name__}); rebuild the dataset") from None
    if shards is None:
        raise RetrieveError(f"--split {split!r}: the dataset {root} has the splits {', '.join(map(str, splits))}")
    units = []
    for i, s in enumerate(shards if isinstance(shards, list) else []):
        entry = f"{where}: entry splits.{split}.shards[{i}].name"
        name = check_relative(s.get("name") if isinstance(s, dict) else s, entry)
        rel = check_relative(f"{split}/{name}", entry)
        resolve_inside(root, rel, entry)
        samples = s.get("samples") if isinstance(s, dict) else None
        units.append(Unit(str(root), shard=rel, images=samples if isinstance(samples, int) and samples >= 0 else None))
    return Gallery(str(root), units)


def _folder_units(root: Path, part_size: int) -> Gallery:
    files, refused = [], []
    for folder, dirs, names in os.walk(root):  # (links to folders are not descended: os.walk's default)
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            why = _refusal(root, rel, path)
            if why:
                refused.append((rel, why))
            else:
                files.append(rel)
    return Gallery(str(root), [Unit(str(root), files=tuple(files[i:i + part_size]), images=len(files[i:i + part_size]))
                               for i in range(0, len(files), part_size)], refused)


def _refusal(root: Path, rel: str, path: str) -> str | None:
    """Why the builder would not take this file (None: it would)."""
    try:
        resolve_inside(root, rel, "gallery")
        st = os.stat(path)
    except UnsafePath:
        return "a link leaving the gallery"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size > MAX_IMAGE_BYTES:
        return f"larger than {MAX_IMAGE_BYTES >> 20} MiB"
    return None


def _shard_units(source: str) -> Gallery:
    from webdataset.shardlists import expand_urls

    urls = expand_urls(source)
    if not urls:
        raise RetrieveError(f"--gallery {source}: no shards")
    remote = [is_remote(u) for u in urls]
    if any(remote) != all(remote) or any(is_command(u) or "::" in u for u in urls):
        raise RetrieveError(f"--gallery {source}: shards must be all local files or all URLs of one store")
    if all(remote):
        root = os.path.commonprefix(urls)
        root = root[: root.rfind("/") + 1]
        check_root(root, f"--gallery {source}")
        if root.count("/") < 3:  # (scheme://host/ at least)
            raise RetrieveError(f"--gallery {source}: the shards must share a folder on one host")
        return Gallery(root, [Unit(root, shard=u[len(root):]) for u in urls])
    missing = [u for u in urls if not os.path.exists(u)]
    if missing:
        raise RetrieveError(f"--gallery {source}: no such folder or shard ({missing[0]}); give a dataset folder, "
                            "a shard pattern such as data/test/test-{000000..000003}.tar, or a folder of images")
    paths = [os.path.realpath(u) for u in urls]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return Gallery(root, [Unit(root, shard=os.path.relpath(p, root)) for p in paths])


def plan_digest(units: list[Unit]) -> str:
    """A fingerprint of a plan: two builds with the same digest embed the same images in the same order."""
    text = json.dumps([dataclasses.asdict(u) for u in units], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------- reading


def unit_items(unit: Unit) -> Iterator[Item]:
    """The images of a unit, in order. A folder file that cannot be read yields empty bytes (then
    counted as unreadable)."""
    if unit.shard is not None:
        url = _url_join(unit.root, unit.shard) if is_remote(unit.root) else os.path.join(unit.root, unit.shard)
        for sample in iter_shard(url):
            try:
                meta = json.loads(sample[schema.META_EXT])
            except (ValueError, RecursionError):
                meta = None
            meta = meta if isinstance(meta, dict) else {}
            pid, name = meta.get("pid"), meta.get("source")
            yield Item(name if isinstance(name, str) else sample["__key__"], image_member(sample),
                       pid if isinstance(pid, (int, str)) and not isinstance(pid, bool) else None,
                       {"shard": unit.shard, "key": sample["__key__"]})
        return
    for name in unit.files:
        try:
            data = read_regular(resolve_inside(unit.root, name, "gallery"), "gallery", MAX_IMAGE_BYTES)
        except (UnsafePath, OSError):
            data = b""
        yield Item(name, data, None, {"file": name})


def locator(item: dict) -> str:
    """An item's place as text: `cam1/0001.jpg`, or `test/test-000000.tar#0001`."""
    return item["file"] if "file" in item else f"{item['shard']}#{item['key']}"


def read_image(root: str, item: dict, what: str) -> bytes:
    """The encoded image of an indexed item (`{"file"}` or `{"shard", "key"}`, `sha256`), read
    inside the gallery's `root` only; GalleryChanged when its bytes are not the ones indexed.
    `what` names where the item was read from (a part file), for errors."""
    check_root(root, what)
    if "file" in item:
        rel = check_relative(item["file"], f"{what}: entry file")
        data = (_read_remote_file(root, rel) if is_remote(root)
                else read_regular(resolve_inside(root, rel, f"{what}: entry file"), what, MAX_IMAGE_BYTES))
    else:
        data = _read_member(root, item["shard"], item["key"], what)
    if hashlib.sha256(data).hexdigest() != item["sha256"]:
        raise GalleryChanged(f"{shown(item['name'])} changed since it was indexed (its bytes differ from the indexed "
                             f"image's sha256): the gallery {root} was modified; build the index again")
    return data


def _read_remote_file(root: str, rel: str) -> bytes:
    from ..data.locations import _open

    with _open(_url_join(root, rel)) as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise RetrieveError(f"{_url_join(root, rel)}: larger than {MAX_IMAGE_BYTES >> 20} MiB")
    return data


def _read_member(root: str, shard: str, key: str, what: str) -> bytes:
    rel = check_relative(shard, f"{what}: entry shard")
    if not isinstance(key, str) or not key or "\x00" in key or len(key) > 4096:
        raise UnsafePath(f"{what}: entry key {shown(key)} is not a sample key")
    if is_remote(root):
        url = _url_join(root, rel)
        for sample in iter_shard(url):
            if sample["__key__"] == key:
                return image_member(sample)
        raise RetrieveError(f"image {shown(key)} not found in {url}")
    path = resolve_inside(root, rel, f"{what}: entry shard")
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # (a FIFO would block the tar reader forever)
        raise UnsafePath(f"{what}: {path} is not a regular file")
    offset, size = _shard_members(str(path), st.st_size, st.st_mtime_ns).get(key, (None, None))
    if offset is None:
        raise RetrieveError(f"image {shown(key)} not found in {path}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(f"{what}: {path} is not a regular file")
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=64)
def _shard_members(path: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """{key: (offset, size)} of the images of a local shard (as of this size and mtime): a
    thumbnail is then one seek, not a scan of the shard. A key twice is refused (a scan would
    show the first, this index the last: never pick one silently); so is a member over 64 MiB."""
    members: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, "r:", tarinfo=BoundedTarInfo) as tar:  # (shards are plain tar)
            for m in tar:
                parts = split_member(m.name)
                if not (m.isfile() and parts and parts[1] in schema.IMAGE_EXTS):
                    continue
                if parts[0] in members:
                    raise RetrieveError(f"shard {path}: key {shown(parts[0])} appears twice; a gallery's keys "
                                        "must be unique: rebuild the shard")
                if m.size > MAX_IMAGE_BYTES:
                    raise RetrieveError(f"shard {path}: member {shown(m.name)} is larger than "
                                        f"{MAX_IMAGE_BYTES >> 20} MiB")
                members[parts[0]] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        raise RetrieveError(f"cannot read shard {path}: {e}") from None
    return members


# ----------------------------------------------------------------------------------- change


def stamp(root: str, items: list[dict]) -> str | None:
    """A cheap fingerprint of where a part's images live: the size and modification time of its
    shard, or of each of its files (no image is read). None for remote galleries and for parts
    whose files are gone (then the part's images are checked when read)."""
    if is_remote(root) or not items:
        return None
    places = sorted({it["shard"] for it in items if "shard" in it} | {it["file"] for it in items if "file" in it})
    h = hashlib.sha256()
    for rel in places:
        try:  # (no link resolution here: a stamp is cheap; reading an image resolves it inside the root)
            st = os.stat(os.path.join(root, check_relative(rel, "gallery")))
        except (UnsafePath, OSError):
            return "gone"
        h.update(f"{rel}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()

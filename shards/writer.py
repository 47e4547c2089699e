"""Writes records into the shard format of `shards.schema`, atomically, with nothing lost.

Every record read ends up either written (a sample in a shard and a manifest row) or in the
rejects file with its reason: written + rejected = read. Shards, the manifest and the rejects
file are written under a `.partial` name and renamed when complete; `dataset.json` is written
last, so a crashed build never looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from . import schema

SHARD_SAMPLES = 1000
"""Default most images per shard."""
SHARD_BYTES = 256 << 20
"""Default most image bytes per shard."""


@dataclasses.dataclass
class Record:
    """One input image with its captions, as a converter reads it from a raw dataset."""

    split: str
    pid: object  # the source dataset's person id (int or str)
    image_id: int
    captions: list
    source: str  # path relative to the raw dataset root
    image_bytes: bytes
    image_ext: str = "jpg"
    width: int | None = None  # set by a converter that already decoded the image (else the writer does)
    height: int | None = None


@dataclasses.dataclass
class Reject:
    """An input record that was read but not written, and why."""

    split: object
    source: object
    reason: str
    detail: str = ""


class BuildError(RuntimeError):
    """The input cannot be written as asked (e.g. train records not grouped by identity)."""


class StrictError(BuildError):
    """`--strict` and some records were rejected: no dataset.json was written."""

    def __init__(self, message: str, info: dict):
        super().__init__(message)
        self.info = info


class _ShardSink:
    """Writes one split's samples into size-limited shards, renaming each when complete."""

    def __init__(self, folder: Path, split: str, max_samples: int, max_bytes: int):
        self.folder, self.split = folder, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = self._captions = 0

    def _open(self) -> None:
        name = schema.shard_name(self.split, len(self.shards))
        self._path = self.folder / name
        self._tmp = self.folder / (name + schema.PARTIAL_SUFFIX)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = self._bytes = self._captions = 0

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        f = open(self._tmp, "rb+")
        os.fsync(f.fileno())
        f.close()
        os.replace(self._tmp, self._path)
        self.shards.append({"name": self._path.name, "samples": self._count,
                            "captions": self._captions, "bytes": self._path.stat().st_size})
        self._tar = None

    def fits(self, samples: int, nbytes: int) -> bool:
        """Whether a group of `samples` images / `nbytes` bytes still fits the open shard."""
        if self._tar is None or self._count == 0:
            return True
        return self._count + samples <= self.max_samples and self._bytes + nbytes <= self.max_bytes

    def write(self, key: str, image_ext: str, image_bytes: bytes, meta: dict) -> tuple[str, int, int]:
        """Add one sample; returns (shard name, byte offset of the sample, its size in the tar)."""
        if self._tar is None:
            self._open()
        start = self._tar.offset
        for name, data in ((f"{key}.{image_ext}", image_bytes),
                           (f"{key}.{schema.META_EXT}", json.dumps(meta, sort_keys=True).encode())):
            info = tarfile.TarInfo(name)  # fixed mtime/owner: same input -> same bytes
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._captions += len(meta["captions"])
        self._bytes += len(image_bytes)
        return self._path.name, start, self._tar.offset - start


def check_captions(captions) -> str | None:
    """None if `captions` is a non-empty list of non-empty strings, else what is wrong."""
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not captions:
        return "no captions"
    for c in captions:
        if not isinstance(c, str) or not c.strip():
            return f"empty or non-string caption: {c!r}"
    return None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes; raises if the image cannot be fully decoded."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes everything: catches truncated files, not only bad headers
        return im.size


class DatasetWriter:
    """Writes a dataset directory from records; see the module docstring for guarantees.

    Train records must arrive grouped by identity (all images of one pid in a row): an identity
    never spans two train shards, so identity-aware batches can be built from a stream and
    shard-level splitting keeps ranks identity-disjoint.
    """

    def __init__(self, out: str | os.PathLike, name: str, max_samples: int = SHARD_SAMPLES,
                 max_bytes: int = SHARD_BYTES, overwrite: bool = False, extra: dict | None = None):
        self.out = Path(out)
        self.name, self.extra = name, dict(extra or {})
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("shard limits must be positive (--shard-samples, --shard-bytes)")
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self._prepare_out(overwrite)
        self.sinks = {}
        for split in schema.SPLITS:
            (self.out / split).mkdir(parents=True, exist_ok=True)
            self.sinks[split] = _ShardSink(self.out / split, split, max_samples, max_bytes)
        self.rows: list[dict] = []
        self.rejects: list[Reject] = []
        self.read = 0
        self._pid_maps: dict[str, dict] = {s: {} for s in schema.SPLITS}
        self._seen_sources: set = set()
        self._pending: list[tuple[Record, int, int]] = []  # the current train identity
        self._pending_pid = None

    def _prepare_out(self, overwrite: bool) -> None:
        done = self.out / schema.DATASET_FILE
        if done.exists():
            if not overwrite:
                raise BuildError(f"{self.out} already holds a built dataset ({done}); "
                                 "pass --overwrite to rebuild it")
            done.unlink()  # first: a crash while rebuilding must not look complete
        # Whatever an earlier, unfinished build left behind is stale.
        for split in schema.SPLITS:
            for f in (self.out / split).glob(f"{split}-*.tar*") if (self.out / split).exists() else []:
                f.unlink()
        for f in (schema.MANIFEST_FILE, schema.REJECTS_FILE):
            for p in (self.out / f, self.out / (f + schema.PARTIAL_SUFFIX)):
                if p.exists():
                    p.unlink()

    # -- input ------------------------------------------------------------------------------

    def reject(self, split, source, reason: str, detail: str = "") -> None:
        """Record an input record that is not written (counted as read)."""
        self.read += 1
        self.rejects.append(Reject(split, source, reason, detail))

    def add(self, rec: Record) -> bool:
        """Validate and write one record (train: buffered per identity). False if rejected."""
        self.read += 1
        problem = None
        if rec.split not in schema.SPLITS:
            problem = ("unknown split", f"{rec.split!r} is not one of {', '.join(schema.SPLITS)}")
        elif rec.pid is None or rec.pid == "":
            problem = ("record without id", "")
        elif (why := check_captions(rec.captions)) is not None:
            problem = ("empty or non-string caption", why)
        elif rec.source in self._seen_sources:
            problem = ("duplicate image entry", f"{rec.source} listed more than once")
        if problem is None and rec.width is not None and rec.height is not None:
            width, height = rec.width, rec.height
        elif problem is None:
            try:
                width, height = image_size(rec.image_bytes)
            except Exception as e:  # noqa: BLE001 - any decoder error means unreadable
                problem = ("unreadable or truncated image", f"{type(e).__name__}: {e}")
        if problem is not None:
            self.rejects.append(Reject(rec.split, rec.source, *problem))
            return False
        self._seen_sources.add(rec.source)
        if isinstance(rec.captions, str):
            rec.captions = [rec.captions]
        if rec.split == "train":
            if rec.pid != self._pending_pid:
                self._flush_identity()
                if rec.pid in self._pid_maps["train"]:
                    raise BuildError(f"train records must arrive grouped by identity: pid {rec.pid!r} "
                                     f"reappeared after other identities (source {rec.source})")
                self._pending_pid = rec.pid
            self._pending.append((rec, width, height))
        else:
            self._write(rec, width, height)
        return True

    def _flush_identity(self) -> None:
        if not self._pending:
            return
        sink = self.sinks["train"]
        nbytes = sum(len(r.image_bytes) for r, _, _ in self._pending)
        if not sink.fits(len(self._pending), nbytes):
            sink.close_shard()
        for rec, w, h in self._pending:
            self._write(rec, w, h)
        self._pending = []

    def _write(self, rec: Record, width: int, height: int) -> None:
        pids = self._pid_maps[rec.split]
        pid = pids.setdefault(rec.pid, len(pids))
        sink = self.sinks[rec.split]
        if rec.split != "train" and not sink.fits(1, len(rec.image_bytes)):
            sink.close_shard()
        key = schema.sample_key(rec.image_id)
        meta = {"pid": pid, "image_id": rec.image_id, "captions": list(rec.captions), "source": rec.source}
        shard, offset, size = sink.write(key, rec.image_ext, rec.image_bytes, meta)
        self.rows.append({
            "split": rec.split, "shard": shard, "key": key, "pid": pid, "orig_pid": str(rec.pid),
            "image_id": rec.image_id, "captions": list(rec.captions), "width": width, "height": height,
            "sha256": hashlib.sha256(rec.image_bytes).hexdigest(), "source": rec.source,
            "num_captions": len(rec.captions), "offset": offset, "size": size,
        })

    # -- output -----------------------------------------------------------------------------

    def close(self, strict: bool = False) -> dict:
        """Finish every shard, write manifest, rejects and (last) dataset.json; return the latter.
        With `strict`, any reject raises StrictError instead of writing dataset.json."""
        self._flush_identity()
        for sink in self.sinks.values():
            sink.close_shard()
        table = pa.Table.from_pylist(self.rows, schema=pa.schema([
            ("split", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("pid", pa.int64()),
            ("orig_pid", pa.string()), ("image_id", pa.int64()), ("captions", pa.list_(pa.string())),
            ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("source", pa.string()),
            ("num_captions", pa.int32()), ("offset", pa.int64()), ("size", pa.int64()),
        ]))
        assert tuple(table.column_names) == schema.MANIFEST_COLUMNS
        table = table.replace_schema_metadata({schema.MANIFEST_VERSION_KEY: str(schema.SCHEMA_VERSION).encode()})
        # (row groups of 16k rows in shard order: a reader of a few shards reads a few groups)
        self._write_atomic(schema.MANIFEST_FILE, lambda p: pq.write_table(table, p, row_group_size=16384))
        self._write_atomic(schema.REJECTS_FILE, lambda p: Path(p).write_text(
            "".join(json.dumps(dataclasses.asdict(r), default=str) + "\n" for r in self.rejects)))
        info = self.summary()
        if strict and self.rejects:
            raise StrictError(f"--strict: {len(self.rejects)} of {self.read} records rejected (see "
                              f"{self.out / schema.REJECTS_FILE}); no dataset.json written", info)
        self._write_atomic(schema.DATASET_FILE, lambda p: Path(p).write_text(json.dumps(info, indent=2) + "\n"))
        return info

    def _write_atomic(self, name: str, write) -> None:
        tmp = self.out / (name + schema.PARTIAL_SUFFIX)
        write(tmp)
        os.replace(tmp, self.out / name)

    def content_digest(self) -> str:
        """A digest of what was written (every sample's split, shard, key and image digest, in
        order): two builds of other images never share it, whatever their sizes."""
        h = hashlib.sha256()
        for r in self.rows:
            h.update(f"{r['split']}/{r['shard']}/{r['key']}/{r['sha256']}\n".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        splits = {}
        for split in schema.SPLITS:
            rows = [r for r in self.rows if r["split"] == split]
            splits[split] = {
                "images": len(rows),
                "captions": sum(len(r["captions"]) for r in rows),
                "identities": len({r["pid"] for r in rows}),
                "shards": self.sinks[split].shards,
            }
        return {
            "name": self.name,
            "schema_version": schema.SCHEMA_VERSION,
            "content_sha256": self.content_digest(),
            "splits": splits,
            "train_identities": splits["train"]["identities"],
            "read": self.read,
            "written": len(self.rows),
            "rejected": len(self.rejects),
            "rejected_by_reason": dict(Counter(r.reason for r in self.rejects)),
            **self.extra,
        }


def write_dataset(records: Iterable[Record], out, name: str, *, total: int | None = None,
                  progress: bool = True, strict: bool = False, **writer_args) -> dict:
    """Write all `records` (a converter's output) to `out`; returns the dataset.json dict."""
    from tqdm import tqdm

    writer = DatasetWriter(out, name, **writer_args)
    for rec in tqdm(records, total=total, desc=f"writing {name}", unit="img", disable=not progress):
        if isinstance(rec, Reject):
            writer.reject(rec.split, rec.source, rec.reason, rec.detail)
        else:
            writer.add(rec)
    return writer.close(strict)


def summary_table(info: dict) -> str:
    """A plain-text table of a dataset.json dict: per split counts, then rejects by reason."""
    lines = [f"{'split':<6} {'images':>8} {'captions':>9} {'ids':>6} {'shards':>7} {'MB':>8}"]
    for split, s in info["splits"].items():
        mb = sum(sh["bytes"] for sh in s["shards"]) / 1e6
        lines.append(f"{split:<6} {s['images']:>8} {s['captions']:>9} {s['identities']:>6} "
                     f"{len(s['shards']):>7} {mb:>8.2f}")
    lines.append(f"read {info['read']} = written {info['written']} + rejected {info['rejected']}")
    for reason, n in sorted(info["rejected_by_reason"].items()):
        lines.append(f"  rejected: {reason}: {n}")
    return "\n".join(lines)

"""Writes records into the shard format of `shards.schema`, as one transaction, with nothing lost.

Every record read ends up either written (a sample in a shard and a manifest row) or in the
rejects file with its reason: written + rejected = read. Every record is checked before it is
trusted (`shards.validate`: types, sizes, text; then duplicates, identity-disjoint splits, the
image decoded and, where readers need it, converted by `shards.imaging.prepare_image`).

A build is a transaction on its output folder (`shards.transaction`): it holds a lock, writes
into a sibling work folder and replaces the old dataset only when the new one is complete and
accepted by the reject policy (`DatasetWriter.close`). A build that fails, is refused or is
killed leaves the output folder as it was.
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
from . import schema
from .errors import BuildError, RejectsError
from .imaging import failure_reason, prepare_image
from .transaction import OutputTransaction
from .validate import bounded, check_fields, pid_key

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
    width: int | None = None  # set by a converter that already prepared the image (else the writer does)
    height: int | None = None
    converted: str = ""  # how a converter re-encoded the image ("" when stored as it came)


@dataclasses.dataclass
class Reject:
    """An input record that was read but not written, and why."""

    split: object
    source: object
    reason: str
    detail: str = ""


MANIFEST_SCHEMA = pa.schema([
    ("split", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("pid", pa.int64()),
    ("orig_pid", pa.string()), ("image_id", pa.int64()), ("captions", pa.list_(pa.string())),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("source", pa.string()),
    ("num_captions", pa.int32()), ("offset", pa.int64()), ("size", pa.int64()),
], metadata={schema.MANIFEST_VERSION_KEY: str(schema.SCHEMA_VERSION).encode()})
"""The manifest's Arrow schema (columns of `shards.schema.MANIFEST_COLUMNS`, version in its metadata)."""
assert tuple(MANIFEST_SCHEMA.names) == schema.MANIFEST_COLUMNS
MANIFEST_ROW_GROUP = 16384
"""Manifest rows per Parquet row group, in shard order: a reader of a few shards reads a few groups."""


class ShardSink:
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

    def discard(self) -> None:
        """Close the open shard without keeping it (the build is given up)."""
        if self._tar is not None:
            try:
                self._tar.close()
            except OSError:
                pass
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


MAJORITY = 0.5
"""A build fails (unless `allow_rejects`) when one reason rejects more than this share of the
records read: the input is then likely wrong as a whole (paths relative to the wrong folder, the
wrong annotation file), not record by record."""


def _label(value, limit: int = 1000) -> str:
    """A split or source as rejects.jsonl records it: the text, or a bounded repr of anything else."""
    if value is None or (isinstance(value, str) and len(value) <= limit):
        return value
    return bounded(value)


class DatasetWriter:
    """Writes a dataset directory from records; see the module docstring for guarantees.

    Train records must arrive grouped by identity (all images of one pid in a row): an identity
    never spans two train shards, so identity-aware batches can be built from a stream and
    shard-level splitting keeps ranks identity-disjoint.

    Use as a context manager (or call `abort` on failure): leaving the block by an exception
    removes the work folder and releases the lock. `close` commits.
    """

    def __init__(self, out: str | os.PathLike, name: str, max_samples: int = SHARD_SAMPLES,
                 max_bytes: int = SHARD_BYTES, overwrite: bool = False, extra: dict | None = None):
        self.name, self.extra = name, dict(extra or {})
        for flag, value in (("--shard-samples", max_samples), ("--shard-bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BuildError(f"{flag}: must be a positive integer, got {bounded(value)}")
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.txn = OutputTransaction(out, overwrite)
        self.out = self.txn.out  # where the dataset will be
        self.work = self.txn.work  # where it is written until it is complete
        self.sinks = {}
        try:
            for split in schema.SPLITS:
                (self.work / split).mkdir()
                self.sinks[split] = ShardSink(self.work / split, split, max_samples, max_bytes)
        except BaseException:
            self.txn.abort()
            raise
        self.rows: list[dict] = []
        self.rejects: list[Reject] = []
        self.read = 0
        self.converted: Counter = Counter()
        self._pid_maps: dict[str, dict] = {s: {} for s in schema.SPLITS}
        self._split_of: dict[str, str] = {}  # identity -> the split it was written in
        self._seen_sources: dict[str, int] = {}  # normalised source -> image id
        self._seen_ids: set[int] = set()
        self._pending: list[tuple[Record, int, int]] = []  # the current train identity
        self._pending_pid = None

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.abort()

    def abort(self) -> None:
        """Give up: remove what was written, release the output folder (left as it was)."""
        for sink in self.sinks.values():
            sink.discard()
        self.txn.abort()

    # -- input ------------------------------------------------------------------------------

    def reject(self, split, source, reason: str, detail: str = "") -> None:
        """Record an input record that is not written (counted as read)."""
        self.read += 1
        self.rejects.append(Reject(_label(split), _label(source), reason, detail))

    def _problem(self, rec: Record) -> tuple[str, str] | None:
        problem = check_fields(rec.split, rec.pid, rec.captions)
        if problem is not None:
            return problem
        if not isinstance(rec.source, str) or not rec.source or "\x00" in rec.source:
            return "malformed record", f"source must be a path, got {bounded(rec.source)}"
        if isinstance(rec.image_id, bool) or not isinstance(rec.image_id, int) or rec.image_id < 0:
            return "malformed record", f"image_id must be an integer >= 0, got {bounded(rec.image_id)}"
        if rec.image_id in self._seen_ids:
            return "malformed record", f"image_id {rec.image_id} is used by another record"
        source = os.path.normpath(rec.source)
        if source in self._seen_sources:
            return "duplicate image entry", (f"{source} listed more than once (written as image "
                                             f"{self._seen_sources[source]})")
        first = self._split_of.get(pid_key(rec.pid))
        if first is not None and first != rec.split:
            return "identity in two splits", (f"pid {bounded(rec.pid)} is already in {first}; splits must be "
                                              "identity-disjoint")
        if not isinstance(rec.image_bytes, (bytes, bytearray)):
            return "malformed record", f"image_bytes must be bytes, got {type(rec.image_bytes).__name__}"
        return None

    def add(self, rec: Record) -> bool:
        """Validate and write one record (train: buffered per identity). False if rejected."""
        self.read += 1
        problem = self._problem(rec)
        if problem is None and (rec.width is None or rec.height is None):
            try:  # decode everything; re-encode what readers cannot decode as it is
                prepared = prepare_image(bytes(rec.image_bytes))
            except Exception as e:  # noqa: BLE001 - any decoder error means unreadable
                problem = failure_reason(e)
            else:
                rec.image_bytes, rec.image_ext = prepared.data, prepared.ext
                rec.width, rec.height, rec.converted = prepared.width, prepared.height, prepared.converted
        if problem is None and rec.image_ext not in schema.IMAGE_EXTS:
            problem = ("unsupported image format", f"{bounded(rec.image_ext)} is not one of "
                                                   f"{', '.join(schema.IMAGE_EXTS)}")
        if problem is not None:
            self.rejects.append(Reject(_label(rec.split), _label(rec.source), *problem))
            return False
        rec.source = os.path.normpath(rec.source)
        self._seen_sources[rec.source] = rec.image_id
        self._seen_ids.add(rec.image_id)
        if isinstance(rec.captions, str):
            rec.captions = [rec.captions]
        key = pid_key(rec.pid)
        self._split_of.setdefault(key, rec.split)
        if rec.converted:
            self.converted[rec.converted] += 1
        if rec.split == "train":
            if key != self._pending_pid:
                self._flush_identity()
                if key in self._pid_maps["train"]:
                    raise BuildError(f"train records must arrive grouped by identity: pid {bounded(rec.pid)} "
                                     f"reappeared after other identities (source {rec.source})")
                self._pending_pid = key
            self._pending.append((rec, rec.width, rec.height))
        else:
            self._write(rec, rec.width, rec.height)
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
        key = pid_key(rec.pid)
        pids = self._pid_maps[rec.split]
        pid = pids.setdefault(key, len(pids))
        sink = self.sinks[rec.split]
        if rec.split != "train" and not sink.fits(1, len(rec.image_bytes)):
            sink.close_shard()
        sample = schema.sample_key(rec.image_id)
        meta = {"pid": pid, "image_id": rec.image_id, "captions": list(rec.captions), "source": rec.source}
        shard, offset, size = sink.write(sample, rec.image_ext, rec.image_bytes, meta)
        self.rows.append({
            "split": rec.split, "shard": shard, "key": sample, "pid": pid, "orig_pid": key,
            "image_id": rec.image_id, "captions": list(rec.captions), "width": width, "height": height,
            "sha256": hashlib.sha256(rec.image_bytes).hexdigest(), "source": rec.source,
            "num_captions": len(rec.captions), "offset": offset, "size": size,
        })

    # -- output -----------------------------------------------------------------------------

    def close(self, strict: bool = False, allow_rejects: bool = False, explain=None) -> dict:
        """Finish every shard, write manifest, rejects and (last) dataset.json, and put the new
        dataset in place of the old one; return dataset.json's dict.

        Raises RejectsError, writing nothing (the rejects file is kept beside the output folder,
        `<out>.rejects.jsonl`), when nothing was written, when `strict` and any record was
        rejected, or, unless `allow_rejects`, when one reason rejected more than MAJORITY of the
        records read. `explain(reason)` may add a hint about the likely cause to that message."""
        try:
            self._flush_identity()
            for sink in self.sinks.values():
                sink.close_shard()
            table = pa.Table.from_pylist(self.rows, schema=MANIFEST_SCHEMA)
            self._write_atomic(schema.MANIFEST_FILE, lambda p: pq.write_table(table, p, row_group_size=MANIFEST_ROW_GROUP))
            self._write_atomic(schema.REJECTS_FILE, lambda p: Path(p).write_text(
                "".join(json.dumps(dataclasses.asdict(r), default=str) + "\n" for r in self.rejects)))
            info = self.summary()
            refusal = self.refusal(info, strict, allow_rejects, explain)
            if refusal is not None:
                kept = self.txn.keep_rejects(self.work / schema.REJECTS_FILE)
                state = f"{self.out} left as it was" if self.out.exists() else f"{self.out} not created"
                raise RejectsError(f"{refusal}; no dataset written ({state}); every reject is listed in {kept}", info)
            self._write_atomic(schema.DATASET_FILE, lambda p: Path(p).write_text(json.dumps(info, indent=2) + "\n"))
            self.txn.commit()
        except BaseException:
            self.abort()
            raise
        return info

    def refusal(self, info: dict, strict: bool, allow_rejects: bool, explain=None) -> str | None:
        """Why the reject policy refuses this build (see `close`), or None."""
        def example(reason: str) -> str:
            r = next(r for r in self.rejects if r.reason == reason)
            hint = explain(reason) if explain else ""
            return f" (e.g. {bounded(r.source)}: {r.detail or reason})" + (f"; {hint}" if hint else "")

        return reject_policy(info, strict, allow_rejects, example)

    def _write_atomic(self, name: str, write) -> None:
        tmp = self.work / (name + schema.PARTIAL_SUFFIX)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.work / name)

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
            "converted_images": dict(self.converted),
            **self.extra,
        }


def reject_policy(info: dict, strict: bool, allow_rejects: bool, example) -> str | None:
    """Why the reject policy refuses a build summarised by `info` (a dataset.json dict), or None:
    nothing written, any reject with `strict`, or (unless `allow_rejects`) one reason rejecting more
    than MAJORITY of the records read. `example(reason)` is a " (e.g. ...)" text for a reason."""
    read, rejected, by_reason = info["read"], info["rejected"], info["rejected_by_reason"]
    if read == 0:
        return "no records to write: the input is empty"
    top, n = max(by_reason.items(), key=lambda kv: kv[1]) if by_reason else ("", 0)
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1]))
    if info["written"] == 0:
        what = f"{top}" if len(by_reason) == 1 else f"{reasons}"
        return f"all {read} records rejected: {what}{example(top)}"
    if strict and rejected:
        return f"--strict: {rejected} of {read} records rejected ({reasons}){example(top)}"
    if not allow_rejects and n > MAJORITY * read:
        return (f"{n} of {read} records rejected for one reason, {top}{example(top)}: more than half of the "
                "input, which is likely wrong as a whole (pass --allow-rejects to write the other "
                f"{info['written']} records anyway)")
    return None


def feed(writer: DatasetWriter, records: Iterable, *, total: int | None = None, progress: bool = True) -> None:
    """Give every record (or Reject) of `records` to `writer`, with a progress bar."""
    from tqdm import tqdm

    for rec in tqdm(records, total=total, desc=f"writing {writer.name}", unit="img", disable=not progress):
        if isinstance(rec, Reject):
            writer.reject(rec.split, rec.source, rec.reason, rec.detail)
        else:
            writer.add(rec)


def write_dataset(records: Iterable[Record], out, name: str, *, total: int | None = None,
                  progress: bool = True, strict: bool = False, allow_rejects: bool = False, explain=None,
                  **writer_args) -> dict:
    """Write all `records` (a converter's output) to `out`; returns the dataset.json dict. On any
    failure `out` is left as it was."""
    with DatasetWriter(out, name, **writer_args) as writer:
        feed(writer, records, total=total, progress=progress)
        return writer.close(strict, allow_rejects, explain)


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
    for what, n in sorted(info.get("converted_images", {}).items()):
        lines.append(f"  converted: {what}: {n}")
    return "\n".join(lines)

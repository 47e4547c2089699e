"""Building a dataset from a pre-training corpus at corpus scale: plan, convert chunks, merge.

    convert_corpus(...)   on one machine: plan (or resume), convert the missing chunks with
                          `workers` processes, merge and commit
    plan_corpus(...)      the plan only (`launch/convert.py` then converts chunks i::N in a SLURM
    merge_corpus(...)     array and merges in a dependent job)

The merge is cheap and deterministic: the chunks' train shards are hard-linked into the new
dataset under global names (train-000000.tar, ... in chunk order: same file system, no copy), their
manifest rows streamed into manifest.parquet in that order with the new shard names, the val
samples (a small capped split) re-packed into full-size val shards, the rejects concatenated, and
dataset.json written last; the dataset is committed as every build is (`shards.transaction`: locked,
written aside, swapped in whole) and only then is the conversion's work folder removed. Nothing
depends on how many workers or nodes converted the chunks: the same plan gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema
from .chunking import (CHUNK_SIZE, VAL_FRACTION, VAL_MAX_IDENTITIES, Settings, check_work_folder, chunk_dir,
                       chunk_done, file_stamps, load_plan, prepare, work_folder)
from .chunks import convert_chunks
from .converters import check_options, missing_files_hint
from .corpora import CORPORA, annotation_files
from .errors import BuildError, BuildFailed, ConvertError, RejectsError
from .transaction import OutputTransaction, fsync_path
from .validate import bounded
from .writer import MANIFEST_ROW_GROUP, MANIFEST_SCHEMA, SHARD_BYTES, SHARD_SAMPLES, ShardSink, reject_policy

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CorpusOptions:
    """How a corpus is converted (the `itself-shards build` flags of the corpora)."""

    annotations: str | None = None
    """An annotation file or folder, when not where the release puts it."""
    resize: tuple[int, int] | None = None
    """Store images pre-resized to (H, W)."""
    chunk_size: int = CHUNK_SIZE
    """Records per chunk: the unit of work, parallelism and resuming."""
    val_fraction: float = VAL_FRACTION
    """Share of identities held out as val."""
    val_max_identities: int = VAL_MAX_IDENTITIES
    """At most this many val identities."""
    seed: int = 0
    """Chooses the val identities."""
    max_samples: int = SHARD_SAMPLES
    max_bytes: int = SHARD_BYTES
    name: str = ""
    """The dataset's name in dataset.json (default: the corpus's)."""
    extra: dict = dataclasses.field(default_factory=dict)
    """More builder facts for dataset.json (e.g. how a generated corpus was made)."""


def settings_of(dataset: str, root, options: CorpusOptions) -> tuple[Settings, list[Path]]:
    """The conversion's settings and annotation files; BuildError when they cannot be used."""
    if dataset not in CORPORA:
        raise BuildError(f"unknown corpus {dataset!r}: one of {', '.join(CORPORA)}")
    check_options(options.resize, None, options.val_fraction)
    for flag, value, lo in (("--chunk-size", options.chunk_size, 1), ("--val-max-identities", options.val_max_identities, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise BuildError(f"{flag}: must be an integer >= {lo}, got {bounded(value)}")
    root = Path(root)
    if not root.is_dir():
        raise ConvertError(f"--root {root}: not a directory")
    files = annotation_files(dataset, root, options.annotations)
    settings = Settings(dataset=dataset, root=os.path.realpath(root), annotations=file_stamps(files),
                        chunk_size=options.chunk_size, val_fraction=float(options.val_fraction),
                        val_max_identities=options.val_max_identities, seed=options.seed,
                        resize=tuple(options.resize) if options.resize else None, max_samples=options.max_samples,
                        max_bytes=options.max_bytes, name=options.name or dataset, extra=dict(options.extra))
    return settings, files


def _start(dataset: str, root, out, options: CorpusOptions, overwrite: bool, progress: bool):
    """Lock `out` and make (or resume) the plan: (transaction, work folder, plan)."""
    settings, files = settings_of(dataset, root, options)
    txn = OutputTransaction(out, overwrite)
    started = time.perf_counter()
    try:
        work = work_folder(txn.out)
        plan = prepare(work, settings, files, progress)
    except BaseException:
        txn.abort()
        raise
    done = sum(chunk_done(work, i) for i in range(len(plan["chunks"])))
    if done:
        log.info("resuming: %d of %d chunks already converted (%s)", done, len(plan["chunks"]), work)
    else:
        log.info("planned %d records into %d chunks in %.1f s", plan["read"], len(plan["chunks"]),
                 time.perf_counter() - started)
    return txn, work, plan


def convert_corpus(dataset: str, root, out, options: CorpusOptions | None = None, *, workers: int | None = None,
                   strict: bool = False, allow_rejects: bool = False, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Convert a corpus into a dataset at `out` on this machine; returns the dataset.json dict.
    A conversion that fails or is killed keeps its plan and finished chunks beside `out`: the same
    call again converts only the rest. Raises as `shards.converters.convert` does."""
    options = options or CorpusOptions()
    check_options(None, workers, options.val_fraction)
    begun = time.perf_counter()
    txn, work, plan = _start(dataset, root, out, options, overwrite, progress)
    try:
        todo = [i for i in range(len(plan["chunks"])) if not chunk_done(work, i)]
        workers = workers or os.cpu_count() or 1
        started = time.perf_counter()
        images = convert_chunks(work, todo, workers, progress)
        log.info("converted %d chunks (%d records) in %.1f s with %d processes", len(todo), images,
                 time.perf_counter() - started, workers)
        started = time.perf_counter()
        info = _merge(work, txn, plan, strict, allow_rejects)
        log.info("merged %d chunks in %.1f s", len(plan["chunks"]), time.perf_counter() - started)
        info["images_per_s"] = info["read"] / max(time.perf_counter() - begun, 1e-9)  # (not in dataset.json)
        return info
    except BaseException:
        txn.abort()
        raise


def plan_corpus(dataset: str, root, out, options: CorpusOptions | None = None, *, overwrite: bool = False,
                progress: bool = True) -> tuple[Path, dict]:
    """Make (or find) the plan of a conversion without converting: (work folder, plan)."""
    txn, work, plan = _start(dataset, root, out, options or CorpusOptions(), overwrite, progress)
    txn.abort()  # (nothing written: the lock is released for the tasks and the merge)
    return work, plan


def merge_corpus(out, *, strict: bool = False, allow_rejects: bool = False, overwrite: bool = False) -> dict:
    """Merge the converted chunks of `out`'s conversion into the dataset and commit it."""
    txn = OutputTransaction(out, overwrite)
    try:
        work = work_folder(txn.out)
        check_work_folder(work)
        plan = load_plan(work)
        if plan is None:
            raise BuildError(f"{work} holds no conversion plan: nothing to merge")
        return _merge(work, txn, plan, strict, allow_rejects)
    except BaseException:
        txn.abort()
        raise


# ---------------------------------------------------------------------------------- merge


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:  # a file system without hard links: copy
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        shutil.copyfile(src, dst)


class _Manifest:
    """manifest.parquet written row group by row group (MANIFEST_ROW_GROUP rows, in shard order),
    with the content digest and per-split caption counts on the way."""

    def __init__(self, path: Path):
        self.path = path
        self.writer = pq.ParquetWriter(path, MANIFEST_SCHEMA)
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.digest = hashlib.sha256()

    def add(self, table: pa.Table) -> None:
        for split, shard, key, sha in zip(*(table.column(c).to_pylist() for c in ("split", "shard", "key", "sha256"))):
            self.digest.update(f"{split}/{shard}/{key}/{sha}\n".encode())
        self.pending.append(table)
        self.rows += table.num_rows
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self.pending) if self.pending else None
        while table is not None and (table.num_rows >= MANIFEST_ROW_GROUP or (final and table.num_rows)):
            self.writer.write_table(table.slice(0, MANIFEST_ROW_GROUP), row_group_size=MANIFEST_ROW_GROUP)
            table = table.slice(MANIFEST_ROW_GROUP)
        self.pending = [table] if table is not None and table.num_rows else []

    def close(self) -> None:
        self._flush(final=True)
        self.writer.close()
        fsync_path(self.path)


def _sample(path: Path, offset: int, size: int) -> dict[str, bytes]:
    """The members ({extension: bytes}) of the sample at [offset, offset + size) of a shard."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            members[m.name.split(".", 1)[1]] = tar.extractfile(m).read()
    return members


def _check_chunk_shard(folder: Path, shard, work: Path, split: str) -> str:
    """The name of a `split` shard a chunk lists (`shard`: its entry), once known to be one a
    conversion writes in a chunk folder, there as a regular file (never a path, nor a link, to
    something else); BuildError otherwise."""
    name = shard.get("name") if isinstance(shard, dict) else shard
    ok = isinstance(name, str) and re.fullmatch(rf"{split}-\d{{6}}\.tar", name) is not None
    if ok:
        try:
            ok = stat.S_ISREG(os.lstat(folder / name).st_mode)
        except OSError:
            ok = False
    if not ok:
        raise BuildError(f"{folder}: {split} shard {bounded(name)} is not a file a conversion writes there; "
                         f"remove {work} to start over")
    return name


def _train(work: Path, plan: dict, into: Path, manifest: _Manifest) -> dict:
    shards, images, captions, identities = [], 0, 0, 0
    for i in range(len(plan["chunks"])):
        folder, info = chunk_dir(work, i), json.loads((chunk_dir(work, i) / "chunk.json").read_text())
        names = {}
        for sh in info["splits"]["train"]["shards"]:
            _check_chunk_shard(folder, sh, work, "train")
            names[sh["name"]] = schema.shard_name("train", len(shards))
            _link(folder / sh["name"], into / names[sh["name"]])
            shards.append({**sh, "name": names[sh["name"]]})
        rows = pq.read_table(folder / "rows.parquet")
        rows = rows.filter(pc.equal(rows["split"], "train"))
        if rows.num_rows:
            renamed = pa.array([names[n] for n in rows["shard"].to_pylist()], pa.string())
            manifest.add(rows.set_column(rows.schema.get_field_index("shard"), "shard", renamed))
        s = info["splits"]["train"]
        images, captions, identities = images + s["images"], captions + s["captions"], identities + s["identities"]
    return {"images": images, "captions": captions, "identities": identities, "shards": shards}


def _val(work: Path, plan: dict, into: Path, manifest: _Manifest) -> dict:
    s = plan["settings"]
    sink = ShardSink(into, "val", s["max_samples"], s["max_bytes"])
    images = captions = identities = 0
    for i in range(len(plan["chunks"])):
        folder = chunk_dir(work, i)
        identities += json.loads((folder / "chunk.json").read_text())["splits"]["val"]["identities"]
        rows = pq.read_table(folder / "rows.parquet")
        rows = rows.filter(pc.equal(rows["split"], "val")).to_pylist()
        for name in {row["shard"] for row in rows}:
            _check_chunk_shard(folder, name, work, "val")
        for row in rows:
            members = _sample(folder / row["shard"], row["offset"], row["size"])
            meta = json.loads(members.pop(schema.META_EXT))
            (ext, image), = members.items()
            if not sink.fits(1, len(image)):
                sink.close_shard()
            row["shard"], row["offset"], row["size"] = sink.write(row["key"], ext, image, meta)
            images, captions = images + 1, captions + row["num_captions"]
        if rows:
            manifest.add(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    sink.close_shard()
    return {"images": images, "captions": captions, "identities": identities, "shards": sink.shards}


def _rejects(work: Path, plan: dict, path: Path) -> tuple[Counter, dict, list]:
    """Concatenate the plan's and the chunks' rejects into `path`: (counts by reason, the first
    reject of each reason, a sample of sources of missing image files)."""
    counts, first, missing = Counter(), {}, []
    parts = [work / "plan" / "rejects.jsonl", *(chunk_dir(work, i) / "rejects.jsonl" for i in range(len(plan["chunks"])))]
    with open(path, "w") as out:
        for part in parts:
            with open(part) as f:
                for line in f:
                    r = json.loads(line)
                    counts[r["reason"]] += 1
                    first.setdefault(r["reason"], r)
                    if r["reason"] == "missing image file" and r["detail"].endswith("not found") and len(missing) < 50:
                        missing.append(r["source"])
                    out.write(line)
        out.flush()
        os.fsync(out.fileno())
    return counts, first, missing


def _merge(work: Path, txn: OutputTransaction, plan: dict, strict: bool, allow_rejects: bool) -> dict:
    n = len(plan["chunks"])
    missing = [i for i in range(n) if not chunk_done(work, i)]
    if missing:
        raise BuildFailed(f"{len(missing)} of {n} chunks are not converted (e.g. chunk {missing[0]}: a task failed "
                          f"or was killed); they are converted by the same command again, which keeps the others")
    for split in schema.SPLITS:
        (txn.work / split).mkdir()
    manifest = _Manifest(txn.work / (schema.MANIFEST_FILE + schema.PARTIAL_SUFFIX))
    splits = {"train": _train(work, plan, txn.work / "train", manifest),
              "val": _val(work, plan, txn.work / "val", manifest),
              "test": {"images": 0, "captions": 0, "identities": 0, "shards": []}}
    manifest.close()
    os.replace(manifest.path, txn.work / schema.MANIFEST_FILE)
    counts, first, missing_sources = _rejects(work, plan, txn.work / schema.REJECTS_FILE)
    chunk_infos = [json.loads((chunk_dir(work, i) / "chunk.json").read_text()) for i in range(n)]
    converted = sum((Counter(c["converted_images"]) for c in chunk_infos), Counter())
    s = plan["settings"]
    info = {
        "name": s["name"], "schema_version": schema.SCHEMA_VERSION, "content_sha256": manifest.digest.hexdigest(),
        "splits": splits, "train_identities": plan["train_identities"], "read": plan["read"],
        "written": manifest.rows, "rejected": sum(counts.values()), "rejected_by_reason": dict(counts),
        "converted_images": dict(converted),
        "builder": {"dataset": s["dataset"], "root": s["root"],
                    "annotations": [os.path.relpath(a[0], s["root"]) for a in s["annotations"]], **s["extra"]},
        "resized": s["resize"], "identities": plan["identities"], "val_policy": plan["val_policy"],
        "conversion": {"chunk_size": s["chunk_size"], "chunks": n,
                       "train_labels": "fixed by the plan; a train identity whose every image was rejected leaves "
                                       "its label unused (train_identities counts labels)"},
    }
    if info["read"] != info["written"] + info["rejected"]:  # (chunks that are not this plan's)
        raise BuildError(f"{work}: its chunks account for {info['written']} written + {info['rejected']} rejected records, "
                         f"its plan for {info['read']} read: they are not one conversion's; remove {work} to start over")

    def example(reason: str) -> str:
        r = first[reason]
        hint = ""
        if reason == "missing image file" and missing_sources:
            root = Path(s["root"])
            hint = "; " + missing_files_hint(root, root, Path(s["annotations"][0][0]), missing_sources)
        return f" (e.g. {bounded(r['source'])}: {r['detail'] or reason})" + hint

    refusal = reject_policy(info, strict, allow_rejects, example)
    if refusal is not None:
        kept = txn.keep_rejects(txn.work / schema.REJECTS_FILE)
        state = f"{txn.out} left as it was" if txn.out.exists() else f"{txn.out} not created"
        raise RejectsError(f"{refusal}; no dataset written ({state}); every reject is listed in {kept}; the converted "
                           f"chunks are kept in {work}: the same command (with --allow-rejects) writes the dataset "
                           "without converting again", info)
    partial = txn.work / (schema.DATASET_FILE + schema.PARTIAL_SUFFIX)
    with open(partial, "w") as f:
        f.write(json.dumps(info, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, txn.work / schema.DATASET_FILE)
    txn.commit()
    shutil.rmtree(work, ignore_errors=True)
    return info

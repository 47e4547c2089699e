"""Converting the chunks of a corpus plan (`shards.chunking`): each on its own, anywhere.

A chunk's records are read from its plan file; each image is read (a file under the root, or its
bytes from the corpus's Parquet file: only the row groups holding the chunk's rows, a batch at a
time), checked, fully decoded and prepared (`shards.imaging.prepare_image`: converted where
readers need it, optionally resized), then written into the chunk's own shards, train grouped by
identity (an identity never spans two shards). The chunk is written in a folder of a unique name
and renamed to `chunks/NNNNNN/` when complete, with::

    train-NNNNNN.tar, val-NNNNNN.tar   the chunk's shards (numbered within the chunk)
    rows.parquet                       its manifest rows (shard names within the chunk)
    rejects.jsonl                      its records whose image was rejected, with the reason
    chunk.json                         its counts (written last)

So a chunk is either whole or absent: a conversion killed at any point keeps every finished
chunk, and converting a chunk twice (a requeued task) gives the same bytes. `convert_chunks`
converts some chunks with a pool of worker processes on one machine; `launch/convert.py` runs it
as the tasks of a SLURM array.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema
from .chunking import chunk_dir, chunk_done, load_plan, unique_name
from .converters import MAX_IMAGE_BYTES, read_image_file, worker_init
from .corpora import ColumnSizes, image_column
from .errors import BuildError, BuildFailed
from .imaging import failure_reason, prepare_image
from .transaction import fsync_path
from .writer import MANIFEST_SCHEMA, ShardSink

_ADDRESS = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
IMAGE_BATCH = 256
"""Parquet rows of images decoded per batch (memory: one batch of encoded images)."""
IMAGE_BATCH_BYTES = 256 << 20
"""Image bytes decompressed per batch (batches of fewer rows where images are large)."""
MAX_IMAGE_RATIO = 20
"""Highest compression ratio a row group's images may have once they hold more than
corpora.BOMB_MIN_BYTES: JPEG and PNG bytes hardly compress; zeros compress many thousand times."""


class ChunkWriter:
    """Writes one chunk's samples, rows and rejects into `folder` (see the module docstring)."""

    def __init__(self, folder: Path, plan: dict, index: int):
        s, c = plan["settings"], plan["chunks"][index]
        self.folder, self.index = folder, index
        self.sinks = {split: ShardSink(folder, split, s["max_samples"], s["max_bytes"]) for split in ("train", "val")}
        self.val_keys = set(plan["val_keys"])
        self.next_label = {"train": c["train_label"], "val": c["val_label"]}
        self.identities = Counter()
        self.rows: list[dict] = []
        self.rejects: list[dict] = []
        self.converted: Counter = Counter()
        self.key = self.split = self.label = None
        self.pending: list = []

    def add(self, entry: dict, image=None, problem: tuple[str, str] | None = None) -> None:
        """The next record of the chunk: its prepared image, or the problem that rejects it."""
        if entry["key"] != self.key:  # labels follow the plan's identities, written or not
            self._flush()
            self.key = entry["key"]
            self.split = "val" if self.key in self.val_keys else "train"
            self.label = self.next_label[self.split]
            self.next_label[self.split] += 1
        if problem is not None:  # (a decoder's message may name the buffer's address: not kept)
            detail = _ADDRESS.sub("the image bytes", problem[1])
            self.rejects.append({"split": self.split, "source": entry["source"], "reason": problem[0],
                                 "detail": detail})
        else:
            self.pending.append((entry, image))

    def _flush(self) -> None:
        if not self.pending:
            return
        sink = self.sinks[self.split]
        if not sink.fits(len(self.pending), sum(len(im.data) for _, im in self.pending)):
            sink.close_shard()
        for entry, image in self.pending:
            key = schema.sample_key(entry["index"])
            meta = {"pid": self.label, "image_id": entry["index"], "captions": entry["captions"],
                    "source": entry["source"]}
            shard, offset, size = sink.write(key, image.ext, image.data, meta)
            self.rows.append({
                "split": self.split, "shard": shard, "key": key, "pid": self.label, "orig_pid": self.key,
                "image_id": entry["index"], "captions": entry["captions"], "width": image.width,
                "height": image.height, "sha256": hashlib.sha256(image.data).hexdigest(), "source": entry["source"],
                "num_captions": len(entry["captions"]), "offset": offset, "size": size})
            if image.converted:
                self.converted[image.converted] += 1
        self.identities[self.split] += 1
        self.pending = []

    def close(self, records: int) -> dict:
        """Finish the shards, write rows, rejects and (last) chunk.json; fsync everything."""
        self._flush()
        for sink in self.sinks.values():
            sink.close_shard()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=MANIFEST_SCHEMA), self.folder / "rows.parquet")
        (self.folder / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.rejects))
        splits = {}
        for split, sink in self.sinks.items():
            rows = [r for r in self.rows if r["split"] == split]
            splits[split] = {"images": len(rows), "captions": sum(r["num_captions"] for r in rows),
                             "identities": self.identities[split], "shards": sink.shards}
        info = {"chunk": self.index, "records": records, "written": len(self.rows), "rejected": len(self.rejects),
                "rejected_by_reason": dict(Counter(r["reason"] for r in self.rejects)),
                "converted_images": dict(self.converted), "splits": splits}
        (self.folder / "chunk.json").write_text(json.dumps(info, indent=1) + "\n")
        for name in ("rows.parquet", "rejects.jsonl", "chunk.json"):
            fsync_path(self.folder / name)
        fsync_path(self.folder)
        return info


def _file_image(root: str, real_root: str, source: str):
    """(bytes, None) of the image file `source` under the root, or (None, (reason, detail))."""
    path = os.path.join(root, source)
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError) as e:  # (a link loop, or one changing under us)
        return None, ("missing image file", f"{source}: {e}")
    if os.path.commonpath([real, real_root]) != real_root:
        return None, ("path escapes the root", f"path escapes the root through a link: {source}")
    return read_image_file(path, real_root)


def _bytes_column(column):
    """The encoded images of an `image` column batch: a binary array (a struct's `bytes` field,
    null where the struct is null)."""
    if pa.types.is_struct(column.type):
        data = pc.struct_field(column, "bytes")
        return pc.if_else(column.is_valid(), data, pa.scalar(None, data.type))
    return column


def _parquet_images(path: str, rows: list[int]) -> Iterator[tuple]:
    """(bytes, problem) of the image in each of `rows` (ascending) of a Parquet file, reading only
    the row groups holding them, a batch at a time; sizes are checked before bytes are copied."""
    pf = pq.ParquetFile(path)
    column = image_column(path)
    wanted = iter(rows)
    row = next(wanted, None)
    start = 0
    for g in range(pf.metadata.num_row_groups):
        end = start + pf.metadata.row_group(g).num_rows
        sizes = ColumnSizes.of(pf, g, [column], path)
        bomb = sizes.bomb(MAX_IMAGE_BYTES, MAX_IMAGE_RATIO)
        if row is not None and row < end and bomb:  # (a decompression bomb: refused before it is read)
            while row is not None and row < end:
                yield None, ("image file too large", f"{Path(path).name} row {row}: its row group's images are "
                                                     f"{bomb}: not read")
                row = next(wanted, None)
        elif row is not None and row < end:
            base = start
            for batch in pf.iter_batches(batch_size=sizes.batch_rows(IMAGE_BATCH_BYTES, IMAGE_BATCH), row_groups=[g],
                                         columns=[column]):
                images = _bytes_column(batch.column(0))
                lengths = pc.binary_length(images).to_pylist()
                while row is not None and row < base + batch.num_rows:
                    j = row - base
                    if lengths[j] is None:
                        yield None, ("missing image file", f"{Path(path).name} row {row}: no image bytes")
                    elif lengths[j] > MAX_IMAGE_BYTES:
                        yield None, ("image file too large", f"{Path(path).name} row {row}: {lengths[j]} bytes "
                                                             f"(at most {MAX_IMAGE_BYTES})")
                    else:
                        yield images[j].as_py(), None
                    row = next(wanted, None)
                base += batch.num_rows
        start = end
        if row is None:
            return
    if row is not None:
        raise BuildFailed(f"{path} has no row {row}: the file changed after the conversion was planned")


def _images(entries: list[dict], plan: dict) -> Iterator[tuple]:
    """(bytes, problem) of each entry's image, in order."""
    root = plan["settings"]["root"]
    real_root = os.path.realpath(root)
    i = 0
    while i < len(entries):
        part = entries[i]["part"]
        if part < 0:
            yield _file_image(root, real_root, entries[i]["source"])
            i += 1
            continue
        j = i
        while j < len(entries) and entries[j]["part"] == part:
            j += 1
        yield from _parquet_images(plan["parts"][part], [e["row"] for e in entries[i:j]])
        i = j


def convert_chunk(work: str | os.PathLike, index: int) -> dict:
    """Convert chunk `index` of the plan in `work` (nothing to do when it is done); chunk.json's dict."""
    work = Path(work)
    final = chunk_dir(work, index)
    if chunk_done(work, index):
        return json.loads((final / "chunk.json").read_text())
    plan = load_plan(work)
    if plan is None:
        raise BuildError(f"{work} holds no conversion plan: start the conversion with `itself-shards build`")
    entries = pq.read_table(work / "plan" / f"chunk-{index:06d}.parquet").to_pylist()
    resize = plan["settings"]["resize"]
    tmp = work / "chunks" / unique_name(f".{index:06d}")
    tmp.mkdir(parents=True)
    try:
        writer = ChunkWriter(tmp, plan, index)
        for entry, (data, problem) in zip(entries, _images(entries, plan), strict=True):
            image = None
            if problem is None:
                try:
                    image = prepare_image(data, tuple(resize) if resize else None)
                except Exception as e:  # noqa: BLE001 - any decoder error: unreadable, truncated, a bomb
                    problem = failure_reason(e)
            writer.add(entry, image, problem)
        info = writer.close(len(entries))
        try:
            os.rename(tmp, final)
        except OSError as e:  # converted meanwhile by another task (a requeued duplicate): same bytes
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: queued chunks are dropped and running workers killed (a chunk is minutes of
    work; its unfinished folder is removed by the merge)."""
    running = list((getattr(pool, "_processes", None) or {}).values())  # (no public way to stop running work)
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in running:
        proc.kill()


def convert_chunks(work: Path, todo: list[int], workers: int, progress: bool = True, total: int | None = None) -> int:
    """Convert the chunks `todo` of `work`'s plan with `workers` processes (in this process when 1);
    returns how many images were converted. BuildFailed when a chunk fails or a worker dies: the
    chunks finished until then are kept."""
    from tqdm import tqdm

    plan = load_plan(work)
    size = lambda i: plan["chunks"][i]["entries"]  # noqa: E731
    bar = tqdm(total=total or sum(size(i) for i in todo), desc="converting", unit="img", disable=not progress)
    done = 0

    def failed(i: int, e: BaseException) -> BuildFailed:
        finished = sum(chunk_done(work, j) for j in range(len(plan["chunks"])))
        return BuildFailed(f"chunk {i} failed: {e}; {finished} of {len(plan['chunks'])} chunks are converted and "
                           f"kept in {work}: run the same command again to convert the rest")

    with bar:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                try:
                    convert_chunk(work, i)
                except Exception as e:  # noqa: BLE001 - any failure of the chunk: named, the rest kept
                    raise failed(i, e) from None
                done += size(i)
                bar.update(size(i))
            return done
        pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("fork"), initializer=worker_init)
        try:
            running = {pool.submit(convert_chunk, work, i): i for i in todo}
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    i = running.pop(f)
                    try:
                        f.result()
                    except BrokenProcessPool:
                        raise failed(i, RuntimeError("a worker process died (killed by the system: out of memory?)")) \
                            from None
                    except Exception as e:  # noqa: BLE001 - as above
                        raise failed(i, e) from None
                    done += size(i)
                    bar.update(size(i))
        except BaseException:
            _stop(pool)
            raise
        pool.shutdown()
    return done

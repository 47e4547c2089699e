"""The index folder: the one place that knows its files.

    index.json                   what the index holds; written last, atomically (the commit point)
    vectors-NNNN.faiss           the FAISS index index.json names (a new generation per change)
    batches/NNN/plan.json        one batch per `index` or `add` run: gallery, split, model, units
    batches/NNN/part-UUUUUU.global.npy   normalised global embeddings of unit U (float32)
    batches/NNN/part-UUUUUU.grab.npy     normalised GRAB embeddings (absent for global-only models)
    batches/NNN/part-UUUUUU.json         the unit's items and unreadable count; written last, so
                                         its presence marks the part finished

Row i of the gallery is the i-th image over the merged batches, parts and items in order. The
embeddings stay on disk: searches re-score their candidates with them exactly, and the vector
index can be rebuilt from them without embedding the gallery again.
"""

from __future__ import annotations

import functools
import io
import json
import mmap
import os
from pathlib import Path

import numpy as np

from ..safeio import write_atomic
from .errors import RetrieveError

FORMAT = "itself-index/2"
INDEX_FILE = "index.json"


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    write_atomic(path, buf.getvalue())


class Part:
    """The embeddings and items of one unit of a batch."""

    def __init__(self, batch_dir: Path, unit: int):
        stem = f"part-{unit:06d}"
        self.global_file = batch_dir / f"{stem}.global.npy"
        self.grab_file = batch_dir / f"{stem}.grab.npy"
        self.meta_file = batch_dir / f"{stem}.json"

    def done(self) -> bool:
        return self.meta_file.exists()

    def write(self, glob: np.ndarray, grab: np.ndarray | None, items: list[dict], skipped: int) -> None:
        """Arrays first, the item list last: a part killed half-way is simply not done."""
        _save_npy(self.global_file, glob)
        if grab is not None:
            _save_npy(self.grab_file, grab)
        write_atomic(self.meta_file, json.dumps({"images": len(items), "skipped": skipped, "items": items}))

    def read_meta(self) -> dict:
        """{"images", "skipped", "items": [{"name", "pid", "locator"}, ...]}"""
        return json.loads(self.meta_file.read_text())

    @functools.cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(global, GRAB or None), memory-mapped: only the rows read come into memory."""
        return self._mapped[0].array, (self._mapped[1].array if self._mapped[1] else None)

    @functools.cached_property
    def _mapped(self) -> tuple["MappedArray", "MappedArray | None"]:
        return MappedArray(self.global_file), (MappedArray(self.grab_file) if self.grab_file.exists() else None)

    def prefetch(self, rows: np.ndarray) -> None:
        for mapped in self._mapped:
            if mapped:
                mapped.prefetch(rows)


class MappedArray:
    """A float32 .npy file mapped read-only, whose rows can be fetched ahead of reading them."""

    def __init__(self, path: Path):
        try:
            self._open(path)
        except (ValueError, OSError) as e:  # (a truncated or foreign file)
            raise RetrieveError(f"{path}: unreadable ({e}); the index folder is damaged: build the index again with "
                                "`index` (into a new --out)") from None

    def _open(self, path: Path) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if fortran or dtype != np.float32 or len(shape) != 2:
                raise RetrieveError(f"{path}: not a 2-d float32 C-order array; the index folder is damaged")
            offset = f.tell()
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if shape[0] else None
        self.array = (np.frombuffer(self._map, np.float32, shape[0] * shape[1], offset).reshape(shape)
                      if self._map else np.zeros(shape, np.float32))
        self._offset, self._row_bytes = offset, shape[1] * 4

    def prefetch(self, rows: np.ndarray) -> None:
        """Ask the kernel to read these rows now, all at once: on a gallery larger than the page cache
        a candidate's row is otherwise one random read waiting for the one before."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        for row in np.unique(rows):
            begin = self._offset + int(row) * self._row_bytes
            page = begin - begin % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_WILLNEED, page, begin + self._row_bytes - page)


class Batch:
    """The parts of one `index` or `add` run, and the plan they were made from."""

    def __init__(self, root: Path, number: int):
        self.number = number
        self.dir = root / "batches" / f"{number:03d}"
        self.plan_file = self.dir / "plan.json"

    def read_plan(self) -> dict | None:
        return json.loads(self.plan_file.read_text()) if self.plan_file.exists() else None

    def write_plan(self, plan: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.plan_file, json.dumps(plan, indent=2) + "\n")

    def part(self, unit: int) -> Part:
        return Part(self.dir, unit)

    def parts(self) -> list[Part]:
        return [self.part(u) for u in range(self.read_plan()["units"])]


class EmbeddingStore:
    """The stored embeddings and items of an index: row i is gallery image i. Item lists are read
    per part when asked for (a few parts cached), never all at once."""

    def __init__(self, parts: list[Part], counts: list[int]):
        self.parts, self.counts = parts, counts
        self.starts = np.cumsum([0] + counts)
        self._items = functools.lru_cache(maxsize=32)(lambda p: self.parts[p].read_meta()["items"])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def blocks(self):
        """(first row, global, GRAB or None) per part, memory-mapped."""
        for start, count, part in zip(self.starts, self.counts, self.parts):
            if count:
                yield int(start), *part.arrays

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The embeddings of rows `ids` (any order, repeats allowed)."""
        ids = np.asarray(ids, dtype=np.int64)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        glob, grab = None, None
        for p in np.unique(which):  # (all reads asked for first: the kernel does them in parallel)
            self.parts[p].prefetch(ids[which == p] - self.starts[p])
        for p in np.unique(which):
            sel = which == p
            g, l = self.parts[p].arrays
            local = ids[sel] - self.starts[p]
            if glob is None:
                glob = np.empty((len(ids), g.shape[1]), np.float32)
                grab = np.empty((len(ids), l.shape[1]), np.float32) if l is not None else None
            glob[sel] = g[local]
            if grab is not None:
                grab[sel] = l[local]
        return glob, grab

    def item(self, row: int) -> dict:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} not in a gallery of {len(self)} images")
        p = int(np.searchsorted(self.starts, row, side="right") - 1)
        return self._items(p)[row - self.starts[p]]

    def items(self) -> list[dict]:
        """Every item (reads every part: for small galleries and tests)."""
        return [item for p in range(len(self.parts)) for item in self._items(p)]


class IndexDir:
    """An index folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.info_file = self.path / INDEX_FILE

    def exists(self) -> bool:
        return self.info_file.exists()

    def info(self) -> dict:
        if not self.exists():
            raise RetrieveError(f"{self.path} is not an index (no {INDEX_FILE}); build one with `index`")
        try:
            info = json.loads(self.info_file.read_text())
        except (ValueError, OSError) as e:
            raise RetrieveError(f"{self.info_file}: unreadable ({e}); the index folder is damaged: build the index "
                                "with `index`") from None
        if not isinstance(info, dict):
            raise RetrieveError(f"{self.info_file}: not an index description; build the index again with `index`")
        if info.get("format") != FORMAT:
            raise RetrieveError(f"{self.path}: an index of format {info.get('format', 'itself-index/1')!r}, this "
                                f"version reads {FORMAT!r}; build the index again with `index` (into a new --out)")
        return info

    def write_info(self, info: dict) -> None:
        write_atomic(self.info_file, json.dumps(info, indent=2) + "\n")

    def batch(self, number: int) -> Batch:
        return Batch(self.path, number)

    def vectors_file(self, generation: int) -> Path:
        return self.path / f"vectors-{generation:04d}.faiss"

    def embeddings(self, info: dict | None = None) -> EmbeddingStore:
        info = info or self.info()
        parts, counts = [], []
        for b in info["batches"]:
            batch = self.batch(b["number"])
            if batch.read_plan() is None or len(batch.parts()) != len(b["part_images"]):
                raise RetrieveError(f"{self.path}: {batch.plan_file} is missing or disagrees with {INDEX_FILE}; the "
                                    "index folder is damaged: build the index again with `index` (into a new --out)")
            parts += batch.parts()
            counts += b["part_images"]
        grab = bool(info.get("grab_dim"))
        for part, count in zip(parts, counts):
            # (cheap: file names and .npy headers; a missing or truncated part is named now, not mid-query)
            files = [part.meta_file, part.global_file] + ([part.grab_file] if grab else [])
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise RetrieveError(f"{self.path}: {missing[0]} is missing; the index folder is damaged (copied in "
                                    "part?): copy it again, or build the index again with `index` (into a new --out)")
            if count and any(m is None or m.array.shape[0] != count for m in part._mapped[:1 + grab]):
                raise RetrieveError(f"{self.path}: the embeddings of {part.meta_file.name} do not hold {count} rows; "
                                    "the index folder is damaged: build the index again with `index` (into a new --out)")
        return EmbeddingStore(parts, counts)

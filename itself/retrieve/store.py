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
        glob = np.load(self.global_file, mmap_mode="r")
        grab = np.load(self.grab_file, mmap_mode="r") if self.grab_file.exists() else None
        return glob, grab


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
        info = json.loads(self.info_file.read_text())
        if info.get("format") != FORMAT:
            raise RetrieveError(f"{self.path}: an index of format {info.get('format', 'itself-index/1')!r}, this "
                                f"version reads {FORMAT!r}; build it again with `index`")
        return info

    def write_info(self, info: dict) -> None:
        write_atomic(self.info_file, json.dumps(info, indent=2) + "\n")

    def batch(self, number: int) -> Batch:
        return Batch(self.path, number)

    def vectors_file(self, generation: int) -> Path:
        return self.path / f"vectors-{generation:04d}.faiss"

    def embeddings(self, info: dict | None = None) -> EmbeddingStore:
        info = info or self.info()
        parts = [p for b in info["batches"] for p in self.batch(b["number"]).parts()]
        return EmbeddingStore(parts, [n for b in info["batches"] for n in b["part_images"]])

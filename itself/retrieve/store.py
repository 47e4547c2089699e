"""The index folder: the one place that knows its files, and checks them before trusting them.

    index.json                   what the index holds; written last, atomically (the commit point)
    index.lock                   held by the one process writing the folder (`index`, `add`)
    vectors-NNNN.faiss           the FAISS index index.json names (a new generation per change)
    batches/NNN/plan.json        one batch per `index` or `add` run: gallery, split, model, units
    batches/NNN/part-UUUUUU.global.npy   normalised global embeddings of unit U (float32)
    batches/NNN/part-UUUUUU.grab.npy     normalised GRAB embeddings (absent for global-only models)
    batches/NNN/part-UUUUUU.json         the unit's items (name, identity, place in the gallery,
                                         sha256 and size of the image), unreadable count and a
                                         stamp of its gallery files; written last, so its presence
                                         marks the part finished

Row i of the gallery is the i-th image over the merged batches, parts and items in order. The
embeddings stay on disk: searches re-score their candidates with them exactly, and the vector
index can be rebuilt from them without embedding the gallery again.

An index folder may come from someone else: every field of its JSON files is checked (types,
ranges, counts that must agree: entries.py) and every file it names must be the one this module would write
there (`vectors-NNNN.faiss`, no link anywhere below the folder, regular files of the size their
header says), so a changed folder is an error naming the file and the entry, never a file read or
deleted elsewhere, a command run, or memory exhausted by a header's claims.
"""

from __future__ import annotations

import functools
import io
import json
import mmap
import os
import stat
from pathlib import Path

import numpy as np

from ..safeio import UnsafePath, resolve_inside, write_atomic
from .entries import DAMAGED, FORMAT, KINDS, check_info, check_meta, check_plan, damaged, read_json
from .errors import RetrieveError

__all__ = ["DAMAGED", "FORMAT", "INDEX_FILE", "KINDS", "LOCK_FILE", "Batch", "EmbeddingStore", "IndexDir", "Part"]

LOCK_FILE = "index.lock"
INDEX_FILE = "index.json"


# ----------------------------------------------------------------------------------- arrays


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    write_atomic(path, buf.getvalue())


class MappedArray:
    """A float32 [rows, cols] .npy file mapped read-only, whose rows can be fetched ahead of
    reading them. The file must be a regular file (not a link) of exactly the size its header
    says, with the shape the index expects: a header claiming more is refused, never mapped."""

    def __init__(self, path: Path, rows: int, cols: int):
        try:
            self._open(path, rows, cols)
        except RetrieveError:
            raise
        except (ValueError, OSError, SyntaxError) as e:  # (a truncated or foreign file, a link)
            raise RetrieveError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:200]}); {DAMAGED}") from None

    def _open(self, path: Path, rows: int, cols: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise RetrieveError(f"{path}: not a regular file; {DAMAGED}")
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise RetrieveError(f"{path}: a .npy file of version {version}, not one this index writes; {DAMAGED}")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
            if fortran or dtype != np.float32 or tuple(shape) != (rows, cols):
                raise RetrieveError(f"{path}: holds {'x'.join(map(str, shape))} {dtype} values, the index expects "
                                    f"{rows}x{cols} float32; {DAMAGED}")
            if st.st_size != offset + rows * cols * 4:
                raise RetrieveError(f"{path}: {st.st_size} bytes, its header says {offset + rows * cols * 4} "
                                    f"(truncated, or not this index's file); {DAMAGED}")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if rows and cols else None
        self.array = (np.frombuffer(self._map, np.float32, rows * cols, offset).reshape(rows, cols)
                      if self._map else np.zeros((rows, cols), np.float32))
        self._offset, self._row_bytes = offset, cols * 4

    def prefetch(self, rows: np.ndarray) -> None:
        """Ask the kernel to read these rows now, all at once: on a gallery larger than the page cache
        a candidate's row is otherwise one random read waiting for the one before."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        for row in np.unique(rows):
            begin = self._offset + int(row) * self._row_bytes
            page = begin - begin % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_WILLNEED, page, begin + self._row_bytes - page)


# ----------------------------------------------------------------------------------- parts


class Part:
    """The embeddings and items of one unit of a batch."""

    def __init__(self, batch_dir: Path, unit: int, root: str | None = None):
        stem = f"part-{unit:06d}"
        self.global_file = batch_dir / f"{stem}.global.npy"
        self.grab_file = batch_dir / f"{stem}.grab.npy"
        self.meta_file = batch_dir / f"{stem}.json"
        self.root = root  # the gallery root its items are relative to
        self.dims: tuple[int, int, int] | None = None  # (rows, global dims, GRAB dims: 0 for none), from index.json

    def done(self) -> bool:
        return os.path.lexists(self.meta_file)

    def write(self, glob: np.ndarray, grab: np.ndarray | None, items: list[dict], skipped: int, duplicates: int = 0,
              stamp: str | None = None) -> None:
        """Arrays first, the item list last: a part killed half-way is simply not done."""
        _save_npy(self.global_file, glob)
        if grab is not None:
            _save_npy(self.grab_file, grab)
        write_atomic(self.meta_file, json.dumps({"images": len(items), "skipped": skipped, "duplicates": duplicates,
                                                 "stamp": stamp, "items": items}))

    def read_meta(self) -> dict:
        """{"images", "skipped", "duplicates", "stamp", "items": [{"name", "pid", "file" | "shard" and
        "key", "sha256", "bytes"}, ...]}, checked."""
        return check_meta(read_json(self.meta_file, self.meta_file), self.meta_file)

    @functools.cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(global, GRAB or None), memory-mapped: only the rows read come into memory."""
        return self._mapped[0].array, (self._mapped[1].array if self._mapped[1] else None)

    @functools.cached_property
    def _mapped(self) -> tuple[MappedArray, MappedArray | None]:
        rows, g, l = self.dims
        return MappedArray(self.global_file, rows, g), (MappedArray(self.grab_file, rows, l) if l else None)

    def prefetch(self, rows: np.ndarray) -> None:
        for mapped in self._mapped:
            if mapped:
                mapped.prefetch(rows)


class Batch:
    """The parts of one `index` or `add` run, and the plan they were made from."""

    def __init__(self, root: Path, number: int):
        self.number = number
        self.dir = root / "batches" / f"{number:03d}"
        self.plan_file = self.dir / "plan.json"
        resolve_inside(root, f"batches/{number:03d}/plan.json", f"{root}: batch {number}", links=False)

    def read_plan(self) -> dict | None:
        if not os.path.lexists(self.plan_file):
            return None
        return check_plan(read_json(self.plan_file, self.plan_file), self.plan_file)

    def write_plan(self, plan: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.plan_file, json.dumps(plan, indent=2) + "\n")

    def part(self, unit: int, root: str | None = None) -> Part:
        return Part(self.dir, unit, root)

    def parts(self, units: int | None = None, root: str | None = None) -> list[Part]:
        if units is None:
            plan = self.read_plan()
            units, root = plan["units"], plan["root"]
        return [self.part(u, root) for u in range(units)]


class EmbeddingStore:
    """The stored embeddings and items of an index: row i is gallery image i. Item lists are read
    per part when asked for (a few parts cached), never all at once."""

    def __init__(self, parts: list[Part], counts: list[int]):
        self.parts, self.counts = parts, counts
        self.starts = np.cumsum([0] + counts)
        self._items = functools.lru_cache(maxsize=32)(self._read_items)

    def _read_items(self, p: int) -> list[dict]:
        items = self.parts[p].read_meta()["items"]
        if len(items) != self.counts[p]:
            raise damaged(self.parts[p].meta_file, "images", f"is {len(items)}, index.json lists {self.counts[p]}")
        return items

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

    def locate(self, row: int) -> tuple[Part, dict]:
        """(the part holding row, its item)."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} not in a gallery of {len(self)} images")
        p = int(np.searchsorted(self.starts, row, side="right") - 1)
        return self.parts[p], self._items(p)[row - self.starts[p]]

    def item(self, row: int) -> dict:
        return self.locate(row)[1]

    def items(self) -> list[dict]:
        """Every item (reads every part: for small galleries and tests)."""
        return [item for p in range(len(self.parts)) for item in self._items(p)]


class IndexDir:
    """An index folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.info_file = self.path / INDEX_FILE

    def exists(self) -> bool:
        return os.path.lexists(self.info_file)

    def info(self) -> dict:
        if not self.exists():
            raise RetrieveError(f"{self.path} is not an index (no {INDEX_FILE}); build one with `index`")
        self._inside(INDEX_FILE)
        return check_info(read_json(self.info_file, self.info_file), self.info_file)

    def _inside(self, name: str) -> Path:
        return resolve_inside(self.path, name, f"{self.info_file}: entry {name}", links=False)

    def write_info(self, info: dict) -> None:
        write_atomic(self.info_file, json.dumps(info, indent=2) + "\n")

    def batch(self, number: int) -> Batch:
        return Batch(self.path, number)

    def vectors_file(self, generation: int) -> Path:
        return self.path / f"vectors-{generation:04d}.faiss"

    def vectors(self, info: dict) -> Path:
        """The vector file index.json names (checked: this index's name, inside, no link)."""
        self._inside(info["vectors"])
        return self.path / info["vectors"]

    def embeddings(self, info: dict | None = None) -> EmbeddingStore:
        """The stored embeddings, every file checked against index.json (names, no links, .npy
        headers and sizes: a part copied in part or changed is named now, not mid-query)."""
        info = info or self.info()
        parts, counts = [], []
        for b in info["batches"]:
            batch = self.batch(b["number"])
            plan = batch.read_plan()
            if plan is None or plan["units"] != len(b["part_images"]) or plan["root"] != b["root"]:
                raise RetrieveError(f"{self.path}: {batch.plan_file} is missing or disagrees with {INDEX_FILE}; "
                                    f"{DAMAGED}")
            parts += self.batch_parts(batch, b["part_images"], b["root"], (info["global_dim"], info["grab_dim"]))
            counts += b["part_images"]
        return EmbeddingStore(parts, counts)

    def batch_parts(self, batch: Batch, counts: list[int], root: str, dims: tuple[int, int]) -> list[Part]:
        """The parts of a batch with `counts` images each, their files there and their arrays checked."""
        parts = batch.parts(len(counts), root)
        for part, count in zip(parts, counts):
            part.dims = (count, *dims)
            files = [part.meta_file, part.global_file] + ([part.grab_file] if dims[1] else [])
            missing = [f for f in files if not os.path.lexists(f)]
            if missing:
                raise RetrieveError(f"{self.path}: {missing[0]} is missing; the index folder is damaged (copied "
                                    "in part?): copy it again, or build the index again with `index` (into a new --out)")
            if not stat.S_ISREG(os.lstat(part.meta_file).st_mode):  # (its items are read later: refused now)
                raise RetrieveError(f"{part.meta_file}: not a regular file (a link?); {DAMAGED}")
            part.arrays  # noqa: B018 - maps and checks the arrays now
        return parts

    def check_apart(self, path: str | os.PathLike, what: str) -> None:
        """UnsafePath when `path` (a folder the user gave) and this index folder hold one another."""
        real, base = os.path.realpath(path), os.path.realpath(self.path)
        if os.path.commonpath([real, base]) in (real, base):
            raise UnsafePath(f"{what} {path} and the index folder {self.path} hold one another; choose another folder")

"""The plan of a corpus conversion: the records cut into fixed chunks, decided once, before any image
is read, so that chunks can be converted anywhere, in any order, by any number of workers.

The conversion's work folder sits beside the output (`<parent>/.<name>.convert/`, on the same
shared file system) and survives a killed or failed conversion, so that the next run resumes::

    plan/plan.json                 settings, input files, chunks, val identities (written last)
    plan/chunk-NNNNNN.parquet      a chunk's records: index, identity, captions, source, image location
    plan/rejects.jsonl             records the plan rejected (malformed, empty caption, duplicate, ...)
    chunks/NNNNNN/                 a converted chunk (`shards.chunks`), renamed into place when complete

Planning streams the annotations once (`shards.corpora`) and checks each record's fields, its image
path (normalised; absolute or `..` paths escape the root), duplicates (by the path's 64-bit digest:
8 bytes a record) and, for corpora with real identities, that each identity's records are
contiguous (a record of an identity seen before another one is rejected: `identity not
contiguous`). A chunk closes at `chunk_size` records, between identities only. The val split is
the `val_fraction` of identities (at most `val_max_identities`) whose keys' digests, mixed with
the seed, are smallest: a uniform choice, independent of the order, the chunk size and the machine.
Labels are fixed here too: train identities are numbered 0..T-1 and val 0..V-1 in corpus order,
so each chunk knows its labels without waiting for the others (an identity whose every image is
later rejected leaves its label unused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import os
import secrets
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .corpora import CORPORA, Item, items, parquet_parts
from .errors import BuildError
from .ownership import first_foreign
from .transaction import fsync_path
from .validate import bounded, check_captions, check_pid, normalise_path, pid_key

WORK_SUFFIX = ".convert"
PLAN_FORMAT = 1
CHUNK_SIZE = 10_000
"""Default records per chunk (10 train shards of 1,000): the unit of work, of parallelism and of resuming."""
VAL_FRACTION = 0.01
"""Default share of a corpus's identities held out as val."""
VAL_MAX_IDENTITIES = 1_000
"""Default cap on val identities (a pre-training val split only needs to show progress)."""
ENTRY_SCHEMA = pa.schema([("index", pa.int64()), ("key", pa.string()), ("captions", pa.list_(pa.string())),
                          ("source", pa.string()), ("part", pa.int32()), ("row", pa.int64())])


@dataclasses.dataclass(frozen=True)
class Settings:
    """What makes two conversions the same one: a rerun with equal settings resumes the work."""

    dataset: str
    root: str
    annotations: tuple  # ((path, size, mtime_ns), ...) of every annotation file
    chunk_size: int = CHUNK_SIZE
    val_fraction: float = VAL_FRACTION
    val_max_identities: int = VAL_MAX_IDENTITIES
    seed: int = 0
    resize: tuple | None = None
    max_samples: int = 1000
    max_bytes: int = 256 << 20
    name: str = ""  # the dataset's name in dataset.json
    extra: dict = dataclasses.field(default_factory=dict)  # more builder facts for dataset.json

    def as_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def file_stamps(files: list[Path]) -> tuple:
    out = []
    for f in files:
        st = f.stat()
        out.append((os.path.realpath(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def work_folder(out: str | os.PathLike) -> Path:
    """Where the conversion of `out` keeps its plan and finished chunks."""
    out = Path(os.path.realpath(out))
    return out.parent / f".{out.name}{WORK_SUFFIX}"


def check_work_folder(work: Path) -> None:
    """BuildError unless the work folder (when there is one) and everything in it are this user's
    and writable by no one else (a link at its name your own). A conversion resumes from what the
    folder holds: its plan, converted chunks and their shards, merged as they are; one someone else
    made beside a shared `--out` would put their files (or, through shard names, any file root can
    read) into the dataset."""
    foreign = first_foreign(work)
    if foreign:
        path, why = foreign
        raise BuildError(f"{path} {why}: a conversion resumes from what its work folder holds, which must be yours "
                         f"alone; remove {work} to start over (or choose another --out)")


def chunk_dir(work: Path, i: int) -> Path:
    return work / "chunks" / f"{i:06d}"


def chunk_done(work: Path, i: int) -> bool:
    return (chunk_dir(work, i) / "chunk.json").is_file()


def load_plan(work: Path) -> dict | None:
    path = work / "plan" / "plan.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BuildError(f"{path}: cannot read the conversion plan ({e}); remove {work} to start over") from None


def unique_name(stem: str) -> str:
    """A name no other process on any node picks: stem.tmp-<host>-<pid>-<hex>."""
    return f"{stem}.tmp-{socket.gethostname().split('.')[0]}-{os.getpid()}-{secrets.token_hex(4)}"


class SeenSet:
    """Strings seen so far, as 64-bit digests: 8 bytes each (40 MB at 5M records). Two different
    strings share a digest with probability about n^2 / 2^65 (below 1e-6 at 5M)."""

    def __init__(self):
        self.sorted = np.empty(0, np.uint64)
        self.recent: set[int] = set()

    @staticmethod
    def digest(text: str) -> int:
        """A string's 64-bit digest (blake2b)."""
        return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")

    def has(self, h: int) -> bool:
        """Whether a string of digest `h` was added."""
        if h in self.recent:
            return True
        i = self.sorted.searchsorted(np.uint64(h))  # (a Python int would make numpy compare objects: 25x slower)
        return i < len(self.sorted) and int(self.sorted[i]) == h

    def add(self, h: int) -> None:
        self.recent.add(h)
        if len(self.recent) >= 1 << 17:  # (merged into the sorted digests now and then: few sorts)
            self.sorted = np.union1d(self.sorted, np.fromiter(self.recent, np.uint64, len(self.recent)))
            self.recent = set()


_MASK = (1 << 64) - 1


def mix(h: int, seed: int) -> int:
    """A seeded 64-bit permutation of a digest (splitmix64's finaliser): ranks identities in an
    order that depends on the seed, uniformly, without hashing their key again."""
    z = (h + 0x9E3779B97F4A7C15 * (seed + 1)) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class _Planner:
    """Folds the corpus's items into chunk files and plan rejects (see the module docstring)."""

    def __init__(self, folder: Path, settings: Settings, pseudo: bool):
        self.folder, self.settings, self.pseudo = folder, settings, pseudo
        self.paths, self.done_ids = SeenSet(), SeenSet()
        self.entries: list[dict] = []
        self.chunks: list[dict] = []
        self.identities = 0  # of the open chunk
        self.current: str | None = None
        self.current_digest: int | None = None
        self.val: list[tuple[int, str, int]] = []  # heap of (-digest, key, chunk): the smallest digests
        self.read = self.rejected = 0
        self.rejects = open(folder / "rejects.jsonl", "w")

    def reject(self, item: Item, reason: str, detail: str) -> None:
        source = item.path if isinstance(item.path, str) and len(item.path) <= 1000 else item.where
        self.rejects.write(json.dumps({"split": None, "source": source, "reason": reason, "detail": detail}) + "\n")
        self.rejected += 1

    def add(self, item: Item) -> None:
        self.read += 1
        problem = item.problem or check_captions(item.captions)
        if problem is None and not (self.pseudo or item.pid is None):
            problem = check_pid(item.pid)
        source = key = None
        if problem is None:
            source, problem = normalise_path(item.path)
        if problem is None:
            path_digest = SeenSet.digest(source)
            if self.paths.has(path_digest):
                problem = ("duplicate image entry", f"{source} is listed more than once; the first is kept")
        if problem is None:
            own = self.pseudo or item.pid is None
            key = source if own else pid_key(item.pid)
            if key != self.current:
                key_digest = path_digest if own else SeenSet.digest(key)
                if not self.pseudo and self.done_ids.has(key_digest):
                    problem = ("identity not contiguous", f"pid {bounded(item.pid)} reappears after other identities "
                                                          f"at {item.where}: a corpus's records of one identity must "
                                                          "be contiguous (sort the annotations by id)")
        if problem is not None:
            self.reject(item, *problem)
            return
        self.paths.add(path_digest)
        if key != self.current:
            if self.current_digest is not None and not self.pseudo:
                self.done_ids.add(self.current_digest)
            if len(self.entries) >= self.settings.chunk_size:
                self.close_chunk()
            self.current, self.current_digest = key, key_digest
            self.identities += 1
            self._offer_val(key, key_digest)
        captions = [item.captions] if isinstance(item.captions, str) else list(item.captions)
        self.entries.append({"index": item.index, "key": key, "captions": captions, "source": source,
                             "part": item.part, "row": item.row})

    def _offer_val(self, key: str, digest: int) -> None:
        if self.settings.val_fraction <= 0 or self.settings.val_max_identities <= 0:
            return
        item = (-mix(digest, self.settings.seed), key, len(self.chunks))
        if len(self.val) < self.settings.val_max_identities:
            heapq.heappush(self.val, item)
        elif item > self.val[0]:
            heapq.heapreplace(self.val, item)

    def close_chunk(self) -> None:
        if not self.entries:
            return
        table = pa.Table.from_pylist(self.entries, schema=ENTRY_SCHEMA)
        pq.write_table(table, self.folder / f"chunk-{len(self.chunks):06d}.parquet")
        self.chunks.append({"entries": len(self.entries), "identities": self.identities})
        self.entries, self.identities = [], 0

    def finish(self) -> dict:
        self.close_chunk()
        self.rejects.close()
        total = sum(c["identities"] for c in self.chunks)
        s = self.settings
        want = min(s.val_max_identities, math.ceil(total * s.val_fraction)) if s.val_fraction > 0 else 0
        want = max(0, min(want, total - 1))
        chosen = sorted(((-h, key, c) for h, key, c in self.val))[:want]
        for c in self.chunks:
            c["val_identities"] = 0
        for _, _, c in chosen:
            self.chunks[c]["val_identities"] += 1
        train = val = 0
        for c in self.chunks:
            c["train_label"], c["val_label"] = train, val
            train += c["identities"] - c["val_identities"]
            val += c["val_identities"]
        return {"train_identities": train, "val_identities": val, "val_keys": sorted(k for _, k, _ in chosen),
                "val_policy": {"kind": "held-out identities", "fraction": s.val_fraction,
                               "max_identities": s.val_max_identities, "identities": val, "seed": s.seed,
                               "choice": "the identities whose keys' blake2b digests, mixed with the seed, are smallest"}}


def make_plan(work: Path, settings: Settings, files: list[Path], progress: bool = True) -> dict:
    """Plan the conversion into `work/plan` (see the module docstring) and return plan.json's dict.
    Written aside and renamed into place when complete: a killed plan leaves nothing used."""
    from tqdm import tqdm

    for stale in [*work.glob(".plan.tmp-*"), work / "chunks"]:  # of a killed planning, or of no plan: not ours
        shutil.rmtree(stale, ignore_errors=True)
    (work / "chunks").mkdir(parents=True)
    tmp = work / unique_name(".plan")
    tmp.mkdir()
    pseudo = CORPORA[settings.dataset].identities == "pseudo"
    planner = _Planner(tmp, settings, pseudo)
    try:
        root = Path(settings.root)
        for item in tqdm(items(settings.dataset, root, files), desc="planning", unit="rec", disable=not progress):
            planner.add(item)
        fixed = planner.finish()
        plan = {"format": PLAN_FORMAT, "settings": settings.as_json(),
                "parts": [os.path.realpath(p) for p in parquet_parts(files)],
                "identities": "pseudo" if pseudo else "given", "read": planner.read,
                "plan_rejected": planner.rejected, "chunks": planner.chunks, **fixed}
        (tmp / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        for path in [*tmp.iterdir(), tmp]:  # on disk before the plan has its name (a node may crash)
            fsync_path(path)
        os.rename(tmp, work / "plan")
    except BaseException:
        planner.rejects.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan


def prepare(work: Path, settings: Settings, files: list[Path], progress: bool = True) -> dict:
    """The plan of this conversion: the one in `work` when it was made with the same settings (the
    conversion resumes), else a new one. BuildError when `work` holds another conversion's plan."""
    check_work_folder(work)
    plan = load_plan(work)
    if plan is not None:
        if plan.get("format") != PLAN_FORMAT or plan.get("settings") != settings.as_json():
            old = plan.get("settings", {})
            changed = [k for k, v in settings.as_json().items() if old.get(k) != v]
            raise BuildError(f"{work} holds an unfinished conversion with other settings ({', '.join(changed) or 'format'}"
                             f" differ); run the same command as before to resume it, or remove {work} to start over")
        return plan
    return make_plan(work, settings, files, progress)

"""Converters from the raw TBPS benchmarks (and users' own JSONL) to the shard format.

Each format's annotation file becomes a list of `Entry` (split, id, captions, image path).
Entries are checked before anything is trusted (`screen`): field types and sizes
(`shards.validate`), image paths normalised (`./imgs/1.jpg` and `imgs/1.jpg` are one file, so
are a link and its target) and kept inside the image root, duplicates, and identities listed in
two splits (splits must be identity-disjoint: an identity's records are kept in the split that
has most of them, ties going to the first of train, val, test; the others are rejected). Images
are then read, fully decoded, converted where readers need it (16-bit grayscale, TIFF, GIF, ...:
`shards.imaging`) and optionally pre-resized in worker processes; the writer writes them in order
(train grouped by identity). Every entry ends up either written or in the rejects file with its
reason. Image paths that escape the image root (absolute, `..`, or a link pointing outside) and
files that are not regular files (FIFOs, devices, folders) are rejected without being read.

When the reject policy refuses a build (`shards.writer.DatasetWriter.close`) because of missing
image files, the message says where the paths were looked for and, by checking a sample of them
against nearby folders, where they were likely meant to be relative to.

Supported layouts (`--root RAW_DIR`):

- `cuhk-pedes`: `reid_raw.json` (or `caption_all.json`), a list of {"split", "captions",
  "file_path", "processed_tokens", "id"}, images under `imgs/`; ids are 1-based. Records without a
  split get the standard one by id: 1-11003 train, 11004-12003 val, 12004-13003 test.
- `icfg-pedes`: the same schema in `ICFG-PEDES.json` (or `ICFG_PEDES.json`), images under
  `imgs/`; only train and test exist. Val policy: a held-out subset of train identities
  (`--val-fraction`, default 5%, chosen by `--seed`), recorded in dataset.json.
- `rstpreid`: `data_captions.json`, a list of {"id", "img_path", "captions", "split"}, images
  under `imgs/`.
- `jsonl`: `annotations.jsonl`, one object per image: {"image": path, "captions": list or
  string, "pid", "split"}, paths relative to the root.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import signal
import stat
import sys
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

from .errors import BuildError, BuildFailed, ConvertError
from .imaging import failure_reason, prepare_image
from .inputs import check_found, found_under, open_input, opened_path
from .jsonstream import parse_line
from .schema import MAX_IMAGE_BYTES, SPLITS
from .validate import bounded, check_fields, kind, normalise_path, pid_key
from .writer import SHARD_BYTES, SHARD_SAMPLES, DatasetWriter, Record, Reject, feed


MAX_ANNOTATION_BYTES = 1 << 30
"""Largest benchmark annotation file read (CUHK-PEDES's is 30 MB; it is parsed whole: a corpus of
millions of records goes through `--dataset pairs`, which streams)."""


@dataclasses.dataclass
class Entry:
    """One annotation record, before its image is read."""

    index: int  # position in the annotation file: the image id
    split: object
    pid: object
    captions: object
    path: object  # image path relative to the image folder, as given
    source: str = ""  # the path normalised (set by `screen`)
    file: str = ""  # the image's absolute path (set by `screen`)
    root: str = ""  # the real path of the folder it must stay in (set by `screen`)


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    annotation_files: tuple[str, ...]  # the first that exists is used
    image_dir: str  # image paths are relative to <root>/<image_dir>
    path_key: str
    id_key: str


FORMATS = {
    "cuhk-pedes": Format("cuhk-pedes", ("reid_raw.json", "caption_all.json"), "imgs", "file_path", "id"),
    "icfg-pedes": Format("icfg-pedes", ("ICFG-PEDES.json", "ICFG_PEDES.json"), "imgs", "file_path", "id"),
    "rstpreid": Format("rstpreid", ("data_captions.json",), "imgs", "img_path", "id"),
    "jsonl": Format("jsonl", ("annotations.jsonl",), ".", "image", "pid"),
}
CUHK_SPLIT_BY_ID = ((1, 11003, "train"), (11004, 12003, "val"), (12004, 13003, "test"))


def find_annotations(fmt: Format, root: Path, annotations: str | None) -> Path:
    if annotations:
        path = Path(annotations)
        if not path.is_file():
            raise ConvertError(f"--annotations {path}: " + ("not a file" if path.exists() else "file not found"))
        return path
    for name in fmt.annotation_files:
        if os.path.lexists(root / name) and not (root / name).is_dir():  # (a FIFO too: refused when opened)
            check_found(root, root / name, "the annotation file")
            return root / name
    raise ConvertError(f"{fmt.name}: none of {', '.join(fmt.annotation_files)} found in {root} "
                       f"(or pass --annotations FILE)")


def read_entries(fmt: Format, path: Path, root: Path | None = None) -> tuple[list[Entry], list[Reject]]:
    """Entries of an annotation file, plus rejects for records that are not even objects. `root`: the
    raw folder the file was found in (not named with --annotations): checked again as it is opened."""
    try:
        with open_input(path, "the annotation file", MAX_ANNOTATION_BYTES, found_under(root, path) if root else None) as f:
            text = f.read().decode("utf-8-sig")  # (a byte-order mark is allowed)
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read the annotations: {e}") from None
    rejects: list[Reject] = []
    if fmt.name == "jsonl":
        raw = []
        # Split on "\n" only: str.splitlines() also splits on U+2028, U+2029, U+0085 and \x1c-\x1e,
        # which a caption may hold inside a JSON string (one record would become two malformed ones).
        for n, line in enumerate(text.split("\n")):
            if line.strip():
                try:
                    raw.append(parse_line(line, f"line {n + 1}"))
                except ValueError as e:
                    raw.append(_Unparsable(str(e)))
    else:
        try:
            raw = parse_line(text, str(path))
        except ValueError as e:
            raise ConvertError(f"cannot read the annotations: {e}") from None
    if not isinstance(raw, list):
        keys = f" with keys {bounded(list(raw)[:6])}" if isinstance(raw, dict) else ""
        raise ConvertError(f"{path}: expected a JSON list of records (one object per image), got "
                           f"{kind(raw)}{keys}")
    entries = []
    for i, r in enumerate(raw):
        where = f"{path.name}:{i + 1}" if fmt.name == "jsonl" else f"{path.name}[{i}]"
        if isinstance(r, _Unparsable):
            rejects.append(Reject(None, where, "malformed record", f"not JSON: {r.why}"))
            continue
        if not isinstance(r, dict):
            rejects.append(Reject(None, where, "malformed record",
                                  f"expected an object, got {kind(r)}: {bounded(r)}"))
            continue
        split = r.get("split")
        pid = r.get(fmt.id_key)
        if fmt.name == "cuhk-pedes" and split is None and isinstance(pid, int) and not isinstance(pid, bool):
            split = next((s for lo, hi, s in CUHK_SPLIT_BY_ID if lo <= pid <= hi), None)
        entries.append(Entry(i, split, pid, r.get("captions"), r.get(fmt.path_key)))
    return entries, rejects


@dataclasses.dataclass
class _Unparsable:
    why: str


def screen(entries: list[Entry], image_root: Path) -> tuple[list[Entry], list[Reject]]:
    """Entries whose fields, image path and identity can be trusted (`source` and `file` set), and
    a Reject for each of the others (see the module docstring). Reads no image."""
    kept, rejects = [], []
    real_root = os.path.realpath(image_root)
    first_of: dict[tuple, str] = {}  # the file (device, inode; else real path) -> the entry listing it first
    for e in entries:
        label = e.path if isinstance(e.path, str) and len(e.path) <= 1000 else bounded(e.path)
        problem = check_fields(e.split, e.pid, e.captions)
        norm = None
        if problem is None:
            norm, problem = normalise_path(e.path)
        if problem is None:
            try:
                real = os.path.realpath(os.path.join(image_root, norm))
                inside = os.path.commonpath([real, real_root]) == real_root
            except (OSError, ValueError) as err:
                problem = ("malformed record", f"image path {bounded(e.path)}: {err}")
            else:
                if not inside:
                    problem = ("path escapes the root", f"path escapes the root through a link: {norm}")
                else:
                    try:  # one file under two names (a symbolic or hard link) is one image
                        st = os.stat(real)
                        file = ("inode", st.st_dev, st.st_ino)
                    except OSError:
                        file = ("path", real)
                    if file in first_of:
                        spelt = f" (given as {bounded(e.path)})" if norm != e.path else ""
                        same = ("is listed more than once" if first_of[file] == norm
                                else f"is the same file as {first_of[file]} (a link)")
                        problem = ("duplicate image entry", f"{norm}{spelt} {same}; the first is kept")
        if problem is not None:
            rejects.append(Reject(e.split if isinstance(e.split, str) else bounded(e.split), label, *problem))
            continue
        first_of[file] = norm
        e.source, e.file, e.root = norm, os.path.join(image_root, norm), real_root
        kept.append(e)
    # Identity-disjoint splits: keep each identity where most of its records are.
    per_id: dict[str, Counter] = defaultdict(Counter)
    for e in kept:
        per_id[pid_key(e.pid)][e.split] += 1
    home = {k: max(c, key=lambda s: (c[s], -SPLITS.index(s))) for k, c in per_id.items() if len(c) > 1}
    if home:
        disjoint = []
        for e in kept:
            key = pid_key(e.pid)
            if key in home and e.split != home[key]:
                counts = ", ".join(f"{n} in {s}" for s, n in sorted(per_id[key].items(), key=lambda x: SPLITS.index(x[0])))
                rejects.append(Reject(e.split, e.source, "identity in two splits",
                                      f"pid {bounded(e.pid)} has records {counts}: kept in {home[key]} "
                                      "(splits must be identity-disjoint)"))
            else:
                disjoint.append(e)
        kept = disjoint
    return kept, rejects


def hold_out_val(entries: list[Entry], fraction: float, seed: int) -> dict:
    """Move a seeded subset of train identities to val (for sets that ship no val split)."""
    pids = sorted({pid_key(e.pid) for e in entries if e.split == "train"})
    n = max(1, math.ceil(len(pids) * fraction)) if pids and fraction > 0 else 0
    chosen = set(random.Random(seed).sample(pids, n)) if n else set()
    for e in entries:
        if e.split == "train" and pid_key(e.pid) in chosen:
            e.split = "val"
    return {"kind": "held-out train identities", "fraction": fraction, "identities": n, "seed": seed}


def read_image_file(path: str, inside: str | None = None) -> tuple[bytes | None, tuple[str, str] | None]:
    """The bytes of a regular file of at most MAX_IMAGE_BYTES, or (None, (reason, detail)). A FIFO
    or device is never read (opened without blocking, then refused). With `inside` (a real path),
    the file opened must be under it: the path was checked when the annotations were screened, and
    whoever owns the folder could have swapped a link in since."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, ("missing image file", f"{path}: not found")
    except OSError as e:
        return None, ("missing image file", f"{path}: {e.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "folder" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else "special file"
            return None, ("not a regular file", f"{path} is a {what}")
        if st.st_size > MAX_IMAGE_BYTES:
            return None, ("image file too large", f"{path}: {st.st_size} bytes (at most {MAX_IMAGE_BYTES})")
        opened = opened_path(fd) if inside is not None else None
        if opened is not None and os.path.commonpath([opened, inside]) != inside:
            return None, ("path escapes the root", f"{path} led to {opened} when opened (a link swapped in after the "
                                                   "annotations were checked)")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except OSError as e:
        return None, ("unreadable or truncated image", f"{path}: {e.strerror}")
    finally:
        os.close(fd)
    if len(data) > MAX_IMAGE_BYTES:
        return None, ("image file too large", f"{path}: more than {MAX_IMAGE_BYTES} bytes")
    return data, None


def _load(job: tuple[Entry, tuple[int, int] | None]):
    """Worker: read, check and prepare one screened entry's image -> Record or Reject."""
    entry, resize = job
    data, problem = read_image_file(entry.file, entry.root)
    if problem is None:
        try:
            image = prepare_image(data, resize)
        except Exception as e:  # noqa: BLE001 - any decoder error: unreadable or truncated
            problem = failure_reason(e)
    if problem is not None:
        return Reject(entry.split, entry.source, *problem)
    return Record(split=entry.split, pid=entry.pid, image_id=entry.index, captions=entry.captions,
                  source=entry.source, image_bytes=image.data, image_ext=image.ext, width=image.width,
                  height=image.height, converted=image.converted)


def _load_chunk(jobs: list) -> list:
    return [_load(job) for job in jobs]


def worker_init() -> None:
    """A conversion worker dies with the build (Linux: PR_SET_PDEATHSIG) and leaves SIGINT and
    SIGTERM to it: the build stops its workers and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (AttributeError, OSError):
            pass
    if os.getppid() == 1:  # the build died before prctl took effect
        os._exit(1)


def load_images(jobs: list, workers: int, chunk: int = 16) -> Iterator:
    """`_load` over `jobs`, in order, in `workers` processes, a bounded number of chunks ahead (the
    images read wait in memory for the writer). BuildFailed if a worker dies (killed by the
    system, e.g. out of memory: a pool would wait for it forever)."""
    chunks = iter([jobs[i:i + chunk] for i in range(0, len(jobs), chunk)])
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=worker_init) as pool:
        pending = deque(pool.submit(_load_chunk, c) for c in itertools.islice(chunks, 4 * workers))
        try:
            while pending:
                try:
                    results = pending.popleft().result()
                except BrokenProcessPool:
                    raise BuildFailed("a worker process reading images died (killed by the system: out of "
                                      "memory?); no dataset written") from None
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append(pool.submit(_load_chunk, nxt))
                yield from results
        finally:
            for f in pending:
                f.cancel()


class _MissingFiles:
    """Watches the stream for missing image files and keeps a sample of their sources."""

    def __init__(self, records: Iterator, keep: int = 50):
        self.records, self.keep, self.sources = records, keep, []

    def __iter__(self):
        for r in self.records:
            if isinstance(r, Reject) and r.reason == "missing image file" and len(self.sources) < self.keep:
                if isinstance(r.source, str) and r.detail.endswith("not found"):
                    self.sources.append(r.source)
            yield r


def missing_files_hint(root: Path, image_root: Path, annotations: Path, sources: list[str]) -> str:
    """Where the missing image paths were looked for and, from a sample, where they exist."""
    if not image_root.is_dir():
        lead = f"the image folder {image_root} does not exist"
    else:
        lead = f"the image paths are read relative to {image_root}"
    if not sources:
        return lead
    candidates, seen = [], {os.path.realpath(image_root)}
    subfolders = []
    for base in (root, image_root):
        try:
            subfolders += sorted(p for p in base.iterdir() if p.is_dir())[:64]
        except OSError:
            pass
    for c in (root, annotations.parent, root.parent, *subfolders):
        real = os.path.realpath(c)
        if real not in seen:
            seen.add(real)
            candidates.append(c)
    found = max(((sum(os.path.isfile(os.path.join(c, s)) for s in sources), c) for c in candidates),
                key=lambda x: x[0], default=(0, None))
    if found[0] >= max(1, len(sources) // 2):
        return (f"{lead}: were they given relative to {found[1]}? ({found[0]} of {len(sources)} checked exist "
                f"there{'; for this format they must be relative to ' + str(image_root) if image_root != root else ''})")
    return (f"{lead}, and none of {len(sources)} checked is found relative to {root} or its folders either: is "
            f"--root the folder the annotations describe?")


def check_options(resize, workers, val_fraction) -> None:
    if resize is not None:
        if (not isinstance(resize, (tuple, list)) or len(resize) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 16384 for v in resize)):
            raise BuildError(f"--resize: expected HxW with integers in 1..16384, got {bounded(resize)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise BuildError(f"--workers: must be a positive integer, got {bounded(workers)}")
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise BuildError(f"--val-fraction: must be at least 0 and below 1, got {bounded(val_fraction)}")


def convert(dataset: str, root: str | os.PathLike, out: str | os.PathLike, *, annotations: str | None = None,
            resize: tuple[int, int] | None = None, workers: int | None = None, val_fraction: float = 0.05,
            seed: int = 0, strict: bool = False, allow_rejects: bool = False, max_samples: int = SHARD_SAMPLES,
            max_bytes: int = SHARD_BYTES, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert a raw dataset to shards; returns the dataset.json dict (plus `images_per_s`).
    Raises BuildError (ConvertError, RejectsError, OutputBusy) when it cannot be done as asked,
    BuildFailed or OSError when it fails while running; either way `out` is left as it was."""
    if dataset not in FORMATS:
        raise BuildError(f"unknown dataset {dataset!r}: one of {', '.join(FORMATS)}")
    fmt = FORMATS[dataset]
    check_options(resize, workers, val_fraction)
    root = Path(root)
    if not root.is_dir():
        raise ConvertError(f"--root {root}: not a directory")
    ann = find_annotations(fmt, root, annotations)
    started = time.time()
    with DatasetWriter(out, dataset, max_samples=max_samples, max_bytes=max_bytes, overwrite=overwrite) as writer:
        entries, rejects = read_entries(fmt, ann, None if annotations else root)
        image_root = root / fmt.image_dir
        check_found(root, image_root, "the images folder")
        entries, screened = screen(entries, image_root)
        rejects += screened
        writer.extra.update({"builder": {"dataset": dataset, "root": str(root), "annotations": ann.name},
                             "resized": list(resize) if resize else None})
        if dataset == "icfg-pedes":
            writer.extra["val_policy"] = hold_out_val(entries, val_fraction, seed)
        # Train grouped by identity (the writer needs it), then val and test, each in file order.
        order = {s: i for i, s in enumerate(SPLITS)}
        entries.sort(key=lambda e: (order[e.split], pid_key(e.pid) if e.split == "train" else "", e.index))
        jobs = [(e, tuple(resize) if resize else None) for e in entries]
        stream = _MissingFiles(itertools.chain(rejects, load_images(jobs, workers or os.cpu_count() or 1)))
        feed(writer, stream, total=len(rejects) + len(jobs), progress=progress)
        explain = (lambda reason: missing_files_hint(root, image_root, ann, stream.sources)
                   if reason == "missing image file" else "")
        info = writer.close(strict, allow_rejects, explain)
    info["images_per_s"] = info["read"] / max(time.time() - started, 1e-9)
    return info

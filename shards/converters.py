"""Converters from the raw TBPS benchmarks (and users' own JSONL) to the shard format.

Each format's annotation file becomes a list of `Entry` (split, id, captions, image path);
images are read, checked and optionally pre-resized in parallel worker processes; the writer
then validates and writes them in order (train sorted by identity). Every entry ends up either
written or in the rejects file with its reason. Image paths that escape the dataset root
(absolute, `..`, or a link pointing outside) are rejected without being opened.

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
import io
import json
import math
import os
import random
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

from PIL import Image

from .schema import SPLITS
from .writer import SHARD_BYTES, SHARD_SAMPLES, Record, Reject, write_dataset


@dataclasses.dataclass
class Entry:
    """One annotation record, before its image is read."""

    index: int  # position in the annotation file: the image id
    split: object
    pid: object
    captions: object
    path: object  # image path relative to the image folder


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


class ConvertError(RuntimeError):
    """The raw dataset cannot be converted at all (missing or malformed annotation file)."""


def find_annotations(fmt: Format, root: Path, annotations: str | None) -> Path:
    if annotations:
        path = Path(annotations)
        if not path.exists():
            raise ConvertError(f"--annotations {path}: file not found")
        return path
    for name in fmt.annotation_files:
        if (root / name).exists():
            return root / name
    raise ConvertError(f"{fmt.name}: none of {', '.join(fmt.annotation_files)} found in {root} "
                       f"(or pass --annotations FILE)")


def read_entries(fmt: Format, path: Path) -> tuple[list[Entry], list[Reject]]:
    """Entries of an annotation file, plus rejects for records that are not even objects."""
    try:
        if fmt.name == "jsonl":
            raw = []
            for n, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    try:
                        raw.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raw.append(ConvertError(f"line {n + 1}: {e}"))
        else:
            raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read the annotations: {e}") from None
    if not isinstance(raw, list):
        raise ConvertError(f"{path}: expected a list of records, got {type(raw).__name__}")
    entries, rejects = [], []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            rejects.append(Reject(None, f"{path.name}[{i}]", "malformed record", str(r)[:200]))
            continue
        split = r.get("split")
        pid = r.get(fmt.id_key)
        if fmt.name == "cuhk-pedes" and split is None and isinstance(pid, int):
            split = next((s for lo, hi, s in CUHK_SPLIT_BY_ID if lo <= pid <= hi), None)
        entries.append(Entry(i, split, pid, r.get("captions"), r.get(fmt.path_key)))
    return entries, rejects


def hold_out_val(entries: list[Entry], fraction: float, seed: int) -> dict:
    """Move a seeded subset of train identities to val (for sets that ship no val split)."""
    pids = sorted({e.pid for e in entries if e.split == "train" and e.pid is not None}, key=str)
    n = max(1, math.ceil(len(pids) * fraction)) if pids and fraction > 0 else 0
    chosen = set(random.Random(seed).sample(pids, n)) if n else set()
    for e in entries:
        if e.split == "train" and e.pid in chosen:
            e.split = "val"
    return {"kind": "held-out train identities", "fraction": fraction, "identities": n, "seed": seed}


def safe_image_path(image_root: Path, rel) -> tuple[Path | None, str]:
    """(path, "") inside the root, or (None, why) for a path that is not a relative path inside it."""
    if not isinstance(rel, str) or not rel:
        return None, "no image path"
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        return None, f"path escapes the root: {rel}"
    path = image_root / rel
    real_root = os.path.realpath(image_root)
    if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        return None, f"path escapes the root through a link: {rel}"
    return path, ""


def _load(job: tuple[Entry, str, tuple[int, int] | None]):
    """Worker: read, check and optionally resize one entry's image -> Record or Reject."""
    entry, image_root, resize = job
    source = entry.path if isinstance(entry.path, str) else repr(entry.path)
    path, why = safe_image_path(Path(image_root), entry.path)
    if path is None:
        return Reject(entry.split, source, "path escapes the root" if "escapes" in why else "missing image file", why)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Reject(entry.split, source, "missing image file", str(path))
    except OSError as e:
        return Reject(entry.split, source, "missing image file", f"{path}: {e.strerror}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            size = im.size
            if resize is not None:
                out = io.BytesIO()
                im.convert("RGB").resize((resize[1], resize[0]), Image.BICUBIC).save(out, format="JPEG", quality=95)
                data, size = out.getvalue(), (resize[1], resize[0])
            ext = "jpg" if resize is not None else _extension(im.format, path)
    except Exception as e:  # noqa: BLE001 - any decoder error: unreadable or truncated
        return Reject(entry.split, source, "unreadable or truncated image", f"{type(e).__name__}: {e}")
    return Record(split=entry.split, pid=entry.pid, image_id=entry.index, captions=entry.captions, source=source,
                  image_bytes=data, image_ext=ext, width=size[0], height=size[1])


def _extension(pil_format: str | None, path: Path) -> str:
    known = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
    return known.get(pil_format or "", path.suffix.lstrip(".").lower() or "jpg")


def convert(dataset: str, root: str | os.PathLike, out: str | os.PathLike, *, annotations: str | None = None,
            resize: tuple[int, int] | None = None, workers: int | None = None, val_fraction: float = 0.05,
            seed: int = 0, strict: bool = False, max_samples: int = SHARD_SAMPLES, max_bytes: int = SHARD_BYTES,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Convert a raw dataset to shards; returns the dataset.json dict (plus `images_per_s`)."""
    fmt = FORMATS[dataset]
    root = Path(root)
    if not root.is_dir():
        raise ConvertError(f"--root {root}: not a directory")
    ann = find_annotations(fmt, root, annotations)
    entries, rejects = read_entries(fmt, ann)
    extra = {"builder": {"dataset": dataset, "root": str(root), "annotations": ann.name},
             "resized": list(resize) if resize else None}
    if dataset == "icfg-pedes":
        extra["val_policy"] = hold_out_val(entries, val_fraction, seed)
    # Known splits first, train grouped by identity (the writer needs it), the rest in file order.
    order = {s: i for i, s in enumerate(SPLITS)}
    entries.sort(key=lambda e: (order.get(e.split, len(SPLITS)), str(e.pid) if e.split == "train" else "", e.index))
    image_root = str(root / fmt.image_dir)
    jobs = [(e, image_root, resize) for e in entries]
    started = time.time()
    with get_context("fork").Pool(workers or os.cpu_count() or 1) as pool:
        records: Iterator = pool.imap(_load, jobs, chunksize=8)
        info = write_dataset(_chain(rejects, records), out, dataset, total=len(rejects) + len(jobs),
                             progress=progress, max_samples=max_samples, max_bytes=max_bytes,
                             overwrite=overwrite, extra=extra, strict=strict)
    info["images_per_s"] = info["read"] / max(time.time() - started, 1e-9)
    return info


def _chain(first, rest):
    yield from first
    yield from rest

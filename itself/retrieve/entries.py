"""The entries of an index folder's JSON files (index.json, plan.json, part-*.json), checked before
anything is done with them: an index folder may come from someone else. Types, ranges, counts
that must agree, names of the pattern this index writes; an error names the file and the entry.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from ..safeio import UnsafePath, read_regular, shown
from .errors import RetrieveError
from .gallery import check_root

FORMAT = "itself-index/3"
KINDS = ("flat", "hnsw")  # vector index types (vectors.py)
MAX_JSON_BYTES = 256 << 20  # an index.json or a part's item list (a 100k-image shard: ~30 MB)
MAX_BATCHES = 10_000
MAX_UNITS = 10_000_000
MAX_DIM = 1 << 16
_HEX64 = re.compile(r"[0-9a-f]{64}")
DAMAGED = "the index folder is damaged or was changed: build the index again with `index` (into a new --out)"


def damaged(where, entry: str, why: str) -> RetrieveError:
    return RetrieveError(f"{where}: entry {entry} {why}; {DAMAGED}")


def read_json(path: Path, where) -> object:
    """A JSON file of the index folder: a regular file (no link), bounded, UTF-8."""
    try:
        return json.loads(read_regular(path, str(where), MAX_JSON_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise RetrieveError(f"{where} is missing; {DAMAGED}") from None
    except UnsafePath as e:
        raise RetrieveError(f"{e}; {DAMAGED}") from None
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise RetrieveError(f"{where}: unreadable ({type(e).__name__}: {str(e)[:200]}); {DAMAGED}") from None


class Fields:
    """Checks of one JSON object's entries, errors naming the file and the entry."""

    def __init__(self, obj, where, prefix: str = ""):
        self.where, self.prefix = where, prefix
        if not isinstance(obj, dict):
            raise damaged(where, prefix or "(the file)", f"is a {type(obj).__name__}, not an object")
        self.obj = obj

    def get(self, key: str, kinds: type | tuple, optional: bool = False):
        value = self.obj.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
            raise damaged(self.where, self.prefix + key, f"is {shown(value, 80)}, not a {_names(kinds)}")
        return value

    def int(self, key: str, lo: int, hi: int) -> int:
        value = self.get(key, int)
        if not lo <= value <= hi:
            raise damaged(self.where, self.prefix + key, f"is {value}, not in {lo}..{hi}")
        return value

    def text(self, key: str, limit: int = 4096, optional: bool = False) -> str | None:
        value = self.get(key, str, optional)
        if value is not None and (len(value) > limit or "\x00" in value):
            raise damaged(self.where, self.prefix + key, f"is not a name ({len(value)} characters)")
        return value

    def hex64(self, key: str) -> str:
        value = self.get(key, str)
        if not _HEX64.fullmatch(value):
            raise damaged(self.where, self.prefix + key, f"is {shown(value, 80)}, not a sha256")
        return value

    def counts(self, key: str, limit: int) -> list[int]:
        value = self.get(key, list)
        if len(value) > limit or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 40
                                         for v in value):
            raise damaged(self.where, self.prefix + key, "is not a list of counts")
        return value


def _tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _names(kinds) -> str:
    names = {int: "number", float: "number", str: "string", list: "list", dict: "object", bool: "boolean"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in _tuple(kinds)))


def check_info(info, where) -> dict:
    """index.json's entries, checked (see the module docstring); returns info."""
    f = Fields(info, where)
    if info.get("format") != FORMAT:
        raise RetrieveError(f"{where}: an index of format {shown(info.get('format', 'itself-index/1'), 60)}, this "
                            f"version reads {FORMAT!r}; build the index again with `index` (into a new --out)")
    model = f.text("model")
    if not os.path.isabs(model):
        raise damaged(where, "model", f"is {shown(model, 80)}, not an absolute path")
    f.hex64("model_sha256")
    for key, limit in (("arch", 100), ("gallery", 4096), ("split", 100)):
        f.text(key, limit)
    size = f.counts("image_size", 2)
    if len(size) != 2 or not all(1 <= v <= 8192 for v in size):
        raise damaged(where, "image_size", "is not [height, width]")
    f.int("global_dim", 1, MAX_DIM)
    f.int("grab_dim", 0, MAX_DIM)
    a = f.get("fusion_weight", (int, float))
    if not (math.isfinite(a) and 0 <= a <= 1):
        raise damaged(where, "fusion_weight", f"is {a}, not in 0..1")
    spec = Fields(f.get("index", dict), where, "index.")
    if spec.get("kind", str) not in KINDS or set(info["index"]) != {"kind", "pca_dim", "hnsw_m", "ef_construction"}:
        raise damaged(where, "index", f"is {shown(str(info['index']), 120)}, not an index type")
    for key in ("pca_dim", "hnsw_m", "ef_construction"):
        spec.int(key, 1, 1 << 20)
    generation = f.int("generation", 1, 999_999_999)
    if f.text("vectors", 100) != f"vectors-{generation:04d}.faiss":
        raise damaged(where, "vectors", f"is {shown(info['vectors'], 80)}; this index writes "
                      f"vectors-{generation:04d}.faiss (generation {generation}) and reads nothing else")
    batches = f.get("batches", list)
    if not 1 <= len(batches) <= MAX_BATCHES:
        raise damaged(where, "batches", f"holds {len(batches)} batches")
    for n, batch in enumerate(batches):
        b = Fields(batch, where, f"batches[{n}].")
        if b.int("number", 0, MAX_BATCHES) != n:
            raise damaged(where, f"batches[{n}].number", f"is {batch['number']}, not {n}")
        check_root(b.text("root"), f"{where}: entry batches[{n}].root")
        b.text("gallery")
        b.text("split", 100)
        b.hex64("digest")
        counts = b.counts("part_images", MAX_UNITS)
        if b.int("images", 0, 1 << 40) != sum(counts):
            raise damaged(where, f"batches[{n}].images", f"is {batch['images']}, its parts hold {sum(counts)}")
        for key in ("skipped", "duplicates", "already", "refused"):
            b.int(key, 0, 1 << 40)
    if f.int("images", 0, 1 << 40) != sum(b["images"] for b in batches):
        raise damaged(where, "images", f"is {info['images']}, the batches hold {sum(b['images'] for b in batches)}")
    f.int("skipped", 0, 1 << 40)
    return info


def check_plan(plan, where) -> dict:
    f = Fields(plan, where)
    f.int("units", 0, MAX_UNITS)
    for key, limit in (("gallery", 4096), ("split", 100), ("model", 4096)):
        f.text(key, limit)
    f.hex64("model_sha256")
    f.hex64("digest")
    check_root(f.text("root"), f"{where}: entry root")
    return plan


def check_meta(meta, where) -> dict:
    """A part's item list, checked; returns it."""
    f = Fields(meta, where)
    items = f.get("items", list)
    if f.int("images", 0, 1 << 40) != len(items):
        raise damaged(where, "images", f"is {meta['images']}, the part lists {len(items)} items")
    f.int("skipped", 0, 1 << 40)
    f.int("duplicates", 0, 1 << 40)
    f.text("stamp", 100, optional=True)
    for i, item in enumerate(items):
        g = Fields(item, where, f"items[{i}].")
        g.text("name")
        g.hex64("sha256")
        g.int("bytes", 0, 1 << 40)
        pid = g.get("pid", (int, str), optional=True)
        if isinstance(pid, str) and len(pid) > 256:
            raise damaged(where, f"items[{i}].pid", "is longer than 256 characters")
        if ("file" in item) == ("shard" in item):
            raise damaged(where, f"items[{i}]", "names no place in the gallery (one of file, or shard and key)")
        for key in ("file",) if "file" in item else ("shard", "key"):
            g.text(key)
    return meta

"""Built datasets wherever they live: a local folder or a URL that fsspec opens (`https://`,
`s3://`, `gs://`, ...). dataset.json, the manifest's train rows, and shard bytes (whole shards
streamed, or a sample range read from its offsets)."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from shards import schema

from ..errors import DataError
from .plan import IdentityTable

# -------------------------------------------------------------------------------- locations


def is_url(path: str) -> bool:
    return "://" in str(path)


def join(root: str, *parts: str) -> str:
    """A path under `root`, local or URL."""
    return "/".join([str(root).rstrip("/"), *parts]) if is_url(root) else str(Path(root, *parts))


def _fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise DataError(f"cannot open {url}: {e} (install the fsspec backend of that scheme, e.g. s3fs, gcsfs, "
                        "aiohttp for https)") from None


def _open(path: str, mode: str = "rb"):
    if not is_url(path):
        return open(path, mode)
    fs, p = _fs(path)
    return fs.open(p, mode)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    try:
        return fs.exists(p)
    except Exception as e:  # noqa: BLE001 - a server error, no route
        raise DataError(f"cannot reach {path}: {type(e).__name__}: {e}") from None


def read_json(path: str) -> dict:
    try:
        with _open(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file (a ranged request for URLs)."""
    try:
        with _open(url) as f:
            f.seek(start)
            data = f.read(end - start)
    except Exception as e:  # noqa: BLE001 - IO errors of any kind
        raise DataError(f"cannot read shard {url}: {type(e).__name__}: {e}") from None
    if len(data) != end - start:
        raise DataError(f"cannot read shard {url}: it ends before byte {end} (truncated, or from another build); "
                        "rebuild the dataset")
    return data


def open_stream(url: str):
    """A whole shard as a byte stream: local files and fsspec URLs; `pipe:` commands through webdataset."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url)
    return _open(url)


# -------------------------------------------------------------------------------- tar samples

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = the path up to the first dot of the file name


def tar_samples(stream, url: str) -> Iterator[dict]:
    """Samples ({'__key__', '__url__', ext: bytes}) of a tar stream, in order; errors name the shard."""
    sample: dict | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                m = _MEMBER.match(member.name)
                if m is None:
                    continue
                key, ext = m.groups()
                if key.startswith("/") or ".." in key.split("/"):  # read, never unpacked; refuse anyway
                    raise DataError(f"cannot read shard {url}: member {key!r} has an unsafe path (absolute or '..')")
                if sample is not None and sample["__key__"] != key:
                    yield _checked(sample, url)
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = tar.extractfile(member).read()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - tar/IO errors of any kind
        raise DataError(f"cannot read shard {url}: {e}") from e
    if sample is not None:
        yield _checked(sample, url)


def _checked(sample: dict, url: str) -> dict:
    if schema.META_EXT not in sample or not any(ext in sample for ext in schema.IMAGE_EXTS):
        raise DataError(f"cannot read shard {url}: sample {sample['__key__']} lacks its "
                        f"{'metadata' if schema.META_EXT not in sample else 'image'} member "
                        "(a truncated or damaged shard); rebuild the dataset")
    return sample


def iter_shard(url: str) -> Iterator[dict]:
    """Every sample of one shard, streamed."""
    try:
        stream = open_stream(url)
    except FileNotFoundError:
        raise DataError(f"shard not found: {url}") from None
    except OSError as e:
        raise DataError(f"cannot read shard {url}: {e}") from None
    with stream:
        yield from tar_samples(stream, url)


def image_member(sample: dict) -> bytes:
    """The encoded image of a shard sample, whatever its extension."""
    for ext in schema.IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image member "
                    f"(expected one of {', '.join(schema.IMAGE_EXTS)})")


# -------------------------------------------------------------------------------- datasets


def dataset_info(root: str) -> dict:
    """dataset.json of a built dataset (local or URL), its schema version checked."""
    path = join(root, schema.DATASET_FILE)
    if not exists(path):
        raise DataError(f"{path} not found: {root} is not a built dataset. Build it with "
                        f"`python -m shards build --dataset ... --out {root}` or set data.root")
    info = read_json(path)
    check_schema_version(info.get("schema_version"), path)
    return info


def check_schema_version(version, where) -> None:
    """A DataError unless `version` (of dataset.json or the manifest) is one this code reads."""
    if version not in schema.READABLE_VERSIONS:
        readable = ", ".join(map(str, schema.READABLE_VERSIONS))
        raise DataError(f"{where}: shard schema version {version} is not one this code reads ({readable}); "
                        f"rebuild the dataset with `python -m shards build` (or use the code that wrote it)")


def shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _manifest(root: str, columns: list[str], filters: list) -> dict[str, np.ndarray | list]:
    """Columns of the manifest's rows that pass `filters` (pyarrow reads only what it needs)."""
    import pyarrow.parquet as pq

    path = join(root, schema.MANIFEST_FILE)
    if not exists(path):
        raise DataError(f"{path} not found: the train pipeline plans batches from the manifest")
    fs, where = _fs(path) if is_url(path) else (None, path)
    try:
        meta = pq.read_schema(where, filesystem=fs)
        v2 = all(c in meta.names for c in schema.V2_COLUMNS)
        table = pq.read_table(where, filesystem=fs, columns=_available(columns, v2), filters=filters)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise DataError(f"cannot read {path}: {e}") from None
    version = (meta.metadata or {}).get(schema.MANIFEST_VERSION_KEY)
    if version is not None:  # (manifests written before versioning carry none: dataset.json's applies)
        check_schema_version(int(version) if version.isdigit() else version.decode(errors="replace"), path)
    out = {name: table.column(name) for name in table.column_names}
    if "num_captions" in columns and "num_captions" not in out:  # a v1 manifest: count them
        import pyarrow.compute as pc

        out["num_captions"] = pc.list_value_length(out.pop("captions"))
    return {name: (col.to_pylist() if name == "key" else col.to_numpy()) for name, col in out.items()
            if name in columns}


def _available(columns: list[str], v2: bool) -> list[str]:
    if v2:
        return columns
    return [c for c in columns if c not in schema.V2_COLUMNS] + (["captions"] if "num_captions" in columns else [])


class ShardRows:
    """The train rows of one shard, in tar order: keys, caption counts, and (v2) byte ranges."""

    def __init__(self, url: str, cols: dict):
        self.url, self.keys = url, cols["key"]
        self.captions = np.asarray(cols["num_captions"], np.int64)
        self.offset = np.asarray(cols["offset"]) if "offset" in cols else None
        self.end = self.offset + np.asarray(cols["size"]) if "size" in cols else None

    def byte_range(self, lo: int, hi: int) -> tuple[int, int] | None:
        """Bytes holding rows [lo, hi), or None when the manifest has no offsets (schema 1)."""
        return None if self.offset is None else (int(self.offset[lo]), int(self.end[hi - 1]))


class TrainData:
    """The train split of one or more built datasets (a weighted mixture): the shard URLs, the
    compact identity table every process lays epochs out with, and each shard's rows on demand
    (only for the shards a reader reads). Labels of a mixture's datasets are offset so that they
    never collide."""

    def __init__(self, sources: list[tuple[str, list[str], float]]):
        """`sources`: (dataset root, its train shard URLs, weight) per dataset."""
        self.roots, self.urls, self.pid_offset, self._rows = [], [], [], {}
        self.dataset_of_shard = []
        shards, pids, captions, copies, offset = [], [], [], [], 0
        for d, (root, urls, weight) in enumerate(sources):
            info = dataset_info(root)
            first = len(self.urls)
            names = {shard_name(u): first + i for i, u in enumerate(urls)}
            cols = _manifest(root, ["shard", "pid", "num_captions"], [("split", "=", "train")])
            idx = np.array([names.get(n, -1) for n in np.asarray(cols["shard"], dtype=object)], np.int64)
            missing = sorted(set(names) - set(np.asarray(cols["shard"], dtype=object)))
            if missing:
                raise DataError(f"train shard {missing[0]} is not in {join(root, schema.MANIFEST_FILE)}: shards and "
                                "manifest must come from one build")
            keep = idx >= 0  # (data.train_shards may list a subset)
            shards.append(idx[keep])
            pids.append(np.asarray(cols["pid"], np.int64)[keep] + offset)
            captions.append(np.asarray(cols["num_captions"], np.int64)[keep])
            self.roots.append(root)
            self.urls += list(urls)
            self.dataset_of_shard += [d] * len(urls)
            self.pid_offset.append(offset)
            copies.append(np.full(len(urls), weight, np.float32))
            offset += int(info["train_identities"])
        self.num_ids = offset
        shard = np.concatenate(shards)
        order = np.argsort(shard, kind="stable")  # shard-list order; tar order within a shard
        self.table = IdentityTable.from_rows(shard[order], np.concatenate(pids)[order],
                                             np.concatenate(captions)[order], len(self.urls), np.concatenate(copies))

    def rows(self, shard: int) -> ShardRows:
        if shard not in self._rows:
            d, url = self.dataset_of_shard[shard], self.urls[shard]
            cols = _manifest(self.roots[d], ["key", "num_captions", "offset", "size"],
                             [("split", "=", "train"), ("shard", "=", shard_name(url))])
            self._rows[shard] = ShardRows(url, cols)
        return self._rows[shard]

    def captions_of(self, shard: int, row: int) -> int:
        return int(self.rows(shard).captions[row])

    def read_segment(self, shard: int, lo: int, hi: int) -> Iterator[dict]:
        """The samples of rows [lo, hi) of a shard: one ranged read when the manifest has byte
        offsets, else the shard streamed up to them. Each is checked against the manifest's key."""
        rows = self.rows(shard)
        span = rows.byte_range(lo, hi)
        if span is not None:
            stream = io.BytesIO(read_range(rows.url, *span))
            samples = tar_samples(stream, rows.url)
        else:
            samples = (s for i, s in enumerate(iter_shard(rows.url)) if i >= lo)
        expected = iter(rows.keys[lo:hi])
        for key in expected:
            sample = next(samples, None)
            if sample is None:
                raise DataError(f"sample {key} listed in the manifest is missing from shard {rows.url}: rebuild "
                                "the dataset")
            if sample["__key__"] != key:
                raise DataError(f"shard {rows.url} does not match the manifest (sample {sample['__key__']} where "
                                f"{key} is listed): shards and manifest must come from one build")
            yield sample

"""Built datasets wherever they live (`locations`: a folder or a URL): dataset.json, the manifest's
train rows, and shard samples (whole shards streamed, or a sample range read from its offsets),
each checked against the manifest."""

from __future__ import annotations

import io
import json
import re
import tarfile
from typing import Iterator

import numpy as np

from shards import schema

from ..errors import DataError
from ..safeio import shown
from .locations import (  # noqa: F401 - (the rest re-exported: the readers' one import)
    _fs, exists, is_command, is_url, join, local_file, open_random_access, open_stream, ranged, read_json, read_range,
    read_whole, serves_ranges)
from .plan import IdentityTable, join_runs

# -------------------------------------------------------------------------------- tar samples

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = the path up to the first dot of the file name


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member's name as webdataset splits it, or None for a name that is
    no sample member."""
    m = _MEMBER.match(name)
    return m.groups() if m else None


MAX_TAR_HEADER_BYTES = 1 << 20
"""Largest extended header (pax, GNU long name) read: a long file name takes a few KiB."""
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)


class BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended headers (pax, GNU long names) are refused past
    MAX_TAR_HEADER_BYTES before tarfile reads one whole: they come before the member they describe,
    so a member's own size check would come too late (a header claiming 50 GiB)."""

    def _proc_member(self, tarfile_):
        if self.type in _EXTENDED and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(f"an extended header of {self.size} bytes (at most "
                                                f"{MAX_TAR_HEADER_BYTES} read): refused unread")
        return super()._proc_member(tarfile_)


def tar_samples(stream, url: str) -> Iterator[dict]:
    """Samples ({'__key__', '__url__', ext: bytes}) of a tar stream, in order; errors name the shard.
    A key met again after another one, or a member twice in one sample, is refused: which of the
    two is the sample would otherwise depend on the reader (a scan keeps the first, an index of
    members the last)."""
    sample: dict | None = None
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=BoundedTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.size > schema.MAX_MEMBER_BYTES:  # (checked before a byte of it is read)
                    raise DataError(f"cannot read shard {url}: member {shown(member.name)} is {member.size} bytes, more "
                                    f"than a built shard holds ({schema.MAX_MEMBER_BYTES >> 20} MiB): refused unread")
                parts = split_member(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if key.startswith("/") or ".." in key.split("/"):  # read, never unpacked; refuse anyway
                    raise DataError(f"cannot read shard {url}: member {key!r} has an unsafe path (absolute or '..')")
                if sample is not None and sample["__key__"] != key:
                    yield _checked(sample, url)
                    sample = None
                if sample is None:
                    if key in seen:
                        raise DataError(f"cannot read shard {url}: key {key!r} appears twice (two samples with "
                                        "one key); rebuild the shard")
                    seen.add(key)
                    sample = {"__key__": key, "__url__": url}
                if ext in sample:
                    raise DataError(f"cannot read shard {url}: member {key}.{ext} appears twice; rebuild the shard")
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


def iter_shard(url: str, commands: bool = False) -> Iterator[dict]:
    """Every sample of one shard, streamed (`commands`: see `open_stream`)."""
    try:
        stream = open_stream(url, commands)
    except FileNotFoundError:
        raise DataError(f"shard not found: {url}") from None
    except OSError as e:
        raise DataError(f"cannot read shard {url}: {e}") from None
    with stream:
        yield from tar_samples(stream, url)


def check_sample(sample: dict, key: str, sha256: str | None, captions: int | None = None) -> None:
    """A DataError unless a sample is what the manifest lists: its key, its image's digest (a
    shard swapped for one of another build, or changed after it, is never read as data) and its
    caption count."""
    import hashlib

    url = sample.get("__url__")
    if sample["__key__"] != key:
        raise DataError(f"shard {url} does not match the manifest (sample {sample['__key__']} where {key} is "
                        "listed): shards and manifest must come from one build")
    if sha256 and hashlib.sha256(image_member(sample)).hexdigest() != sha256:
        raise DataError(f"shard {url}: sample {key}'s image does not match the manifest's sha256 (the shard was "
                        "changed after the build, or comes from another build); rebuild the dataset")
    if captions is not None:
        found = len(json.loads(sample[schema.META_EXT]).get("captions") or [])
        if found != captions:
            raise DataError(f"shard {url}: sample {key} holds {found} captions, the manifest lists {captions}: "
                            "shards and manifest must come from one build")


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
    info = read_json(path, f"dataset {root}")
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


def _identity_runs(root: str, index_of: dict[str, int], pid_offset: int, batch_rows: int = 1 << 17) -> tuple:
    """(shard index, pid, images, pairs) of every train identity of a manifest, read in batches of
    rows (dictionary-encoded shard names: no Python string per row) and folded into runs as they
    come, so memory follows the identities. Rows of shards not in `index_of` are left out."""
    import pyarrow.parquet as pq

    path = join(root, schema.MANIFEST_FILE)
    if not exists(path):
        raise DataError(f"{path} not found: the train pipeline plans batches from the manifest")
    try:
        with open_random_access(path) as f:
            pf = pq.ParquetFile(f, read_dictionary=["split", "shard"])
            _check_manifest_version(pf.schema_arrow.metadata, path)
            v2 = all(c in pf.schema_arrow.names for c in schema.V2_COLUMNS)
            columns = ["split", "shard", "pid", "num_captions" if v2 else "captions"]
            _refuse_bomb(pf.metadata, columns, path)
            listed: set[str] = set()

            def batches():
                for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                    split, shard = batch.column(0), batch.column(1)
                    names = shard.dictionary.to_pylist()
                    listed.update(names)
                    index = np.array([index_of.get(n, -1) for n in names] + [-1], np.int64)[
                        shard.indices.to_numpy(zero_copy_only=False)]
                    train = split.dictionary.to_pylist().index("train") if "train" in split.dictionary.to_pylist() \
                        else -1
                    keep = (split.indices.to_numpy(zero_copy_only=False) == train) & (index >= 0)
                    captions = _caption_counts(batch.column(3))
                    yield index[keep], batch.column(2).to_numpy()[keep] + pid_offset, captions[keep]

            runs = join_runs(batches())
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise DataError(f"cannot read {path}: {e}") from None
    missing = sorted(set(index_of) - listed)
    if missing:
        raise DataError(f"train shard {missing[0]} is not in {path}: shards and manifest must come from one build")
    return runs


def _check_consistent(root: str, info: dict, runs: tuple, index_of: dict[str, int], pid_offset: int) -> None:
    """dataset.json and the manifest agree on the train split, before the first step (else an
    error deep in a worker, or a label past the classifier, much later)."""
    shard, pid, images, _ = runs
    listed = {s["name"]: s["samples"] for s in info["splits"]["train"]["shards"]}
    per_shard = np.bincount(shard - min(index_of.values(), default=0), weights=images,
                            minlength=len(index_of)) if len(shard) else np.zeros(len(index_of))
    for name, index in index_of.items():
        found, expected = int(per_shard[index - min(index_of.values())]), listed.get(name)
        if expected is not None and found != expected:
            raise DataError(f"{root}: dataset.json lists {expected} samples in train shard {name}, the manifest "
                            f"{found}: they come from different builds; rebuild the dataset")
    identities = int(info.get("train_identities", -1))
    labels = pid - pid_offset
    if len(labels) and (labels.min() < 0 or labels.max() >= identities):
        raise DataError(f"{root}: the manifest's train labels run to {int(labels.max())}, dataset.json lists "
                        f"{identities} train identities: they come from different builds; rebuild the dataset")


def _caption_counts(column) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):  # schema 1: the captions
        return pc.list_value_length(column).to_numpy(zero_copy_only=False)
    return column.to_numpy()


def _check_manifest_version(metadata, path: str) -> None:
    version = (metadata or {}).get(schema.MANIFEST_VERSION_KEY)
    if version is not None:  # (manifests written before versioning carry none: dataset.json's applies)
        check_schema_version(int(version) if version.isdigit() else version.decode(errors="replace"), path)


def _refuse_bomb(metadata, columns, path: str) -> None:
    """DataError when reading `columns` of the manifest would decompress far more than it holds
    (its own metadata says so; a dataset folder may come from anyone)."""
    from shards.corpora import text_bomb

    bomb = text_bomb(metadata, columns)
    if bomb:
        raise DataError(f"{path}: {bomb}: refused without decompressing it (not a manifest `shards build` writes)")


def read_manifest(root: str, columns: list[str] | None = None, filters=None):
    """The manifest's rows (a pyarrow Table) of a built dataset, local or URL, its version checked."""
    import pyarrow.parquet as pq

    import pyarrow as pa

    path = join(root, schema.MANIFEST_FILE)
    try:
        fs, where = _fs(path) if is_url(path) else (None, local_file(path))
        if fs is not None and not ranged(path):  # (Parquet is read by range: without ranges, read it whole)
            fs, where = None, pa.py_buffer(read_whole(path))
        source = (lambda: pa.BufferReader(where)) if isinstance(where, pa.Buffer) else (lambda: where)
        _check_manifest_version(pq.read_schema(source(), filesystem=fs).metadata, path)
        _refuse_bomb(pq.read_metadata(source(), filesystem=fs), columns, path)
        return pq.read_table(source(), filesystem=fs, columns=columns, filters=filters)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise DataError(f"cannot read {path}: {e}") from None


def split_digests(root: str, split: str) -> dict[str, str]:
    """{sample key: image sha256} of an eval split, from the manifest (val and test are small)."""
    path = join(root, schema.MANIFEST_FILE)
    if not exists(path):
        raise DataError(f"{path} not found: evaluation checks every image against the manifest")
    table = read_manifest(root, ["key", "sha256"], [("split", "=", split)])
    return dict(zip(table["key"].to_pylist(), table["sha256"].to_pylist()))


def _shard_rows(root: str, names: list[str]) -> dict[str, dict]:
    """{shard name: its train rows' key, num_captions, offset, size} for `names`, reading only the
    manifest's row groups whose shard range (Parquet statistics; rows are in shard order) holds one."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = join(root, schema.MANIFEST_FILE)
    try:
        with open_random_access(path) as f:
            pf = pq.ParquetFile(f)
            _check_manifest_version(pf.schema_arrow.metadata, path)
            column = pf.schema_arrow.get_field_index("shard")
            groups = [g for g in range(pf.metadata.num_row_groups)
                      if _may_hold(pf.metadata.row_group(g).column(column).statistics, names)]
            v2 = all(c in pf.schema_arrow.names for c in schema.V2_COLUMNS)
            columns = ["split", "shard", "sha256", *_available(["key", "num_captions", "offset", "size"], v2)]
            _refuse_bomb(pf.metadata, columns, path)
            table = pf.read_row_groups(groups, columns=columns)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise DataError(f"cannot read {path}: {e}") from None
    table = table.filter(pc.and_(pc.equal(table["split"], "train"), pc.is_in(table["shard"], value_set=pa_strings(names))))
    shard = table.column("shard").to_pylist()
    out = {}
    bounds = [i for i in range(1, len(shard)) if shard[i] != shard[i - 1]]
    for lo, hi in zip([0, *bounds], [*bounds, len(shard)]):
        part = table.slice(lo, hi - lo)
        cols = {"key": part.column("key").to_pylist(), "sha256": part.column("sha256").to_pylist()}
        if "captions" in part.column_names:
            cols["num_captions"] = pc.list_value_length(part.column("captions")).to_numpy()
        else:
            cols.update({c: part.column(c).to_numpy() for c in ("num_captions", "offset", "size")})
        out[shard[lo]] = cols
    return out


def _may_hold(stats, names: list[str]) -> bool:
    if stats is None or not stats.has_min_max:
        return True
    return any(stats.min <= n <= stats.max for n in names)


def pa_strings(values: list[str]):
    import pyarrow as pa

    return pa.array(values, pa.string())


def _available(columns: list[str], v2: bool) -> list[str]:
    if v2:
        return columns
    return [c for c in columns if c not in schema.V2_COLUMNS] + (["captions"] if "num_captions" in columns else [])


class ShardRows:
    """The train rows of one shard, in tar order: keys, caption counts, and (v2) byte ranges."""

    def __init__(self, url: str, cols: dict):
        self.url, self.keys, self.sha256 = url, cols["key"], cols["sha256"]
        self.captions = np.asarray(cols["num_captions"], np.int64)
        self.offset = np.asarray(cols["offset"]) if "offset" in cols else None
        self.size = np.asarray(cols["size"]) if "size" in cols else None

    def byte_range(self, lo: int, hi: int) -> tuple[int, int] | None:
        """Bytes holding rows [lo, hi), or None when the manifest has no offsets (schema 1)."""
        return None if self.offset is None else sample_span(self.url, self.offset[lo:hi], self.size[lo:hi])


def sample_span(url: str, offsets, sizes) -> tuple[int, int]:
    """[start, end) of consecutive samples of a shard, from the manifest's offsets and sizes (one
    read then holds them all). DataError where no built shard looks so: a sample spanning more than
    `schema.MAX_SAMPLE_BYTES`, or a gap or overlap between consecutive ones (a hostile manifest would
    otherwise have a reader load gigabytes of a sparse file)."""
    offsets, sizes = np.asarray(offsets, np.int64), np.asarray(sizes, np.int64)
    bad = np.flatnonzero((offsets < 0) | (sizes <= 0) | (sizes > schema.MAX_SAMPLE_BYTES))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"shard {url}: the manifest says a sample spans {sizes[i]} bytes from byte {offsets[i]}, which "
                        f"no built shard holds (at most {schema.MAX_SAMPLE_BYTES} bytes each): refused unread; rebuild "
                        "the dataset")
    if (offsets[1:] != offsets[:-1] + sizes[:-1]).any():
        raise DataError(f"shard {url}: the manifest's byte ranges of consecutive samples leave gaps or overlap, which "
                        "no built shard does: refused unread; rebuild the dataset")
    return int(offsets[0]), int(offsets[-1] + sizes[-1])


class TrainData:
    """The train split of one or more built datasets (a weighted mixture): the shard URLs, the
    compact identity table every process lays epochs out with, and each shard's rows on demand
    (only for the shards a reader reads). Labels of a mixture's datasets are offset so that they
    never collide."""

    def __init__(self, sources: list[tuple[str, list[str], float]]):
        """`sources`: (dataset root, its train shard URLs, weight) per dataset."""
        self.roots, self.urls, self.pid_offset, self._rows = [], [], [], {}
        self.dataset_of_shard, runs, copies, offset = [], [], [], 0
        for d, (root, urls, weight) in enumerate(sources):
            info = dataset_info(root)
            first = len(self.urls)
            index_of = {shard_name(u): first + i for i, u in enumerate(urls)}
            runs.append(_identity_runs(root, index_of, offset))
            _check_consistent(root, info, runs[-1], index_of, offset)
            self.roots.append(root)
            self.urls += list(urls)
            self.dataset_of_shard += [d] * len(urls)
            self.pid_offset.append(offset)
            copies.append(np.full(len(urls), weight, np.float32))
            offset += int(info["train_identities"])
        self.num_ids = offset
        self.table = IdentityTable.from_runs(*(np.concatenate([r[i] for r in runs]) for i in range(4)),
                                             len(self.urls), np.concatenate(copies))

    def pairs_by_dataset(self, order: np.ndarray, copies: np.ndarray) -> dict[str, int]:
        """Pairs an epoch uses from each dataset (root: count), each identity's pairs counted as often
        as the epoch uses them (`copies`): what a mixture's weights came to."""
        dataset = np.asarray(self.dataset_of_shard, np.int64)[self.table.shard[order]]
        uses = self.table.pairs[order].astype(np.int64) * np.asarray(copies, np.int64)
        counts = np.bincount(dataset, weights=uses, minlength=len(self.roots))
        return {str(root): int(n) for root, n in zip(self.roots, counts)}

    def load_rows(self, shards) -> None:
        """Read the rows of these shards (one read per dataset, of the manifest's row groups that
        hold them: a reader's cost grows with what it reads, not with the dataset)."""
        wanted = [s for s in dict.fromkeys(int(s) for s in shards) if s not in self._rows]
        for d in sorted({self.dataset_of_shard[s] for s in wanted}):
            mine = {shard_name(self.urls[s]): s for s in wanted if self.dataset_of_shard[s] == d}
            for name, cols in _shard_rows(self.roots[d], sorted(mine)).items():
                self._rows[mine[name]] = ShardRows(self.urls[mine[name]], cols)
        for s in wanted:
            if s not in self._rows:
                raise DataError(f"train shard {self.urls[s]} has no rows in the manifest of "
                                f"{self.roots[self.dataset_of_shard[s]]}: shards and manifest must come from one build")

    def rows(self, shard: int) -> ShardRows:
        self.load_rows([shard])
        return self._rows[shard]

    def captions_of(self, shard: int, row: int) -> int:
        return int(self.rows(shard).captions[row])

    def read_segment(self, shard: int, lo: int, hi: int) -> Iterator[dict]:
        """The samples of rows [lo, hi) of a shard: one ranged read when the manifest has byte
        offsets, else the shard streamed up to them. Each is checked against the manifest's key."""
        rows = self.rows(shard)
        span = rows.byte_range(lo, hi) if ranged(rows.url) else None
        if span is not None:
            stream = io.BytesIO(read_range(rows.url, *span))
            samples = tar_samples(stream, rows.url)
        else:
            # (train shard URLs come from the config: data.train_shards may be a command the user typed)
            samples = (s for i, s in enumerate(iter_shard(rows.url, commands=True)) if i >= lo)
        for row in range(lo, hi):
            sample = next(samples, None)
            if sample is None:
                raise DataError(f"sample {rows.keys[row]} listed in the manifest is missing from shard {rows.url}: "
                                "rebuild the dataset")
            check_sample(sample, rows.keys[row], rows.sha256[row], int(rows.captions[row]))
            yield sample

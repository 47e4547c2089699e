"""Person pre-training corpora, read as their releases lay them out (`--root` holds the annotation
files and the images; image paths in annotations are relative to the root):

- `webperson` (GA-DMS, WebPerson-5M / -1M on Hugging Face): `data/train-*.parquet`, columns `image`
  (a Hugging Face Image: a struct of the encoded `bytes` and a `path`), `image_path`, `caption1`,
  `caption2`. The images are inside the Parquet files. One pseudo-identity per image, two captions.
- `synth-pedes` (PLIP): `synthpedes_dataset.json`, one JSON list of {"id", "file_path" (e.g.
  `Part1/7/1.jpg`), "captions" (2-3), "attributes", "prompt_caption"}; images under `Part1..Part11/`.
  Real identities (`id`); `captions` are used, `attributes` and `prompt_caption` are not.
- `mals` (APTM): JSON lists `g_*_attrs.json` found anywhere under the root (`gene_attrs/`), each
  of {"image" (e.g. `gene_crop/c_g_a_0/0.jpg`), "caption", "image_id", "label" (27 attributes)};
  one caption per image, no identities: each image is its own. `label` is not used.
- `luperson-t` (UniPT): one JSON list of {"file_path", "captions"}: the only `*.json` in the root
  (or `--annotations`). No identities.
- `ham-pedes` (HAM, CVPR 2025): one JSON object {image path: [captions]} (what its captioner
  writes, `caption.json`; two captions per image) over SYNTH-PEDES's images: `--root` is the
  SYNTH-PEDES image root, the annotations its only `*.json` but `synthpedes_dataset.json` (or
  `--annotations`). A JSON list of {"file_path", "captions"} records is read too. No identities.
- `pairs` (your own corpus): `pairs.jsonl` (one {"image": path, "captions": list or "caption":
  string, "pid": optional} per line) or `pairs.parquet` / a folder of `*.parquet` (columns `image`:
  a path, the encoded bytes, or a Hugging Face Image struct; `captions` (list) or `caption`;
  optional `pid`, optional `image_path` naming images given as bytes); the fields are also read
  under the names of `PAIRS_IMAGE`, `PAIRS_CAPTIONS`, `PAIRS_PID`. A record without `pid` is its
  own identity.

Each reader yields `Item`s in corpus order without reading any image; annotation records that are
not objects, or whose fields have the wrong type, come back with their `problem` set (a reject).
JSON lists are streamed (`shards.jsonstream`), Parquet files read in row batches of the caption
columns only: memory follows one batch, whatever the corpus size.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator

from .errors import ConvertError
from .inputs import check_found, check_regular, found_under, open_input
from .jsonstream import first_character, iter_json_array, iter_json_object, iter_jsonl, parse_line
from .validate import bounded, kind

# The `pairs` fields, by the names they may have (the first present is used).
PAIRS_IMAGE = ("image", "image_path", "file_path", "path")
PAIRS_CAPTIONS = ("captions", "caption", "text")
PAIRS_PID = ("pid", "id", "person_id")
SYNTH_PEDES_FILE = "synthpedes_dataset.json"
BATCH_ROWS = 4096
"""Parquet rows read per batch when planning (captions only: the image column is never read here)."""


@dataclasses.dataclass
class Item:
    """One annotation record of a corpus, before its image is read."""

    index: int  # position in the corpus over all its annotation files: the image id
    where: str  # file and position, for messages
    pid: object  # the given identity; None: the image is its own (pseudo) identity
    captions: object
    path: object  # the image path relative to the root, as given (Parquet bytes: the name recorded)
    part: int = -1  # number of the Parquet file holding the image bytes; -1: the image is the file at `path`
    row: int = -1  # the row in that file
    problem: tuple[str, str] | None = None  # (reason, detail) when the record is unusable as it is


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    usual: str  # where the annotations are, as the docs and errors say it
    identities: str  # "pseudo" (one per image) or "given"


CORPORA = {
    "webperson": Corpus("webperson", "data/train-*.parquet", "pseudo"),
    "synth-pedes": Corpus("synth-pedes", SYNTH_PEDES_FILE, "given"),
    "mals": Corpus("mals", "g_*_attrs.json anywhere under the root", "pseudo"),
    "luperson-t": Corpus("luperson-t", "the only *.json in the root", "pseudo"),
    "ham-pedes": Corpus("ham-pedes", f"the only *.json in the root but {SYNTH_PEDES_FILE}: {{image path: "
                        "[captions]}", "pseudo"),
    "pairs": Corpus("pairs", "pairs.jsonl, pairs.parquet or --annotations FILE_OR_FOLDER", "given"),
}


def _sorted_files(paths) -> list[Path]:
    """The entries of `paths` that are no folders (a FIFO or device too: refused when opened)."""
    return sorted((p for p in paths if os.path.lexists(p) and not p.is_dir()), key=lambda p: str(p))


def annotation_files(name: str, root: Path, annotations: str | None = None) -> list[Path]:
    """The annotation files of corpus `name` under `root` (or `annotations`: a file, or a folder of
    them), in the order their records are numbered. ConvertError when there are none."""
    corpus = CORPORA[name]
    if annotations:
        given = Path(annotations)
        if given.is_dir():
            suffixes = {"webperson": (".parquet",), "pairs": (".parquet", ".jsonl")}.get(name, (".json",))
            files = _sorted_files(p for p in given.iterdir() if p.suffix in suffixes)
        elif given.is_file():
            files = [given]
        else:
            raise ConvertError(f"--annotations {given}: file or folder not found")
    elif name == "webperson":
        files = _sorted_files((root / "data").glob("train-*.parquet"))
    elif name == "synth-pedes":
        files = _sorted_files([root / SYNTH_PEDES_FILE])
    elif name == "mals":
        found = []
        try:
            for folder, dirs, names in os.walk(root):
                dirs.sort()
                found += [Path(folder, n) for n in names if n.startswith("g_") and n.endswith("_attrs.json")]
        except RecursionError:  # (os.walk recurses: a planted tree of thousands of levels)
            raise ConvertError(f"mals: the folders under {root} are nested too deeply to search; pass the annotation "
                               "files with --annotations FOLDER") from None
        files = _sorted_files(found)
    elif name in ("luperson-t", "ham-pedes"):  # (HAM-PEDES's images are SYNTH-PEDES's, its annotations beside)
        files = _sorted_files(p for p in root.glob("*.json") if name != "ham-pedes" or p.name != SYNTH_PEDES_FILE)
        if len(files) > 1:
            raise ConvertError(f"{name}: {len(files)} JSON files in {root} ({', '.join(p.name for p in files[:5])}"
                               "): pass the annotation file with --annotations FILE")
    else:
        files = _sorted_files([root / "pairs.jsonl", root / "pairs.parquet"])[:1]
    if not files:
        raise ConvertError(f"{name}: no annotation file found in {annotations or root} (expected {corpus.usual}; "
                           "or pass --annotations FILE)")
    if not annotations:
        for path in files:
            check_found(root, path, "the annotation file")
    if name == "webperson" and any(p.suffix != ".parquet" for p in files):
        raise ConvertError(f"webperson: {files[0]} is not a Parquet file (the release is data/train-*.parquet)")
    return files


def items(name: str, root: Path, files: list[Path]) -> Iterator[Item]:
    """Every record of the corpus's annotation files, in order (see the module docstring)."""
    index = 0
    parquet_parts = [f for f in files if f.suffix == ".parquet"]
    for path in files:
        under = found_under(root, path)
        if path.suffix == ".parquet":
            records = _parquet_items(name, path, parquet_parts.index(path), under)
        elif path.suffix == ".jsonl":
            records = _jsonl_items(path, under)
        else:
            records = _json_items(name, path, under)
        for item in records:
            item.index = index
            index += 1
            yield item


def parquet_parts(files: list[Path]) -> list[Path]:
    """The annotation files that may hold image bytes (numbered by `Item.part`)."""
    return [f for f in files if f.suffix == ".parquet"]


MAX_TEXT_ROW_BYTES = 1 << 20
"""Most text one Parquet row may average over its row group (pid, captions, path: a few hundred
bytes as published; `validate` then bounds each caption): more is a bomb, refused unread."""
MAX_TEXT_RATIO = 1000
"""Highest compression ratio a row group's text may have once it holds more than BOMB_MIN_BYTES
(captions compress a few times; a run of one character, many thousand times)."""
BOMB_MIN_BYTES = 16 << 20
TEXT_BATCH_BYTES = 64 << 20
"""Text decompressed per batch (batches of fewer rows where rows are long)."""


@dataclasses.dataclass
class ColumnSizes:
    """What the Parquet metadata says reading some columns of one row group takes, before anything
    is decompressed (the file's own account: a forged footer is not caught here)."""

    uncompressed: int
    compressed: int
    rows: int
    dictionary: int = 0
    """Bytes one row may add through dictionary pages: a column may store its values once, in a
    dictionary page, and each row as an index into it, so a row may read as the largest value there
    (1,000 rows of one 58 KB image: 62 KB on disk and in these sizes, 58 MB read). The dictionary
    pages' own sizes (from their headers; the chunk's whole size where unknown) bound it."""

    @classmethod
    def of(cls, pf, group: int, columns, path: str | os.PathLike | None = None) -> "ColumnSizes":
        """`columns` (top-level names: every leaf under them; None: all) of row group `group` of `pf`
        (a ParquetFile, or its FileMetaData); `path`: the file, to read dictionary page headers."""
        meta = (pf if hasattr(pf, "row_group") else pf.metadata).row_group(group)
        names = set(columns) if columns is not None else None
        leaves = [meta.column(i) for i in range(meta.num_columns)
                  if names is None or meta.column(i).path_in_schema.split(".")[0] in names]
        dictionary = sum(_dictionary_page_bytes(path, c) or c.total_uncompressed_size
                         for c in leaves if c.has_dictionary_page)
        return cls(sum(c.total_uncompressed_size for c in leaves), sum(c.total_compressed_size for c in leaves),
                   meta.num_rows, dictionary)

    @property
    def per_row(self) -> float:
        return self.uncompressed / max(1, self.rows)

    @property
    def ratio(self) -> float:
        return self.uncompressed / max(1, self.compressed)

    def bomb(self, max_per_row: float, max_ratio: float) -> str | None:
        """Why reading these columns would be a decompression bomb, or None."""
        if self.per_row > max_per_row:
            return f"{self.per_row:.0f} bytes per row uncompressed (at most {max_per_row:.0f} read)"
        if self.uncompressed > BOMB_MIN_BYTES and self.ratio > max_ratio:
            return f"{self.uncompressed} bytes uncompressed from {self.compressed} ({self.ratio:.0f} times: at most {max_ratio})"
        return None

    def batch_rows(self, budget: int, most: int) -> int:
        """Rows per batch that keep a batch under `budget` bytes (at most `most`, at least 1), each
        row counted with the most its dictionaries may add."""
        return max(1, min(most, int(budget // max(1.0, self.per_row + self.dictionary))))


def _dictionary_page_bytes(path, chunk) -> int | None:
    """The uncompressed size of a column chunk's dictionary page, from the page's header (Thrift's
    compact encoding: field 1 the page type, 2 its uncompressed size, 3 its compressed size, each a
    zigzag varint), or None where it cannot be read so."""
    offset = chunk.dictionary_page_offset
    if path is None or not offset:
        return None
    try:
        with open_input(path, "the annotation file") as f:
            f.seek(offset)
            head = f.read(32)
    except (OSError, ConvertError):
        return None
    fields, pos, field = {}, 0, 0
    while len(fields) < 3 and pos < len(head):
        delta, kind = head[pos] >> 4, head[pos] & 0x0F
        pos += 1
        if delta == 0 or kind != 5:  # (i32 fields in short form, as writers emit these three)
            return None
        field += delta
        value = shift = 0
        while pos < len(head):
            value |= (head[pos] & 0x7F) << shift
            shift += 7
            pos += 1
            if not head[pos - 1] & 0x80:
                break
        fields[field] = (value >> 1) ^ -(value & 1)
    size = fields.get(2)
    return size if isinstance(size, int) and 0 <= size < (1 << 31) else None


def text_bomb(metadata, columns=None) -> str | None:
    """Why reading `columns` (None: all) of a Parquet file of text and numbers (a manifest, an
    annotation table) would be a decompression bomb, from its metadata (FileMetaData), or None."""
    for g in range(metadata.num_row_groups):
        bomb = ColumnSizes.of(metadata, g, columns).bomb(MAX_TEXT_ROW_BYTES, MAX_TEXT_RATIO)
        if bomb:
            return f"row group {g} is {bomb}"
    return None


def image_column(path: str | Path) -> str:
    """The column of a Parquet annotation file that holds its images."""
    import pyarrow.parquet as pq

    check_regular(path, "the annotation file")
    names = pq.read_schema(path).names
    return next((c for c in PAIRS_IMAGE if c in names), "image")


# ---------------------------------------------------------------------------------- JSON


def _fields(name: str, record) -> tuple:
    """(pid, captions, path) of a JSON record of corpus `name`."""
    if name == "synth-pedes":
        return record.get("id"), record.get("captions"), record.get("file_path")
    if name == "mals":
        return None, record.get("caption"), record.get("image")
    if name == "luperson-t":
        return None, record.get("captions"), record.get("file_path")
    if name == "ham-pedes":
        return None, _first(record, PAIRS_CAPTIONS), _first(record, PAIRS_IMAGE)
    return _first(record, PAIRS_PID), _first(record, PAIRS_CAPTIONS), _first(record, PAIRS_IMAGE)


def _first(record: dict, names: tuple[str, ...]):
    """The value of the first of `names` that `record` has (None if none)."""
    return next((record[n] for n in names if n in record), None)


def _item(name: str, record, where: str) -> Item:
    if not isinstance(record, dict):
        return Item(0, where, None, None, None,
                    problem=("malformed record", f"expected an object, got {kind(record)}: {bounded(record)}"))
    pid, captions, path = _fields(name, record)
    item = Item(0, where, pid, captions, path)
    if CORPORA[name].identities == "given" and name != "pairs" and pid is None:
        item.problem = ("record without id", f"no id in {bounded(record)}")
    return item


def _json_items(name: str, path: Path, root) -> Iterator[Item]:
    try:
        if name == "ham-pedes" and first_character(path, root) == "{":
            for n, (image, captions) in enumerate(iter_json_object(path, root)):
                yield Item(0, f"{path.name}[{n}]", None, captions, image)
            return
        for n, record in enumerate(iter_json_array(path, root)):
            yield _item(name, record, f"{path.name}[{n}]")
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read the annotations: {e}") from None


def _jsonl_items(path: Path, root) -> Iterator[Item]:
    try:
        for n, line in iter_jsonl(path, root):
            where = f"{path.name}:{n}"
            try:
                record = parse_line(line, f"line {n}")
            except ValueError as e:
                yield Item(0, where, None, None, None, problem=("malformed record", f"not JSON: {e}"))
                continue
            yield _item("pairs", record, where)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read the annotations: {e}") from None


# ---------------------------------------------------------------------------------- Parquet


def image_column_kind(field) -> str:
    """How a Parquet `image` column holds images: "bytes" (binary, or a struct with `bytes`), "path"."""
    import pyarrow as pa

    t = field.type
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "bytes"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "path"
    raise ConvertError(f"column image has type {t}: expected the encoded image (binary, or a struct of bytes and "
                       "path as Hugging Face writes an Image), or a path (string)")


def _parquet_columns(name: str, path: Path, schema) -> tuple[list[str], str]:
    """The columns the plan reads from one Parquet file, and how it holds images."""
    names = schema.names
    if name == "webperson":
        need = ["image", "image_path", "caption1", "caption2"]
    else:
        need = [next((c for c in PAIRS_IMAGE if c in names), "image"),
                next((c for c in PAIRS_CAPTIONS if c in names), "captions")]
    missing = [c for c in need if c not in names]
    if missing:
        raise ConvertError(f"{path}: no column {', '.join(missing)} (found {', '.join(names[:12])}); expected the "
                           f"{name} layout: {CORPORA[name].usual}")
    try:
        how = image_column_kind(schema.field(need[0]))
    except ConvertError as e:
        raise ConvertError(f"{path}: {e}") from None
    if name == "webperson" and how != "bytes":
        raise ConvertError(f"{path}: column image holds paths; WebPerson's release holds the image bytes")
    if name == "webperson":
        return need[1:], how
    columns = {"captions": need[1]}
    if how == "path":
        columns["path"] = need[0]
    elif "image_path" in names and need[0] != "image_path":
        columns["name"] = "image_path"
    pid = next((c for c in PAIRS_PID if c in names), None)
    if pid:
        columns["pid"] = pid
    return columns, how


def _parquet_items(name: str, path: Path, part: int, root) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        check_regular(path, "the annotation file", root)
        pf = pq.ParquetFile(path)
        columns, how = _parquet_columns(name, path, pf.schema_arrow)
        if not isinstance(columns, dict):
            columns = {c: c for c in columns}
        row = 0
        for g in range(pf.metadata.num_row_groups):  # (a decompression bomb: refused before it is read)
            sizes = ColumnSizes.of(pf, g, columns.values(), path)
            bomb = sizes.bomb(MAX_TEXT_ROW_BYTES, MAX_TEXT_RATIO)
            if bomb:
                raise ConvertError(f"{path}: row group {g}'s text is {bomb}: refused without decompressing it")
            for batch in pf.iter_batches(batch_size=sizes.batch_rows(TEXT_BATCH_BYTES, BATCH_ROWS), row_groups=[g],
                                         columns=list(columns.values())):
                values = {role: batch.column(c).to_pylist() for role, c in columns.items()}
                for i in range(batch.num_rows):
                    yield _parquet_item(name, values, i, path, part, row, how)
                    row += 1
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign Parquet file
        raise ConvertError(f"{path}: cannot read the Parquet file: {type(e).__name__}: {str(e)[:300]}") from None


def _parquet_item(name: str, values: dict, i: int, path: Path, part: int, row: int, how: str) -> Item:
    where = f"{path.name}#{row}"
    if name == "webperson":
        captions = [values["caption1"][i], values["caption2"][i]]
        label = values["image_path"][i]
        return Item(0, where, None, captions, where if label is None else label, part, row)
    pid = values["pid"][i] if "pid" in values else None
    if how == "path":
        return Item(0, where, pid, values["captions"][i], values["path"][i])
    label = values["name"][i] if "name" in values else None
    return Item(0, where, pid, values["captions"][i], where if label is None else label, part, row)

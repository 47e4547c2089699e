"""The shard format: the one place that names files, members, columns and the schema version.

Both the writer (`shards.writer`) and the reader (`itself.data`) import these names, so the
format cannot drift between them. Extend, don't break: a reader accepts any schema version up
to `SCHEMA_VERSION` it knows how to read (`READABLE_VERSIONS`), and refuses the others.

Layout of a built dataset directory::

    <out>/train/train-000000.tar      one sample per image: <key>.<image ext> + <key>.json
    <out>/val/val-000000.tar
    <out>/test/test-000000.tar
    <out>/manifest.parquet            one row per written image (MANIFEST_COLUMNS), in tar order
    <out>/dataset.json                name, schema version, counts, per-shard sample counts
    <out>/rejects.jsonl               one line per input record not written, with its reason

`dataset.json` is written last: its presence marks a complete build. A build writes the whole
folder beside it and swaps it in only when complete (`shards.transaction`), so a reader never
sees a mix of two builds.
"""

from __future__ import annotations

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
# 2: the manifest also holds each sample's caption count and byte range in its shard (readers
# plan from a few small columns and read parts of shards); 1 lacks those columns.
# Key of the schema version in manifest.parquet's metadata (dataset.json has "schema_version").
MANIFEST_VERSION_KEY = b"itself.schema_version"

SPLITS = ("train", "val", "test")

MANIFEST_FILE = "manifest.parquet"
DATASET_FILE = "dataset.json"
REJECTS_FILE = "rejects.jsonl"

# Suffix of files being written; renamed to their final name only when complete.
PARTIAL_SUFFIX = ".partial"

# Tar members of one sample: the original encoded image under its format's extension, and
# a JSON document with the fields of META_FIELDS.
META_EXT = "json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
META_FIELDS = ("pid", "image_id", "captions", "source")

# The largest image a build reads or stores (a person crop is tens of KiB).
MAX_IMAGE_BYTES = 64 << 20
# The largest member a built shard holds: an image (MAX_IMAGE_BYTES), or a sample's JSON of at most
# 1,000 captions of 10,000 characters (`shards.validate`). Readers refuse a larger member, and a
# manifest saying a sample spans more than MAX_SAMPLE_BYTES (two members, each with its header, a
# long-name header and padding), unread: a hostile shard (a sparse file claiming gigabytes) costs
# them no memory.
MAX_MEMBER_BYTES = 2 * MAX_IMAGE_BYTES
MAX_SAMPLE_BYTES = 2 * (MAX_MEMBER_BYTES + 4 * 512)

MANIFEST_COLUMNS = (
    "split",  # train / val / test
    "shard",  # shard file name relative to its split folder, e.g. train-000003.tar
    "key",  # sample key inside the shard (the tar member stem)
    "pid",  # person id as written (train: relabelled 0..N-1)
    "orig_pid",  # person id in the source dataset
    "image_id",  # index of the image in the dataset, unique over all splits
    "captions",  # list of captions
    "width",
    "height",
    "sha256",  # hash of the encoded image bytes
    "source",  # original path relative to the raw dataset root
    "num_captions",  # len(captions) (v2)
    "offset",  # byte offset of the sample's first tar header in its shard (v2)
    "size",  # bytes from there to the end of the sample's last member, padding included (v2)
)
V2_COLUMNS = ("num_captions", "offset", "size")


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`: `<split>-NNNNNN.tar`."""
    return f"{split}-{index:06d}.tar"


def sample_key(image_id: int) -> str:
    """Tar member stem of an image: unique in the dataset, sortable, free of dots."""
    return f"{image_id:09d}"

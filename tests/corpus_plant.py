"""Planted person pre-training corpora, laid out exactly as their releases are (see shards/corpora.py
and README.md "Pre-training"), with one record of each fault the readers must reject. Each
`plant_*` returns {source: reason} for the faulty records it planted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
WEBPERSON_SCHEMA = pa.schema([("image", HF_IMAGE), ("image_path", pa.string()), ("caption1", pa.string()),
                              ("caption2", pa.string())])


def jpeg(i: int, size=(16, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i * 37 % 256, i * 11 % 256, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def image_file(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg(i))


def bomb_png() -> bytes:
    """A small PNG of more pixels than Pillow's decompression-bomb limit (a bilevel 10000 x 9000)."""
    buf = io.BytesIO()
    Image.new("1", (10000, 9000)).save(buf, format="PNG")
    return buf.getvalue()


def plant_webperson(root: Path, n: int = 60, files: int = 2, faults: bool = True, size=(16, 32)) -> dict:
    """data/train-0000k-of-0000K.parquet as the Hugging Face release: image struct, image_path,
    caption1, caption2; row groups of 7 rows so that chunks cut through them."""
    rows = [{"image": {"bytes": jpeg(i, size), "path": f"{i:06d}.jpg"}, "image_path": f"web/{i // 10}/{i:06d}.jpg",
             "caption1": f"a person number {i} in a coat", "caption2": f"pedestrian {i}, walking"} for i in range(n)]
    expected = {}
    if faults:
        rows[3]["image"] = {"bytes": b"\xff\xd8 not a jpeg", "path": "x.jpg"}
        expected[rows[3]["image_path"]] = "unreadable or truncated image"
        rows[5]["caption2"] = "   "
        expected[rows[5]["image_path"]] = "empty or non-string caption"
        rows[8]["image_path"] = rows[7]["image_path"]  # the first is kept
        expected[rows[8]["image_path"] + "#dup"] = "duplicate image entry"
        rows[10]["image"] = None
        expected[rows[10]["image_path"]] = "missing image file"
        rows[12]["image_path"] = "../../outside.jpg"
        expected["../../outside.jpg"] = "path escapes the root"
        rows[14]["caption1"] = None
        expected[rows[14]["image_path"]] = "empty or non-string caption"
        rows[16]["image"] = {"bytes": jpeg(16)[:40], "path": "cut.jpg"}
        expected[rows[16]["image_path"]] = "unreadable or truncated image"
    (root / "data").mkdir(parents=True, exist_ok=True)
    per = -(-n // files)
    for k in range(files):
        part = pa.Table.from_pylist(rows[k * per:(k + 1) * per], schema=WEBPERSON_SCHEMA)
        pq.write_table(part, root / "data" / f"train-{k:05d}-of-{files:05d}.parquet", row_group_size=7)
    (root / "README.md").write_text("---\nlicense: other\n---\n# WebPerson (planted)\n")
    return expected


def plant_synth_pedes(root: Path, ids: int = 12, per_id: int = 3, faults: bool = True) -> dict:
    """synthpedes_dataset.json + Part1..Part3/<id>/<k>.jpg, real identities, 2-3 captions."""
    records, expected = [], {}
    for pid in range(1, ids + 1):
        for k in range(per_id):
            rel = f"Part{pid % 3 + 1}/{pid}/{k}.jpg"
            image_file(root / rel, pid * 10 + k)
            caps = [f"A man {pid} in view {k} wears black.", f"The person {pid} walks."] + (["third"] if k else [])
            records.append({"id": pid, "file_path": rel, "attributes": ["man,black hair,unknown"], "captions": caps,
                            "prompt_caption": [f"A man with id {pid}."]})
    if faults:
        records.insert(4, {"id": 2, "file_path": "Part3/2/missing.jpg", "captions": ["a", "b"]})
        expected["Part3/2/missing.jpg"] = "missing image file"
        (root / "Part2/1/bad.jpg").write_bytes(b"garbage")
        records.insert(1, {"id": 1, "file_path": "Part2/1/bad.jpg", "captions": ["a", "b"]})
        expected["Part2/1/bad.jpg"] = "unreadable or truncated image"
        image_file(root / "Part1/3/empty.jpg", 1)
        records.append({"id": ids, "file_path": "Part1/3/empty.jpg", "captions": ["ok", ""]})
        expected["Part1/3/empty.jpg"] = "empty or non-string caption"
        records.append({"id": ids, "file_path": records[0]["file_path"], "captions": ["dup", "dup"]})
        expected[records[0]["file_path"] + "#dup"] = "duplicate image entry"
        records.append({"id": ids, "file_path": "/etc/hostname", "captions": ["a", "b"]})
        expected["/etc/hostname"] = "path escapes the root"
        records.append(["not", "an", "object"])
        image_file(root / "Part1/1/late.jpg", 3)
        records.append({"id": 1, "file_path": "Part1/1/late.jpg", "captions": ["a", "b"]})  # id 1 again, later
        expected["Part1/1/late.jpg"] = "identity not contiguous"
        image_file(root / "Part1/x/noid.jpg", 4)
        records.append({"file_path": "Part1/x/noid.jpg", "captions": ["a", "b"]})
        expected["Part1/x/noid.jpg"] = "record without id"
    (root / "synthpedes_dataset.json").write_text(json.dumps(records, indent=4))
    return expected


def plant_mals(root: Path, n: int = 30, faults: bool = True) -> dict:
    """gene_attrs/g_*_attrs.json (two lists) + gene_crop/<set>/<k>.jpg, one caption per image."""
    sets = {"g_c_g_a_0_attrs.json": "c_g_a_0", "g_4x_attrs.json": "4x"}
    expected = {}
    for f, (name, folder) in enumerate(sets.items()):
        records = []
        for k in range(n // 2):
            rel = f"gene_crop/{folder}/{k}.jpg"
            image_file(root / rel, f * 100 + k)
            records.append({"image": rel, "caption": f"a young woman {k} of set {folder} wearing a red top",
                            "image_id": f"{folder}_{k}", "label": [1, 0, -1] * 9})
        if faults and f == 0:
            records.append({"image": "gene_crop/c_g_a_0/none.jpg", "caption": "x", "image_id": "x", "label": []})
            expected["gene_crop/c_g_a_0/none.jpg"] = "missing image file"
            records.append({"image": "gene_crop/c_g_a_0/1.jpg", "caption": "again", "image_id": "y", "label": []})
            expected["gene_crop/c_g_a_0/1.jpg#dup"] = "duplicate image entry"
            image_file(root / "gene_crop/c_g_a_0/blank.jpg", 5)
            records.append({"image": "gene_crop/c_g_a_0/blank.jpg", "caption": "", "image_id": "z", "label": []})
            expected["gene_crop/c_g_a_0/blank.jpg"] = "empty or non-string caption"
            records.append(17)
            records.append({"image": "../x.jpg", "caption": "out", "image_id": "o", "label": []})
            expected["../x.jpg"] = "path escapes the root"
        (root / "gene_attrs").mkdir(parents=True, exist_ok=True)
        (root / "gene_attrs" / name).write_text(json.dumps(records))
    return expected


def plant_luperson_t(root: Path, n: int = 20, faults: bool = True) -> dict:
    """One JSON list of {file_path, captions} + the images."""
    records, expected = [], {}
    for k in range(n):
        rel = f"LUPerson/{k // 5}/{k}.jpg"
        image_file(root / rel, k)
        records.append({"file_path": rel, "captions": [f"a person {k} with a bag", f"someone {k} in blue"]})
    if faults:
        records.append({"file_path": "LUPerson/0/gone.jpg", "captions": ["x"]})
        expected["LUPerson/0/gone.jpg"] = "missing image file"
        records.append({"file_path": "LUPerson/0/1.jpg", "captions": []})
        expected["LUPerson/0/1.jpg"] = "empty or non-string caption"
    (root / "luperson_t.json").write_text(json.dumps(records))
    return expected


def plant_ham_pedes(root: Path, n: int = 20, faults: bool = True) -> dict:
    """SYNTH-PEDES's image root (Part1/<id>/<k>.jpg and its synthpedes_dataset.json, which the reader
    leaves alone) with HAM's caption.json beside: one JSON object {image path: [2 captions]}, as its
    captioner writes it."""
    captions, expected = {}, {}
    for k in range(n):
        rel = f"Part1/{k // 4}/{k}.jpg"
        image_file(root / rel, k)
        captions[rel] = [f"A woman {k} with long hair wears a white coat.", f"The person {k} carries a red bag."]
    if faults:
        captions["Part1/0/gone.jpg"] = ["x", "y"]
        expected["Part1/0/gone.jpg"] = "missing image file"
        image_file(root / "Part1/0/blank.jpg", 3)
        captions["Part1/0/blank.jpg"] = []
        expected["Part1/0/blank.jpg"] = "empty or non-string caption"
        captions["../outside.jpg"] = ["out"]
        expected["../outside.jpg"] = "path escapes the root"
        image_file(root / "Part1/0/num.jpg", 4)
        captions["Part1/0/num.jpg"] = 17  # (a malformed record)
    (root / "synthpedes_dataset.json").write_text(json.dumps([{"id": 1, "file_path": "Part1/0/0.jpg",
                                                                 "captions": ["not HAM's"]}]))
    (root / "caption.json").write_text(json.dumps(captions))
    return expected

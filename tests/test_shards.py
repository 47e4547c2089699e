"""The shard writer, the synthetic dataset and the `python -m shards` CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

import shards
from shards import schema
from shards.synthetic import SyntheticSpec, make_people
from shards.writer import BuildError, DatasetWriter, Record

from runs import SMALL, SMALL_SHARD_SAMPLES


def _tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as t:
        names = t.getnames()
        for m in t.getmembers():
            t.extractfile(m).read()  # raises on a truncated shard
    return names


def test_counts_agree_across_shards_manifest_and_dataset_json(small_dataset):
    info = json.loads((small_dataset / schema.DATASET_FILE).read_text())
    manifest = pq.read_table(small_dataset / schema.MANIFEST_FILE).to_pylist()
    assert info["schema_version"] == schema.SCHEMA_VERSION
    assert info["read"] == info["written"] + info["rejected"] == len(manifest) == SMALL.num_ids * SMALL.images_per_id
    assert info["train_identities"] == SMALL.split_sizes()["train"] == 32
    for split in schema.SPLITS:
        rows = [r for r in manifest if r["split"] == split]
        s = info["splits"][split]
        assert s["images"] == len(rows) == sum(sh["samples"] for sh in s["shards"])
        assert s["captions"] == sum(len(r["captions"]) for r in rows) == sum(sh["captions"] for sh in s["shards"])
        assert s["identities"] == len({r["pid"] for r in rows}) == SMALL.split_sizes()[split]
        files = sorted((small_dataset / split).iterdir())
        assert [f.name for f in files] == [sh["name"] for sh in s["shards"]]
        for f, sh in zip(files, s["shards"]):
            members = _tar_members(f)
            assert len(members) == 2 * sh["samples"]  # one image + one json per sample
            assert sh["samples"] <= SMALL_SHARD_SAMPLES
            assert {r["key"] for r in rows if r["shard"] == f.name} == {m.split(".")[0] for m in members}
    assert (small_dataset / schema.REJECTS_FILE).read_text() == ""


def test_sample_members_match_manifest(small_dataset):
    row = pq.read_table(small_dataset / schema.MANIFEST_FILE).to_pylist()[5]
    with tarfile.open(small_dataset / row["split"] / row["shard"]) as t:
        meta = json.loads(t.extractfile(f"{row['key']}.json").read())
        image = t.extractfile(f"{row['key']}.jpg").read()
    assert set(meta) == set(schema.META_FIELDS)
    assert meta["captions"] == row["captions"] and meta["pid"] == row["pid"] and meta["source"] == row["source"]
    assert Image.open(io.BytesIO(image)).size == (row["width"], row["height"]) == (16, 48)


def test_splits_are_identity_disjoint_and_train_identities_never_span_shards(small_dataset):
    rows = pq.read_table(small_dataset / schema.MANIFEST_FILE).to_pylist()
    orig = {s: {r["orig_pid"] for r in rows if r["split"] == s} for s in schema.SPLITS}
    assert not (orig["train"] & orig["val"]) and not (orig["train"] & orig["test"]) and not (orig["val"] & orig["test"])
    train = [r for r in rows if r["split"] == "train"]
    assert sorted({r["pid"] for r in train}) == list(range(32))  # relabelled 0..N-1
    shard_of = {}
    for r in train:
        assert shard_of.setdefault(r["pid"], r["shard"]) == r["shard"]


def test_same_seed_same_manifest_other_seed_differs(tmp_path):
    spec = SyntheticSpec(num_ids=12, images_per_id=2, image_size=(48, 16), seed=7)
    for name, s in (("a", spec), ("b", spec), ("c", SyntheticSpec(**{**spec.__dict__, "seed": 8}))):
        shards.build_synthetic(tmp_path / name, s, max_samples=4, progress=False)
    read = lambda n: pq.read_table(tmp_path / n / schema.MANIFEST_FILE).to_pylist()  # noqa: E731
    assert read("a") == read("b")
    assert (tmp_path / "a/train/train-000000.tar").read_bytes() == (tmp_path / "b/train/train-000000.tar").read_bytes()
    assert [r["sha256"] for r in read("a")] != [r["sha256"] for r in read("c")]


def test_synthetic_has_near_twins_differing_in_one_detail():
    import random

    people = make_people(60, 0.3, random.Random(0))
    assert len(set(people)) == 60
    one_apart = sum(1 for i, a in enumerate(people) for b in people[:i]
                    if sum(x != y for x, y in zip(a.__dict__.values(), b.__dict__.values())) == 1)
    assert one_apart >= 5


def test_existing_dataset_needs_overwrite(small_dataset, tmp_path):
    with pytest.raises(BuildError, match="--overwrite"):
        DatasetWriter(small_dataset, "again")


def _jpeg(colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 24), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_writer_rejects_bad_records_and_accounts_for_every_record(tmp_path):
    good = _jpeg()
    w = DatasetWriter(tmp_path / "d", "t", max_samples=2)
    records = [
        Record("train", "a", 0, ["a red coat"], "a0.jpg", good),
        Record("train", "a", 1, ["a red coat too"], "a1.jpg", good),
        Record("train", "a", 2, ["a red coat again"], "a2.jpg", good),  # 3 images: one identity, one shard
        Record("train", "b", 3, [""], "b0.jpg", good),  # empty caption
        Record("train", "b", 4, ["ok", 5], "b1.jpg", good),  # non-string caption
        Record("train", "b", 5, ["ok"], "a0.jpg", good),  # duplicate image entry
        Record("train", "b", 6, ["ok"], "b2.jpg", good[: len(good) // 2]),  # truncated image
        Record("train", None, 7, ["ok"], "x.jpg", good),  # no id
        Record("dev", "c", 8, ["ok"], "c0.jpg", good),  # unknown split
        Record("test", "c", 9, "a single caption string", "c1.jpg", good),
    ]
    written = [w.add(r) for r in records]
    info = w.close()
    assert written == [True, True, True, False, False, False, False, False, False, True]
    assert info["read"] == 10 and info["written"] == 4 and info["rejected"] == 6
    assert info["rejected_by_reason"] == {"empty or non-string caption": 2, "duplicate image entry": 1,
                                          "unreadable or truncated image": 1, "record without id": 1,
                                          "unknown split": 1}
    rejects = [json.loads(line) for line in (tmp_path / "d" / schema.REJECTS_FILE).read_text().splitlines()]
    assert [r["source"] for r in rejects] == ["b0.jpg", "b1.jpg", "a0.jpg", "b2.jpg", "x.jpg", "c0.jpg"]
    # An identity is never split, even past the sample limit; its group opens a new shard only.
    assert [s["samples"] for s in info["splits"]["train"]["shards"]] == [3]
    assert info["splits"]["test"]["captions"] == 1


def test_train_records_must_be_grouped_by_identity(tmp_path):
    w = DatasetWriter(tmp_path / "d", "t")
    w.add(Record("train", "a", 0, ["x"], "0.jpg", _jpeg()))
    w.add(Record("train", "b", 1, ["x"], "1.jpg", _jpeg()))
    with pytest.raises(BuildError, match="grouped by identity: pid 'a'"):
        w.add(Record("train", "a", 2, ["x"], "2.jpg", _jpeg()))


def test_shard_size_limit_by_bytes(tmp_path):
    w = DatasetWriter(tmp_path / "d", "t", max_samples=100, max_bytes=len(_jpeg()) * 2)
    for i in range(6):
        w.add(Record("val", i, i, ["x"], f"{i}.jpg", _jpeg()))
    info = w.close()
    assert [s["samples"] for s in info["splits"]["val"]["shards"]] == [2, 2, 2]


def test_cli_build_prints_summary_and_help(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "shards", "build", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "--num-ids" in help_text and "--seed" in help_text and "--allow-rejects" in help_text
    assert "exit status:" in help_text and "2  error:" in help_text and "1  error:" in help_text
    out = subprocess.run([sys.executable, "-m", "shards", "build", "--dataset", "synthetic", "--out",
                          str(tmp_path / "s"), "--num-ids", "12", "--images-per-id", "2", "--seed", "1",
                          "--image-size", "48x16"], capture_output=True, text=True, check=True).stdout
    assert "read 24 = written 24 + rejected 0" in out
    assert out.splitlines()[1].split()[:4] == ["train", "16", "32", "8"]
    again = subprocess.run([sys.executable, "-m", "shards", "build", "--dataset", "synthetic", "--out",
                            str(tmp_path / "s")], capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr

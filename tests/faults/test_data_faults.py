"""Bad data gives a clear error naming the file, or a counted skip; the number of samples never
changes silently. (Also: tests/test_data_pipeline.py, corrupt train image substituted and counted;
missing and unreadable shards; tests/test_converters.py, annotation paths that escape the root.)"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest
import torch

from itself.config import DataConfig
from itself.data.pipeline import eval_loaders, train_loader
from itself.errors import DataError, UserError
from itself.evaluate import evaluate
from itself.model import ITSELF
from itself.presets import resolve_config
from itself.records import Counts
from runs import plant_undecodable_image, run_train, small_run_args
from shards import schema


@pytest.fixture
def dataset(small_dataset, tmp_path):
    """A private copy of the small dataset, to damage."""
    root = tmp_path / "data"
    shutil.copytree(small_dataset, root)
    return root


def cfg(root) -> DataConfig:
    return DataConfig(root=str(root), image_size=(48, 16), num_workers=0, num_slots=4)


def one_train_epoch(root) -> list[dict]:
    loader = train_loader(cfg(root), rank=0, world_size=1, micro_batch=16)
    loader.set_epoch(0)
    return list(loader)


def member_offsets(path) -> list[int]:
    with tarfile.open(path) as t:
        return [m.offset for m in t.getmembers()]


def truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_train_shard_cut_inside_a_member_is_an_error_naming_it(dataset):
    shard = dataset / "train" / "train-000001.tar"
    truncate(shard, member_offsets(shard)[5] + 700)  # mid-way through a member's data
    with pytest.raises(DataError, match=f"shard {shard}"):
        one_train_epoch(dataset)


def test_train_shard_cut_between_samples_is_an_error_not_fewer_samples(dataset):
    shard = dataset / "train" / "train-000001.tar"
    truncate(shard, member_offsets(shard)[6])  # 3 whole samples left: a tar that looks complete
    with pytest.raises(DataError, match=f"cannot read shard {shard}: it ends before byte \\d+ \\(truncated"):
        one_train_epoch(dataset)


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_image_changed_after_the_build_is_an_error_naming_it(dataset, split):
    # The same bytes length, the same keys: only the manifest's sha256 tells.
    shard = dataset / split / f"{split}-000001.tar"
    with tarfile.open(shard) as t:
        image = [m for m in t.getmembers() if m.name.endswith(".jpg")][2]
    data = bytearray(shard.read_bytes())
    data[image.offset_data + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard {shard}: sample .* does not match the manifest's sha256"):
        if split == "train":
            one_train_epoch(dataset)
        else:
            list(eval_loaders(cfg(dataset), "val")[0])


def test_dataset_json_and_manifest_that_disagree_are_an_error_before_the_first_step(dataset):
    info_file = dataset / schema.DATASET_FILE
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "train_identities": 20}))  # the manifest labels 32
    with pytest.raises(DataError, match="labels run to 31, dataset.json lists 20 train identities"):
        train_loader(cfg(dataset), rank=0, world_size=1, micro_batch=16)
    info["splits"]["train"]["shards"][0]["samples"] += 1
    info_file.write_text(json.dumps(info))
    with pytest.raises(DataError, match="lists 9 samples in train shard train-000000.tar, the manifest 8"):
        train_loader(cfg(dataset), rank=0, world_size=1, micro_batch=16)


def test_train_shard_of_another_build_is_an_error_not_other_data(dataset, small_dataset):
    # Same name, same size, other samples (two shards swapped): the manifest's keys do not match.
    one, two = dataset / "train" / "train-000001.tar", dataset / "train" / "train-000002.tar"
    one.write_bytes((small_dataset / "train" / "train-000002.tar").read_bytes())
    two.write_bytes((small_dataset / "train" / "train-000001.tar").read_bytes())
    with pytest.raises(DataError, match="does not match the manifest"):
        one_train_epoch(dataset)


def test_truncated_train_shard_stops_training_with_the_shard_named(dataset, tmp_path):
    shard = dataset / "train" / "train-000002.tar"
    truncate(shard, member_offsets(shard)[3] + 100)
    run = run_train(small_run_args(dataset) + [f"run_dir={tmp_path / 'run'}"], check=False)
    assert run.returncode != 0 and f"cannot read shard {shard}" in run.stderr
    assert "training failed at step 0 (epoch 1)" in run.stderr


@pytest.mark.parametrize("cut", ["inside", "between"])
def test_truncated_eval_shard_is_an_error_not_a_smaller_gallery(dataset, cut):
    shard = dataset / "val" / "val-000001.tar"
    offsets = member_offsets(shard)
    truncate(shard, offsets[5] + 700 if cut == "inside" else offsets[6])
    gallery, queries = eval_loaders(cfg(dataset), "val")
    for loader in (gallery, queries):
        with pytest.raises(DataError, match=str(shard)):
            list(loader)


def test_corrupt_gallery_image_is_skipped_and_counted_in_the_results(dataset, capfd):
    plant_undecodable_image(dataset, "val", "val-000000.tar", 1)  # (undecodable, as the manifest says)
    config = resolve_config("synthetic", None, small_run_args(dataset))
    torch.manual_seed(0)
    model = ITSELF(config.model, 32, config.data.image_size).eval()
    results = evaluate(model, config, "val", rank=0, world=1, device=torch.device("cpu"))
    assert results.counts == Counts(gallery=15, queries=32, gallery_skipped=1)
    assert "skipped corrupt gallery image" in capfd.readouterr().err


def test_missing_train_shard_is_an_error_naming_it(dataset):
    (dataset / "train" / "train-000003.tar").unlink()
    with pytest.raises(DataError, match="shard not found: .*train-000003.tar"):
        one_train_epoch(dataset)


@pytest.mark.parametrize("version", [0, 3, "1.5"])
def test_dataset_json_of_another_schema_version_is_refused(dataset, version):
    info_file = dataset / schema.DATASET_FILE
    info = json.loads(info_file.read_text())
    info["schema_version"] = version
    info_file.write_text(json.dumps(info))
    with pytest.raises(DataError, match=f"schema version {version} is not one this code reads \\(1, 2\\); rebuild"):
        one_train_epoch(dataset)


def test_manifest_of_another_schema_version_is_refused(dataset):
    manifest = dataset / schema.MANIFEST_FILE
    table = pq.read_table(manifest)
    assert table.schema.metadata[schema.MANIFEST_VERSION_KEY] == b"2"  # the writer records it
    pq.write_table(table.replace_schema_metadata({schema.MANIFEST_VERSION_KEY: b"3"}), manifest)
    with pytest.raises(DataError, match=f"{manifest}: shard schema version 3 is not one this code reads"):
        one_train_epoch(dataset)


def as_version_1(dataset) -> None:
    """Make a dataset's manifest and dataset.json those of schema 1."""
    manifest = dataset / schema.MANIFEST_FILE
    table = pq.read_table(manifest).drop_columns(list(schema.V2_COLUMNS))
    pq.write_table(table.replace_schema_metadata({schema.MANIFEST_VERSION_KEY: b"1"}), manifest)
    info = json.loads((dataset / schema.DATASET_FILE).read_text())
    (dataset / schema.DATASET_FILE).write_text(json.dumps({**info, "schema_version": 1}))


def test_a_version_1_dataset_trains_on_the_same_batches(dataset, small_dataset):
    # Schema 1 has no byte ranges or caption counts: shards are streamed instead, same batches.
    as_version_1(dataset)
    old, new = one_train_epoch(dataset), one_train_epoch(small_dataset)
    assert len(old) == len(new) and all(torch.equal(a[k], b[k]) for a, b in zip(old, new) for k in a)


@pytest.mark.parametrize("name", ["../../outside", "/abs/outside"])
def test_tar_member_with_an_escaping_path_is_refused(dataset, name):
    shard = dataset / "val" / "val-000000.tar"
    with tarfile.open(shard, "a") as t:
        for ext, data in (("jpg", b"\xff\xd8"), ("json", b"{}")):
            info = tarfile.TarInfo(f"{name}.{ext}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    gallery, _ = eval_loaders(cfg(dataset), "val")
    with pytest.raises(DataError, match="has an unsafe path"):
        list(gallery)
    assert not (dataset.parent / "outside.jpg").exists() and not (dataset / "outside.jpg").exists()


@pytest.mark.parametrize("order", ["slots", "uniform"])
def test_a_dataset_on_a_server_without_range_requests_is_streamed(small_dataset, order):
    # `python -m http.server` answers every request with the whole file: the manifest is then read
    # whole and the shards streamed (once per window, also when a window holds identities spread
    # over a shard: uniform), and the batches are those of the local dataset.
    from http_server import serve

    args = dict(rank=0, world_size=1, micro_batch=16, seed=0)
    data = dict(image_size=(48, 16), num_workers=0, num_slots=4, identity_order=order)
    local = train_loader(DataConfig(root=str(small_dataset), **data), **args)
    local.set_epoch(0)
    want = [b["image_ids"].tolist() for b in local]
    with serve(small_dataset.parent, ranges=False) as url:
        root = f"{url}/{small_dataset.name}"
        remote = train_loader(DataConfig(root=root, **data), **args)
        remote.set_epoch(0)
        got = [b["image_ids"].tolist() for b in remote]
        gallery, queries = eval_loaders(DataConfig(root=root, image_size=(48, 16)), "val")
        assert sum(len(b[0]) for b in gallery) == 16
    assert got == want



def _sparse_member_shard(path, claimed: int, header: bool = False) -> None:
    """A shard whose first member's header (or, with `header`, a pax header before it, which tarfile
    reads whole) claims `claimed` bytes, as a sparse file: gigabytes on paper, nothing on disk (what
    a hostile dataset folder can hold at no cost)."""
    info = tarfile.TarInfo("././@PaxHeader" if header else "000000000.jpg")
    info.type = tarfile.XHDTYPE if header else tarfile.REGTYPE
    info.size = claimed
    with open(path, "wb") as f:
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.truncate(512 + claimed + 1024)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("header", [False, True], ids=["member", "pax header"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_a_shard_member_claiming_gigabytes_is_refused_unread(dataset, split, header):
    # A built shard holds no member over schema.MAX_MEMBER_BYTES, and no extended header over 1 MiB:
    # a larger one is refused from its header (reading it would take 8 GiB of memory), in training's
    # streamed reads (a schema-1 dataset, or a server without byte ranges) and evaluation's.
    shard = dataset / split / f"{split}-000000.tar"
    _sparse_member_shard(shard, 8 << 30, header)
    message = (f"an extended header of {8 << 30} bytes \\(at most 1048576 read\\): refused unread" if header else
               f"member '000000000.jpg' is {8 << 30} bytes, more than a built shard holds \\(128 MiB\\): refused unread")
    with pytest.raises(DataError, match=f"cannot read shard {shard}: {message}"):
        if split == "train":
            as_version_1(dataset)
            one_train_epoch(dataset)
        else:
            list(eval_loaders(cfg(dataset), "val")[0])


@pytest.mark.parametrize("lie", ["huge", "gap"])
def test_a_manifest_whose_byte_ranges_no_build_writes_is_refused_unread(dataset, lie):
    # Training reads consecutive samples with one ranged read from the manifest's offsets and
    # sizes: a manifest saying a sample spans 8 GiB, or that the next one starts 8 GiB further (of
    # a sparse shard), is refused before the read.
    import pyarrow as pa

    from itself.data.catalog import TrainData
    from itself.data.sources import train_sources

    table = pq.read_table(dataset / schema.MANIFEST_FILE)
    rows = table.to_pylist()
    train = [r for r in rows if r["split"] == "train" and r["shard"] == "train-000000.tar"]
    if lie == "huge":
        train[0]["size"] = 8 << 30
        message = f"the manifest says a sample spans {8 << 30} bytes from byte {train[0]['offset']}"
    else:
        for r in train[1:]:
            r["offset"] += 8 << 30
        message = "the manifest's byte ranges of consecutive samples leave gaps or overlap"
    with open(dataset / "train" / "train-000000.tar", "r+b") as f:
        f.truncate(train[-1]["offset"] + (9 << 30))
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), dataset / schema.MANIFEST_FILE)
    data = TrainData(train_sources(cfg(dataset)))
    shard = [u.endswith("train-000000.tar") for u in data.urls].index(True)
    with pytest.raises(DataError, match=f"shard {data.urls[shard]}: {message}.*refused unread"):
        next(data.read_segment(shard, 0, 2))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["train/train-000000.tar", "val/val-000000.tar", schema.MANIFEST_FILE])
def test_a_fifo_in_place_of_a_shard_or_the_manifest_is_refused_without_blocking(dataset, name):
    # Opening a FIFO for reading waits for a writer: forever, in a folder someone handed us.
    (dataset / name).unlink()
    os.mkfifo(dataset / name)
    with pytest.raises(UserError, match=f"{dataset / name} is (a FIFO, )?not a regular file"):
        if name.startswith("val/"):
            list(eval_loaders(cfg(dataset), "val")[0])
        else:
            one_train_epoch(dataset)

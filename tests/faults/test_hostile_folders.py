"""An index folder someone hands us is data, never commands (issue 25): a shell command as an
image's place, `vectors` naming a file outside, a part file or a batch folder that is a link, a
header claiming terabytes, links planted at temporary names. query, report, serve (thumbnails)
and a rebuild refuse each with one `error:` line naming the file and the entry (exit 2), run
nothing (the marker a command would create never appears) and touch nothing outside (the victim
file keeps its bytes). Then each check on its own: index.json's entries, the .npy and FAISS files,
names resolved inside their root (`itself.safeio.resolve_inside`), dataset.json's shard names, and
commands (`pipe:`) never reachable from data."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from retrieving import Served, cli, copy_index, edit_json, ok, part_file, refused

from itself.data.catalog import iter_shard
from itself.errors import DataError, UserError
from itself.retrieve.vectors import check_faiss
from itself.safeio import UnsafePath, check_relative, resolve_inside

# ----------------------------------------------------------------------------------- the hostile folder


def _plants(marker: Path, victim: Path, tmp: Path) -> dict:
    """name -> plant(index folder): the attacks, one folder each (each check must hold on its own)."""

    def shell_locators(d):  # a command, a path out of the root, an absolute path as images' places
        def change(meta):
            a, b, c = meta["items"][:3]
            a.update(shard=f"pipe:touch {marker}", key="k")
            del b["shard"], b["key"]
            b["file"] = "../" * 12 + str(victim).lstrip("/")
            c["shard"] = str(victim)
        edit_json(part_file(d), change)

    def shell_root(d):  # the gallery root itself a command
        root = f"pipe:touch {marker} #"
        edit_json(d / "index.json", lambda i: i["batches"][0].update(root=root))
        edit_json(d / "batches" / "000" / "plan.json", lambda p: p.update(root=root))

    def vectors_relative(d):  # a rebuild used to delete the file index.json names as `vectors`
        edit_json(d / "index.json", lambda i: i.update(vectors=f"../{victim.name}"))

    def vectors_absolute(d):
        edit_json(d / "index.json", lambda i: i.update(vectors=str(victim)))

    def part_link(d):
        part_file(d, 1).unlink()
        part_file(d, 1).symlink_to(victim)

    def batch_link(d):
        (d / "batches" / "000").rename(tmp / f"elsewhere-{d.name}")
        (d / "batches" / "000").symlink_to(tmp / f"elsewhere-{d.name}")

    def npy_claims_a_terabyte(d):
        f = d / "batches" / "000" / "part-000000.global.npy"
        header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 64), np.float32))
        header["shape"] = (10**12, 64)
        with open(f, "wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            out.write(b"\0" * 256)

    def partial_links(d):  # links at the temporary names a writer used to open (and follow)
        for name in ("index.json.partial", "vectors-0002.faiss.partial", "vectors-0002.faiss",
                     "batches/000/plan.json.partial"):
            (d / name).symlink_to(victim)

    return {f.__name__: f for f in (shell_locators, shell_root, vectors_relative, vectors_absolute, part_link,
                                    batch_link, npy_claims_a_terabyte, partial_links)}


# What each command does with each folder: 0 (works, nothing reached), 2 (refused, naming this).
REFUSALS = {
    "shell_locators": (0, "part-000000.json: entry", 0),
    "shell_root": (2, "index.json: entry batches[0].root", 2),
    "vectors_relative": (2, "index.json: entry vectors", 2),
    "vectors_absolute": (2, "index.json: entry vectors", 2),
    "part_link": (2, "part-000001.json", 2),
    "batch_link": (2, "batches/000 is a symbolic link", 2),
    "npy_claims_a_terabyte": (2, "holds 1000000000000x64 float32 values, the index expects 8x64", 2),
    "partial_links": (0, None, 0),
}


def test_a_hostile_index_folder_runs_nothing_and_touches_nothing_outside(shard_index, untrained_model, small_dataset,
                                                                        tmp_path):
    marker, victim = tmp_path / "command-ran", tmp_path / "victim.txt"
    victim.write_bytes(b"the user's own file\n")
    for name, plant in _plants(marker, victim, tmp_path).items():
        d = copy_index(shard_index, tmp_path / name)
        plant(d)
        query_code, message, rebuild_code = REFUSALS[name]
        # query: names only (no image read); refused when the folder itself is damaged
        result = cli("query", "--index", d, "--text", "a man in a grey coat", "--top-k", "16")
        if query_code:
            refused(result, message)
        else:
            ok(result)
        # report: every image of the gallery shown (top-k 16)
        report = cli("report", "--index", d, "--text", "a man", "--top-k", "16", "--out", tmp_path / f"report-{name}")
        if message:
            refused(report, message)
            assert not (tmp_path / f"report-{name}" / "index.html").exists()
        else:
            ok(report)
        # serve: the page and the first three thumbnails (two of them planted in shell_locators)
        try:
            with Served(d) as server:
                assert server.get("/?q=a+man&k=16")[0] == 200
                codes = [server.get(f"/thumb/{row}.png")[0] for row in range(3)]
                assert codes == ([404, 404, 404] if name == "shell_locators" else [200, 200, 200]), (name, codes)
        except UserError as e:
            assert query_code == 2 and message in str(e), (name, e)
        # a rebuild (another index type): refused, or done without following anything planted
        result = cli("index", "--model", untrained_model, "--gallery", small_dataset, "--out", d, "--index-type", "hnsw",
                     "--pca-dim", "8")
        if rebuild_code:
            refused(result, message)
        else:
            ok(result)
        assert not marker.exists(), name
        assert victim.read_bytes() == b"the user's own file\n", name
        assert not victim.is_symlink() and victim.stat().st_nlink == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("report-", "elsewhere-"))) == sorted(
        [*REFUSALS, "victim.txt"])
    # The rebuild over planted links replaced them with its own files.
    assert not (tmp_path / "partial_links" / "vectors-0002.faiss").is_symlink()
    assert json.loads((tmp_path / "partial_links" / "index.json").read_text())["vectors"] == "vectors-0002.faiss"


# ----------------------------------------------------------------------------------- index.json


@pytest.mark.parametrize("entry,value,message", [
    ("vectors", "../victim.txt", "entry vectors is '../victim.txt'; this index writes vectors-0001.faiss"),
    ("vectors", "/etc/passwd", "entry vectors is '/etc/passwd'"),
    ("vectors", "vectors-0001.faiss/../../x", "entry vectors"),
    ("generation", 2, "entry vectors is 'vectors-0001.faiss'; this index writes vectors-0002.faiss"),
    ("model", "model.pt", "entry model is 'model.pt', not an absolute path"),
    ("model_sha256", "0" * 63, "entry model_sha256"),
    ("fusion_weight", float("nan"), "entry fusion_weight is nan, not in 0..1"),
    ("fusion_weight", 1.5, "entry fusion_weight is 1.5"),
    ("images", "many", "entry images is 'many', not a number"),
    ("images", 99, "entry images is 99, the batches hold 8"),
    ("index", {"kind": "flat", "pca_dim": 1, "hnsw_m": 1, "ef_construction": 1, "code": "x"}, "entry index"),
    ("global_dim", 10**9, "entry global_dim is 1000000000, not in 1..65536"),
    ("batches", [], "entry batches holds 0 batches"),
    ("batches.root", "pipe:touch x", "entry batches[0].root: 'pipe:touch x' is a command"),
    ("batches.root", "relative/gallery", "is not an absolute folder"),
    ("batches.root", "ftp://host/gallery/", "ftp:// is not a gallery store"),
    ("batches.number", 7, "entry batches[0].number is 7, not 0"),
    ("batches.part_images", [10**12], "entry batches[0].images is 8, its parts hold 1000000000000"),
    ("batches.part_images", "8", "entry batches[0].part_images is '8', not a list"),
    ("format", "itself-index/2", "an index of format 'itself-index/2', this version reads 'itself-index/3'"),
])
def test_every_index_json_entry_is_checked(folder_index, tmp_path, entry, value, message):
    d = copy_index(folder_index, tmp_path / "index")

    def change(info):
        if entry.startswith("batches."):
            info["batches"][0][entry.split(".")[1]] = value
        else:
            info[entry] = value
    edit_json(d / "index.json", change)
    refused(cli("query", "--index", d, "--text", "a man"), f"{d / 'index.json'}", message)


def test_index_json_that_is_no_json_utf8_or_object(folder_index, tmp_path):
    d = copy_index(folder_index, tmp_path / "index")
    for data, message in [(b'{"format": "itself-index/3", "images": \xff}', "unreadable (UnicodeDecodeError"),
                          (b"[" * 100_000 + b"]" * 100_000, "unreadable (RecursionError"),
                          (b"[1, 2]", "entry (the file) is a list, not an object")]:
        (d / "index.json").write_bytes(data)
        refused(cli("query", "--index", d, "--text", "a man"), message)


@pytest.mark.parametrize("where,change,message", [
    ("plan", lambda p: p.update(units=10**9), "plan.json: entry units is 1000000000, not in 0..10000000"),
    ("plan", lambda p: p.update(units=5), "plan.json is missing or disagrees with index.json"),
    ("plan", lambda p: p.update(units="all"), "plan.json: entry units is 'all', not a number"),
    ("part", lambda m: m["items"][0].update(pid=[1, 2]), "entry items[0].pid is [1, 2], not a number or string"),
    ("part", lambda m: m["items"][0].update(name=None), "entry items[0].name is None, not a string"),
    ("part", lambda m: m["items"][0].pop("file"), "entry items[0] names no place in the gallery"),
    ("part", lambda m: m["items"][0].update(sha256="x"), "entry items[0].sha256 is 'x', not a sha256"),
    ("part", lambda m: m.update(images=9), "entry images is 9, the part lists 8 items"),
])
def test_plan_and_part_entries_are_checked(folder_index, tmp_path, where, change, message):
    d = copy_index(folder_index, tmp_path / "index")
    edit_json(d / "batches" / "000" / "plan.json" if where == "plan" else part_file(d), change)
    refused(cli("query", "--index", d, "--text", "a man"), message)


# ----------------------------------------------------------------------------------- FAISS and .npy


def test_a_faiss_file_claiming_a_huge_array_is_refused_at_once(folder_index, tmp_path):
    d = copy_index(folder_index, tmp_path / "index")
    f = d / "vectors-0001.faiss"
    data = bytearray(f.read_bytes())
    assert data[:4] == b"IxFI"  # flat: fourcc, d, ntotal, 2 dummies, is_trained, metric, then the codes' length
    data[37:45] = struct.pack("<Q", 1 << 30)  # (4 GiB of floats, in a file of a few KiB)
    f.write_bytes(data)
    start = time.monotonic()
    refused(cli("query", "--index", d, "--text", "a man"), "vectors-0001.faiss: unreadable", "the index folder is damaged")
    assert time.monotonic() - start < 60  # (refused by a memory bound, not after filling memory)
    f.write_bytes(bytes(data) + b"\0" * (4 * 8 * 96 + (64 << 10)))
    refused(cli("query", "--index", d, "--text", "a man"), "bytes, more than an index of 8 images of 96 dimensions takes")


def test_an_hnsw_graph_with_a_link_to_no_image_is_refused(folder_index, untrained_model, photos, tmp_path):
    import faiss

    d = copy_index(folder_index, tmp_path / "index")
    ok(cli("index", "--model", untrained_model, "--gallery", photos, "--out", d, "--index-type", "hnsw", "--pca-dim", "8"))
    f = d / "vectors-0002.faiss"
    index = faiss.read_index(str(f))
    graph = faiss.downcast_index(index.index)
    links = faiss.vector_to_array(graph.hnsw.neighbors)
    links[0] = 10**6  # a search would read the vector of image 1,000,000 of 8
    faiss.copy_array_to_vector(links, graph.hnsw.neighbors)
    with pytest.raises(AssertionError, match="an HNSW link to no image"):  # (ours: FAISS before 1.10 checks none)
        check_faiss(index, 8, 96, "hnsw")
    faiss.write_index(index, str(f))
    refused(cli("query", "--index", d, "--text", "a man"), "vectors-0002.faiss: unreadable", "HNSW")


# ----------------------------------------------------------------------------------- names inside their root


@pytest.mark.parametrize("name,why", [
    ("../victim.txt", "leaves the folder"), ("a/../../b.jpg", "leaves the folder"), ("/etc/passwd", "absolute path"),
    ("pipe:touch /tmp/x", "a URL or a command"), ("s3://bucket/x.tar", "a URL or a command"),
    ("simplecache::x.tar", "a URL or a command"), ("a\x00.jpg", "NUL byte"), ("", "is empty"), (".", "the folder itself"),
    ("x" * 5000, "longer than 4096"), (7, "is not a path"), (None, "is not a path"),
])
def test_names_that_leave_their_root_are_refused(tmp_path, name, why):
    with pytest.raises(UnsafePath, match="^part.json: entry file: .*" + why.replace("(", r"\(")):
        resolve_inside(tmp_path, name, "part.json: entry file")


def test_links_are_followed_only_inside_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.jpg"
    (root / "cam").mkdir(parents=True)
    outside.write_bytes(b"x")
    (root / "cam" / "a.jpg").write_bytes(b"a")
    (root / "in.jpg").symlink_to(root / "cam" / "a.jpg")
    (root / "out.jpg").symlink_to(outside)
    (root / "up").symlink_to(tmp_path)
    assert resolve_inside(root, "in.jpg", "x") == (root / "cam" / "a.jpg").resolve()
    assert resolve_inside(root, "./cam//a.jpg", "x") == (root / "cam" / "a.jpg").resolve()
    assert check_relative("cam/./a.jpg", "x") == "cam/a.jpg"
    for name in ("out.jpg", "up/outside.jpg"):
        with pytest.raises(UnsafePath, match="leaves .* through a symbolic link"):
            resolve_inside(root, name, "x")
    with pytest.raises(UnsafePath, match="is a symbolic link; this folder holds none"):
        resolve_inside(root, "in.jpg", "x", links=False)


@pytest.mark.parametrize("name", ["../../../victim.tar", "/etc/passwd", "pipe:touch MARKER"])
def test_dataset_json_shard_names_stay_inside_the_dataset(small_dataset, untrained_model, tmp_path, name):
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    for f in ("dataset.json", "manifest.parquet"):
        (data / f).write_bytes((small_dataset / f).read_bytes())
    marker = tmp_path / "ran"
    edit_json(data / "dataset.json",
              lambda i: i["splits"]["test"]["shards"][0].update(name=name.replace("MARKER", str(marker))))
    result = cli("index", "--model", untrained_model, "--gallery", data, "--out", tmp_path / "index")
    refused(result, "dataset.json: entry splits.test.shards[0].name")
    assert not marker.exists() and not (tmp_path / "index").exists()


# ----------------------------------------------------------------------------------- commands


def test_commands_are_never_run_from_data(untrained_model, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(DataError, match="a command .pipe:., refused"):
        next(iter_shard(f"pipe:touch {marker}"))
    refused(cli("index", "--model", untrained_model, "--gallery", f"pipe:touch {marker}", "--out", tmp_path / "i"),
            "a command (pipe:) cannot be a gallery")
    refused(cli("index", "--model", untrained_model, "--gallery", f"{tmp_path}/a.tar::pipe:touch {marker}",
                "--out", tmp_path / "i"), "shards must be all local files or all URLs of one store")
    assert not marker.exists() and not (tmp_path / "i").exists()


def test_an_index_lock_planted_as_a_link_is_not_followed(folder_index, untrained_model, photos, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    d = copy_index(folder_index, tmp_path / "index")
    (d / "index.lock").symlink_to(victim)
    refused(cli("index", "--model", untrained_model, "--gallery", photos, "--out", d, "--index-type", "hnsw"),
            "cannot create the lock", "index.lock")
    assert victim.read_text() == "keep\n" and os.path.islink(d / "index.lock")


@pytest.mark.parametrize("name,message", [
    ("index.json", "index.json is a FIFO, not a regular file"),
    ("vectors-0001.faiss", "vectors-0001.faiss: not a regular file"),
    ("batches/000/part-000000.global.npy", "part-000000.global.npy: not a regular file"),
    ("batches/000/part-000000.json", "part-000000.json: not a regular file"),
])
def test_fifos_in_place_of_files_are_refused_without_blocking(folder_index, tmp_path, name, message):
    d = copy_index(folder_index, tmp_path / "index")
    (d / name).unlink()
    os.mkfifo(d / name)  # (opening one for reading blocks until a writer comes: none will)
    start = time.monotonic()
    refused(cli("query", "--index", d, "--text", "a man"), message)
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("name", ["../../../victim.tar", "/etc/hostname", "pipe:touch MARKER", "test/../../victim.tar"])
def test_training_reads_only_shards_inside_the_dataset(small_dataset, tmp_path, name):
    from itself.data.sources import split_urls

    data, marker = tmp_path / "data", tmp_path / "ran"
    shutil.copytree(small_dataset, data)
    (tmp_path / "victim.tar").write_bytes((small_dataset / "test" / "test-000000.tar").read_bytes())
    edit_json(data / "dataset.json",
              lambda i: i["splits"]["test"]["shards"][0].update(name=name.replace("MARKER", str(marker))))
    with pytest.raises(UnsafePath, match=r"dataset.json: entry splits.test.shards\[0\].name"):
        split_urls(str(data), "test")
    assert not marker.exists()


@pytest.mark.parametrize("plant", ["/dev/zero", "fifo"])
def test_a_dataset_json_that_is_a_device_or_fifo_is_refused_without_reading_it(tmp_path, plant):
    from itself.data.catalog import dataset_info

    (tmp_path / "data").mkdir()
    info = tmp_path / "data" / "dataset.json"
    os.mkfifo(info) if plant == "fifo" else info.symlink_to(plant)
    with pytest.raises(UnsafePath, match=f"dataset {tmp_path / 'data'}: {info} is a (FIFO|special file), not a regular"):
        dataset_info(str(tmp_path / "data"))


def test_a_manifest_that_is_a_decompression_bomb_is_refused_unread(small_dataset, tmp_path, monkeypatch):
    # (the limit scaled down: 1 KB of text per row on average, against a caption of 2 MB)
    import pyarrow as pa
    import pyarrow.parquet as pq

    import shards.corpora
    from itself.data.catalog import read_manifest, split_digests

    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    table = pq.read_table(data / "manifest.parquet")
    read_manifest(str(data))  # (the dataset as built reads under the scaled limit too)
    monkeypatch.setattr(shards.corpora, "MAX_TEXT_ROW_BYTES", 1000)
    read_manifest(str(data))
    rows = table.to_pylist()
    rows[0]["captions"] = ["a" * (2 << 20)]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), data / "manifest.parquet", compression="zstd")
    for read in (lambda: read_manifest(str(data)), lambda: read_manifest(str(data), ["split", "captions"])):
        with pytest.raises(DataError, match="bytes per row uncompressed .*refused without decompressing it"):
            read()
    assert len(split_digests(str(data), "test")) == 16  # (columns without the bomb are read as before)

"""Hostile or careless inputs to `python -m shards build` are judged before they are trusted:
wrong types, huge or deep values, NUL bytes, one image under several spellings or links, an
identity in two splits, 16-bit images, files that are not regular images, annotation files that
are not lists of records. Each is rejected with its reason (or refused with an `error:`), never a
traceback, and nothing is lost: read = written + rejected."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from runs import REPO
from shards import schema
from shards.imaging import to_rgb8
from shards.writer import DatasetWriter, Record
from test_converters import _image, make_cuhk, make_icfg, make_jsonl, make_rstpreid

# format -> (make the good part, annotation file, image folder, path key, id key)
FORMATS = {
    "cuhk-pedes": (make_cuhk, "reid_raw.json", "imgs", "file_path", "id"),
    "icfg-pedes": (make_icfg, "ICFG_PEDES.json", "imgs", "file_path", "id"),
    "rstpreid": (make_rstpreid, "data_captions.json", "imgs", "img_path", "id"),
    "jsonl": (make_jsonl, "annotations.jsonl", ".", "image", "pid"),
}


def build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", "build", *args, "--no-progress", "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def read_records(root: Path, fmt: str) -> list:
    text = (root / FORMATS[fmt][1]).read_text()
    return [json.loads(x) for x in text.splitlines() if x.strip()] if fmt == "jsonl" else json.loads(text)


def write_records(root: Path, fmt: str, records: list, raw_lines: tuple[str, ...] = ()) -> None:
    path = root / FORMATS[fmt][1]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(x + "\n" for x in raw_lines))
    else:
        path.write_text(json.dumps(records))


def converted(root: Path, fmt: str, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict, list, list]:
    run = build("--dataset", fmt, "--root", str(root), "--out", str(out), *extra)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    info = json.loads((out / schema.DATASET_FILE).read_text())
    rejects = [json.loads(x) for x in (out / schema.REJECTS_FILE).read_text().splitlines()]
    rows = pq.read_table(out / schema.MANIFEST_FILE).to_pylist()
    assert info["read"] == info["written"] + info["rejected"] == len(rows) + len(rejects)  # nothing lost
    return run, info, rejects, rows


def stored_image(out: Path, row: dict) -> tuple[str, bytes]:
    with tarfile.open(out / row["split"] / row["shard"]) as t:
        name = next(n for n in t.getnames() if n.startswith(row["key"] + ".") and not n.endswith(".json"))
        return name.rsplit(".", 1)[1], t.extractfile(name).read()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_wrong_types_and_huge_values_are_rejected_with_a_reason(tmp_path, fmt):
    root = tmp_path / "raw"
    make, _, image_dir, path_key, id_key = FORMATS[fmt]
    make(root)
    good = read_records(root, fmt)
    split = "train"
    deep = []
    for _ in range(200):
        deep = [deep]

    def rec(i: int, **change):
        _image(root / image_dir / f"bad{i}.jpg")
        r = {"split": split, "captions": ["a person in a red coat"], path_key: f"bad{i}.jpg", id_key: 900 + i}
        r.update({({"path": path_key, "pid": id_key}.get(k, k)): v for k, v in change.items()})
        return r

    cases = [  # (record, reason, fragment of the detail)
        (rec(0, pid=[1]), "malformed record", "pid must be an integer or a string, got list: [1]"),
        (rec(1, pid={"a": 1}), "malformed record", "pid must be an integer or a string, got object"),
        (rec(2, pid=1.5), "malformed record", "pid must be an integer or a string, got float: 1.5"),
        (rec(3, pid=True), "malformed record", "pid must be an integer or a string, got bool"),
        (rec(4, pid=deep), "malformed record", "pid must be an integer or a string, got list: [[[[...]]]]"),
        (rec(5, pid="p" * 100_000), "malformed record", "pid is 100000 characters long (at most 256)"),
        (rec(6, split=["train"]), "malformed record", "split must be a string, got list"),
        (rec(7, split=3), "malformed record", "split must be a string, got integer"),
        (rec(8, captions={"text": "x"}), "malformed record", "captions must be a list of strings or a string, got object"),
        (rec(9, captions=7), "malformed record", "captions must be a list of strings or a string, got integer"),
        (rec(10, captions=[deep]), "empty or non-string caption", "non-string caption (list)"),
        (rec(11, captions=["x" * 1_000_000]), "caption too long", "caption is 1000000 characters long (at most 10000)"),
        (rec(12, captions=["a \ud800 caption"]), "malformed record", "caption is not valid Unicode text"),
        (rec(13, path=["bad13.jpg"]), "malformed record", "image path must be a string, got list"),
        (rec(14, path="bad14\x00.jpg"), "malformed record", "image path contains a NUL byte"),
        (rec(15, path=15), "malformed record", "image path must be a string, got integer"),
        (rec(16, path=None), "missing image file", "no image path"),
        (rec(17, split=None, pid="p17"), "unknown split", "no split given"),
    ]
    write_records(root, fmt, good + [c[0] for c in cases] + ["just text", [1, 2, 3]])
    run, info, rejects, rows = converted(root, fmt, tmp_path / "out")
    assert info["written"] == len(good) and info["read"] == len(good) + len(cases) + 2
    assert [(r["reason"], r["detail"].split(":")[0]) for r in rejects[:2]] == [("malformed record", "expected an object, got string"), ("malformed record", "expected an object, got list")]
    for (record, reason, fragment), got in zip(cases, rejects[2:]):
        assert got["reason"] == reason and fragment in got["detail"], (got, reason, fragment)
        assert len(got["detail"]) < 400 and len(str(got["source"])) < 1200 and len(str(got["split"])) < 400
    assert len(rejects) == len(cases) + 2
    assert len(run.stdout) < 2000  # the summary, not the values
    if fmt == "jsonl":  # lines that are not JSON, nested too deeply, or hold an unprintable number
        write_records(root, fmt, good, ("{not json", "[" * 100_000 + "]" * 100_000, '{"pid": ' + "9" * 5000 + "}"))
        _, _, rejects, _ = converted(root, fmt, tmp_path / "out2")
        assert [r["reason"] for r in rejects] == ["malformed record"] * 3
        assert "Expecting property name" in rejects[0]["detail"] and "nested too deeply" in rejects[1]["detail"]
        assert "4300 digits" in rejects[2]["detail"] and all(len(r["detail"]) < 400 for r in rejects)


@pytest.mark.parametrize("fmt", ["jsonl", "rstpreid"])
def test_one_image_under_several_names_is_written_once(tmp_path, fmt):
    root = tmp_path / "raw"
    make, _, image_dir, path_key, id_key = FORMATS[fmt]
    make(root)
    good = read_records(root, fmt)
    base = root / image_dir
    prefix = "imgs/" if fmt == "jsonl" else ""
    _image(base / prefix / "1.jpg")
    (base / prefix / "sub").mkdir()
    os.symlink("1.jpg", base / prefix / "alias.jpg")
    os.link(base / prefix / "1.jpg", base / prefix / "hard.jpg")
    spellings = [f"{prefix}1.jpg", f"./{prefix}1.jpg", f"{prefix.replace('/', '//')}1.jpg" if prefix else ".//1.jpg",
                 f"{prefix}sub/../1.jpg", f"{prefix}alias.jpg", f"{prefix}hard.jpg"]
    splits = ["train", "train", "test", "val", "test", "val"]  # and under six identities
    extra = [{"split": s, "captions": ["the same picture"], path_key: p, id_key: f"dup{i}"}
             for i, (p, s) in enumerate(zip(spellings, splits))]
    write_records(root, fmt, good + extra)
    _, info, rejects, rows = converted(root, fmt, tmp_path / "out")
    assert [r["source"] for r in rows if r["orig_pid"].startswith("dup")] == [os.path.normpath(spellings[0])]
    dups = [r for r in rejects if r["reason"] == "duplicate image entry"]
    assert [r["source"] for r in dups] == spellings[1:] and len(rejects) == 5
    first = os.path.normpath(spellings[0])
    for r in dups[:3]:
        assert r["detail"] == f"{first} (given as {r['source']!r}) is listed more than once; the first is kept"
    for r in dups[3:]:
        assert r["detail"].endswith(f"is the same file as {first} (a link); the first is kept")


def test_an_identity_in_two_splits_is_kept_where_most_of_its_records_are(tmp_path):
    root = tmp_path / "raw"
    make_rstpreid(root)  # ids 0-3 train, 100-101 val, 200-201 test; 5 images each
    good = read_records(root, "rstpreid")

    def rec(name: str, pid, split: str) -> dict:
        _image(root / "imgs" / name)
        return {"id": pid, "img_path": name, "captions": [f"person {pid}"], "split": split}

    extra = [rec("a.jpg", 0, "test"),  # 5 in train, 1 in test
             rec("b.jpg", 100, "test"),  # 5 in val, 1 in test
             rec("c.jpg", 500, "test"), rec("d.jpg", 500, "val"),  # a tie: the first of train, val, test
             rec("e.jpg", 300, "train"), rec("f.jpg", 300, "test"), rec("g.jpg", 300, "test"),
             rec("h.jpg", "7", "train"), rec("i.jpg", "7", "train"), rec("j.jpg", 7, "test")]  # 7 and "7": one
    write_records(root, "rstpreid", good + extra)
    _, info, rejects, rows = converted(root, "rstpreid", tmp_path / "out")
    moved = {r["source"]: r["detail"] for r in rejects if r["reason"] == "identity in two splits"}
    assert moved == {
        "a.jpg": "pid 0 has records 5 in train, 1 in test: kept in train (splits must be identity-disjoint)",
        "b.jpg": "pid 100 has records 5 in val, 1 in test: kept in val (splits must be identity-disjoint)",
        "c.jpg": "pid 500 has records 1 in val, 1 in test: kept in val (splits must be identity-disjoint)",
        "e.jpg": "pid 300 has records 1 in train, 2 in test: kept in test (splits must be identity-disjoint)",
        "j.jpg": "pid 7 has records 2 in train, 1 in test: kept in train (splits must be identity-disjoint)",
    }
    assert len(rejects) == 5 and info["written"] == len(good) + 5
    ids = {s: {r["orig_pid"] for r in rows if r["split"] == s} for s in schema.SPLITS}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert "7" in ids["train"] and "300" in ids["test"] and "500" in ids["val"]


def _png16(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path, format="PNG")  # mode I;16: a 16-bit PNG


def test_to_rgb8_scales_high_bit_depths_instead_of_clipping():
    ramp = np.arange(256, dtype=np.uint32) * 257  # 0, 257, ..., 65535: exactly 0..255 in 8 bits
    for mode, image in (("I;16", Image.fromarray(ramp.astype(np.uint16).reshape(16, 16))),
                        ("I;16B", Image.frombytes("I;16B", (16, 16), ramp.astype(">u2").tobytes())),
                        ("I", Image.fromarray(ramp.astype(np.int32).reshape(16, 16))),
                        ("F", Image.fromarray((ramp / 65535).astype(np.float32).reshape(16, 16)))):
        assert image.mode == mode
        rgb = to_rgb8(image)
        assert rgb.mode == "RGB"
        arr = np.asarray(rgb)
        assert (arr[..., 0] == arr[..., 2]).all() and arr[..., 0].ravel().tolist() == list(range(256)), mode
        assert np.asarray(image.convert("RGB")).mean() > 250 or mode == "F"  # what Pillow alone does
    plain = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb8(plain) is plain
    assert np.asarray(to_rgb8(Image.new("La", (4, 4), (90, 255)))).tolist()[0][0] == [90, 90, 90]


def test_high_bit_depths_are_scaled_a_band_at_a_time(monkeypatch):
    # The same values as scaled whole, in a band's memory: a 9400 x 9400 16-bit PNG took 3.2 GB at
    # once (float64 copies of every sample), 1.1 GB now. (Bands scaled down: 4,096 samples.)
    import tracemalloc

    import shards.imaging
    from shards.imaging import _scaled_to_u8

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 65536, (512, 512)).astype(np.uint16), "I;16"),
             (rng.integers(-5, 70000, (512, 512)).astype(np.int32), "I"),
             (np.where(rng.random((512, 512)) < 0.01, np.nan, rng.random((512, 512)) * 3).astype(np.float32), "F")]
    whole = [_scaled_to_u8(arr, mode) for arr, mode in cases]
    monkeypatch.setattr(shards.imaging, "_BAND_SAMPLES", 4096)
    for (arr, mode), expected in zip(cases, whole):
        tracemalloc.start()
        got = _scaled_to_u8(arr, mode)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert np.array_equal(got, expected) and peak < arr.size + 8 * 4096 * 8 < arr.size * 8, (mode, peak)
    assert whole[2].max() == 255 and whole[0].min() == 0


def test_16_bit_images_are_stored_as_8_bit_scaled_not_clipped(tmp_path):
    from itself.data.transforms import decode  # the training reader, as it is today

    root = tmp_path / "raw"
    make_jsonl(root)
    good = read_records(root, "jsonl")
    _png16(root / "deep" / "mid.png", np.full((60, 20), 128 * 257))  # mid-grey in 16 bits
    _png16(root / "deep" / "ramp.png", np.linspace(0, 65535, 60 * 20).reshape(60, 20))
    Image.new("RGB", (20, 60), (10, 200, 30)).save(root / "deep" / "t.tif")
    extra = [{"image": f"deep/{n}", "captions": ["grey"], "pid": f"g{i}", "split": "test"}
             for i, n in enumerate(("mid.png", "ramp.png", "t.tif"))]
    write_records(root, "jsonl", good + extra)
    for resize, out in ((None, tmp_path / "out"), ("60x20", tmp_path / "resized")):
        run, info, _, rows = converted(root, "jsonl", out, *(["--resize", resize] if resize else []))
        by_source = {r["source"]: r for r in rows}
        ext, data = stored_image(out, by_source["deep/mid.png"])
        pixels = decode(data).numpy()
        assert ext in schema.IMAGE_EXTS and pixels.shape == (3, 60, 20)
        assert abs(float(pixels.mean()) - 128) <= (0 if resize is None else 2)  # not ~255 (clipped)
        ramp = decode(stored_image(out, by_source["deep/ramp.png"])[1]).numpy()
        assert ramp.min() <= 2 and ramp.max() >= 253 and 120 < ramp.mean() < 135
        tif_ext, tif = stored_image(out, by_source["deep/t.tif"])
        assert tif_ext == ("jpg" if resize else "png")  # a format readers take
        assert np.abs(decode(tif).numpy().reshape(3, -1).mean(1) - (10, 200, 30)).max() <= 3
        if resize is None:
            assert info["converted_images"] == {"PNG I;16 -> PNG RGB": 2, "TIFF RGB -> PNG RGB": 1}
            assert "converted: PNG I;16 -> PNG RGB: 2" in run.stdout


def test_the_writer_converts_16_bit_images_it_is_given(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 8), 64 * 257, np.uint16)).save(buf, format="PNG")
    with DatasetWriter(tmp_path / "d", "t") as w:
        assert w.add(Record("test", 1, 0, ["grey"], "g.png", buf.getvalue(), image_ext="png"))
        info = w.close()
    row = pq.read_table(tmp_path / "d" / schema.MANIFEST_FILE).to_pylist()[0]
    ext, data = stored_image(tmp_path / "d", row)
    assert ext == "png" and (row["width"], row["height"]) == (8, 24)
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).max() == 64
    assert info["converted_images"] == {"PNG I;16 -> PNG RGB": 1}


def test_files_that_are_not_regular_images_are_never_read(tmp_path):
    root = tmp_path / "raw"
    make_rstpreid(root)
    good = read_records(root, "rstpreid")
    imgs = root / "imgs"
    os.mkfifo(imgs / "fifo.jpg")  # reading it would block forever
    (imgs / "folder.jpg").mkdir()
    with open(imgs / "sparse.jpg", "wb") as f:
        f.truncate(65 << 20)  # 65 MiB on paper, nothing on disk
    Image.new("1", (10_000, 10_000)).save(imgs / "bomb.png")  # 100 Mpx in a few KiB
    os.symlink("/dev/zero", imgs / "zero.jpg")
    names = ["fifo.jpg", "folder.jpg", "sparse.jpg", "bomb.png", "zero.jpg"]
    write_records(root, "rstpreid", good + [{"id": 900 + i, "img_path": n, "captions": ["x"], "split": "test"}
                                            for i, n in enumerate(names)])
    _, info, rejects, _ = converted(root, "rstpreid", tmp_path / "out")
    got = {r["source"]: (r["reason"], r["detail"]) for r in rejects}
    assert got["fifo.jpg"] == ("not a regular file", f"{imgs / 'fifo.jpg'} is a FIFO")
    assert got["folder.jpg"] == ("not a regular file", f"{imgs / 'folder.jpg'} is a folder")
    assert got["sparse.jpg"][0] == "image file too large" and "68157440 bytes" in got["sparse.jpg"][1]
    assert got["bomb.png"][0] == "image file too large" and "DecompressionBomb" in got["bomb.png"][1]
    assert got["zero.jpg"] == ("path escapes the root", "path escapes the root through a link: zero.jpg")
    assert len(rejects) == 5 and info["written"] == len(good)


@pytest.mark.parametrize("content, fragment", [
    (json.dumps({"annotations": []}), "expected a JSON list of records (one object per image), got object with keys ['annotations']"),
    ('"text"', "got string"),
    ("42", "got integer"),
    ("null", "got null"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("[" + "9" * 5000 + "]", "4300 digits"),
    ("[{\"id\": 1,", "Expecting"),
    ("", "Expecting value"),
    ("[]", "no records to write: the input is empty"),
], ids=["object", "string", "number", "null", "deep", "huge-int", "cut", "empty-file", "empty-list"])
def test_annotation_files_that_are_not_lists_of_records_are_an_error(tmp_path, content, fragment):
    root = tmp_path / "raw"
    make_rstpreid(root)
    (root / "data_captions.json").write_text(content)
    run = build("--dataset", "rstpreid", "--root", str(root), "--out", str(tmp_path / "out"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and fragment in error and len(run.stderr) < 1000, run.stderr
    assert not (tmp_path / "out").exists()


def test_annotation_encodings(tmp_path):
    root = tmp_path / "raw"
    make_rstpreid(root)
    ann = root / "data_captions.json"
    ann.write_bytes(b"\xef\xbb\xbf" + ann.read_bytes())  # a UTF-8 byte-order mark is fine
    assert build("--dataset", "rstpreid", "--root", str(root), "--out", str(tmp_path / "out")).returncode == 0
    ann.write_bytes(b'[{"id": 1, "img_path": "\xff\xfe.jpg"}]')  # not UTF-8
    run = build("--dataset", "rstpreid", "--root", str(root), "--out", str(tmp_path / "out2"))
    assert run.returncode == 2 and run.stderr.startswith(f"error: {ann}: cannot read the annotations: 'utf-8' codec")
    assert "Traceback" not in run.stderr

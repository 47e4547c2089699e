"""Raw benchmark layouts (CUHK-PEDES, ICFG-PEDES, RSTPReid, JSONL) to shards: counts, splits,
identities, captions, planted faults with their reasons, and path escapes never read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from itself.config import DataConfig
from itself.data.pipeline import eval_loaders, train_loader
from runs import REPO
from shards import schema
from shards.converters import convert



def _image(path: Path, colour=(120, 30, 200), size=(20, 60), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def _people(n_ids: int, per_id: int, first_id: int = 1):
    """(id, image index, two captions) for n_ids identities with per_id images each."""
    for pid in range(first_id, first_id + n_ids):
        for k in range(per_id):
            yield pid, k, [f"person {pid} view {k} wears a red coat", f"a photo of person {pid}, number {k}"]


def make_cuhk(root: Path, *, with_split: bool = True) -> dict:
    """reid_raw.json (or caption_all.json without splits) + imgs/ as CUHK-PEDES ships them."""
    records, counts = [], {"train": 0, "val": 0, "test": 0}
    ranges = {"train": 1, "val": 11004, "test": 12004}  # the standard id ranges
    folders = ["CUHK01", "cam_a", "Market", "test_query"]
    for split, first in ranges.items():
        for pid, k, caps in _people(4 if split == "train" else 2, 2, first):
            rel = f"{folders[(pid + k) % 4]}/{pid:05d}_{k}.png"
            _image(root / "imgs" / rel, fmt="PNG")
            rec = {"captions": caps, "file_path": rel, "processed_tokens": [c.split() for c in caps], "id": pid}
            if with_split:
                rec["split"] = split
            records.append(rec)
            counts[split] += 1
    (root / ("reid_raw.json" if with_split else "caption_all.json")).write_text(json.dumps(records))
    return counts


def make_icfg(root: Path) -> None:
    records = []
    for split, n in (("train", 20), ("test", 3)):
        for pid, k, caps in _people(n, 2, 1 if split == "train" else 1000):
            rel = f"{split}/{pid:04d}/{pid:04d}_{k}.jpg"
            _image(root / "imgs" / rel)
            records.append({"split": split, "captions": caps[:1], "file_path": rel, "processed_tokens": [], "id": pid})
    (root / "ICFG_PEDES.json").write_text(json.dumps(records))  # the variant name


def make_rstpreid(root: Path) -> None:
    records = []
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for pid, k, caps in _people(n, 5, {"train": 0, "val": 100, "test": 200}[split]):
            rel = f"{pid:04d}_c{k}_{k}.jpg"
            _image(root / "imgs" / rel)
            records.append({"id": pid, "img_path": rel, "captions": caps, "split": split})
    (root / "data_captions.json").write_text(json.dumps(records))


def make_jsonl(root: Path) -> None:
    lines = []
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for pid, k, caps in _people(n, 2, {"train": 1, "val": 50, "test": 90}[split]):
            rel = f"photos/{split}/{pid}_{k}.jpg"
            _image(root / rel)
            lines.append({"image": rel, "captions": caps if k else caps[0], "pid": f"p{pid}", "split": split})
    (root / "annotations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _manifest(out: Path) -> list[dict]:
    return pq.read_table(out / schema.MANIFEST_FILE).to_pylist()


def _split_counts(rows, split):
    rows = [r for r in rows if r["split"] == split]
    return len(rows), sum(len(r["captions"]) for r in rows), len({r["pid"] for r in rows})


def _pipeline_reads(out: Path, micro_batch: int = 4) -> None:
    cfg = DataConfig(root=str(out), image_size=(32, 16), num_workers=0)
    loader = train_loader(cfg, rank=0, world_size=1, micro_batch=micro_batch)
    loader.set_epoch(0)
    batches = list(loader)
    assert batches and batches[0]["images"].shape == (micro_batch, 3, 32, 16)
    gallery, queries = eval_loaders(cfg, "test")
    assert sum(len(b[1]) for b in gallery) > 0 and sum(len(b[1]) for b in queries) > 0


def test_cuhk_pedes(tmp_path):
    counts = make_cuhk(tmp_path / "raw")
    info = convert("cuhk-pedes", tmp_path / "raw", tmp_path / "out", workers=2, progress=False)
    rows = _manifest(tmp_path / "out")
    assert info["read"] == info["written"] == 16 and info["rejected"] == 0
    assert _split_counts(rows, "train") == (8, 16, 4)
    assert _split_counts(rows, "val") == (4, 8, 2) and _split_counts(rows, "test") == (4, 8, 2)
    assert counts == {"train": 8, "val": 4, "test": 4}
    train = [r for r in rows if r["split"] == "train"]
    assert sorted({r["pid"] for r in train}) == [0, 1, 2, 3]  # relabelled from 1-based ids
    assert sorted({r["orig_pid"] for r in train}) == ["1", "2", "3", "4"]
    assert {r["source"].split("/")[0] for r in rows} == {"CUHK01", "cam_a", "Market", "test_query"}
    _pipeline_reads(tmp_path / "out")


def test_cuhk_pedes_caption_all_variant_gets_the_standard_split_by_id(tmp_path):
    make_cuhk(tmp_path / "raw", with_split=False)
    convert("cuhk-pedes", tmp_path / "raw", tmp_path / "out", workers=1, progress=False)
    rows = _manifest(tmp_path / "out")
    assert {s: _split_counts(rows, s)[0] for s in schema.SPLITS} == {"train": 8, "val": 4, "test": 4}


def test_icfg_pedes_holds_out_val_identities_from_train(tmp_path):
    make_icfg(tmp_path / "raw")
    info = convert("icfg-pedes", tmp_path / "raw", tmp_path / "out", val_fraction=0.1, seed=3, progress=False)
    rows = _manifest(tmp_path / "out")
    assert info["val_policy"] == {"kind": "held-out train identities", "fraction": 0.1, "identities": 2, "seed": 3}
    assert _split_counts(rows, "train") == (36, 36, 18) and _split_counts(rows, "val") == (4, 4, 2)
    assert _split_counts(rows, "test") == (6, 6, 3)
    val_ids = {r["orig_pid"] for r in rows if r["split"] == "val"}
    assert not val_ids & {r["orig_pid"] for r in rows if r["split"] == "train"}
    saved = json.loads((tmp_path / "out" / schema.DATASET_FILE).read_text())
    assert saved["val_policy"]["identities"] == 2
    _pipeline_reads(tmp_path / "out")


def test_rstpreid(tmp_path):
    make_rstpreid(tmp_path / "raw")
    info = convert("rstpreid", tmp_path / "raw", tmp_path / "out", progress=False)
    rows = _manifest(tmp_path / "out")
    assert info["written"] == 40
    assert _split_counts(rows, "train") == (20, 40, 4) and _split_counts(rows, "test") == (10, 20, 2)
    _pipeline_reads(tmp_path / "out")


def test_jsonl_with_string_or_list_captions(tmp_path):
    make_jsonl(tmp_path / "raw")
    info = convert("jsonl", tmp_path / "raw", tmp_path / "out", progress=False)
    rows = _manifest(tmp_path / "out")
    assert info["written"] == 16
    assert _split_counts(rows, "train") == (8, 12, 4)  # one string caption + one list of two per identity
    _pipeline_reads(tmp_path / "out")


def test_resize_stores_pre_resized_images(tmp_path):
    make_rstpreid(tmp_path / "raw")
    info = convert("rstpreid", tmp_path / "raw", tmp_path / "out", resize=(64, 24), progress=False)
    assert info["resized"] == [64, 24]
    assert {(r["width"], r["height"]) for r in _manifest(tmp_path / "out")} == {(24, 64)}


def _plant_faults(root: Path) -> dict:
    """Add one record of each fault kind to an RSTPReid layout; returns expected reasons by source."""
    records = json.loads((root / "data_captions.json").read_text())
    good = records[0]
    jpeg = (root / "imgs" / good["img_path"]).read_bytes()
    (root / "imgs" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "imgs" / "garbage.jpg").write_bytes(b"not an image at all")
    _image(root / "imgs" / "ok_a.jpg")
    _image(root / "imgs" / "ok_b.jpg")
    _image(root / "imgs" / "ok_c.jpg")
    outside = root.parent / "outside.jpg"
    os.mkfifo(outside)  # reading it would block: the converter must never open it
    records += [
        {"id": 1, "img_path": "missing.jpg", "captions": ["x"], "split": "train"},
        {"id": 1, "img_path": "truncated.jpg", "captions": ["x"], "split": "train"},
        {"id": 1, "img_path": "garbage.jpg", "captions": ["x"], "split": "train"},
        {"id": 1, "img_path": "ok_a.jpg", "captions": [""], "split": "train"},
        {"id": 1, "img_path": "ok_b.jpg", "captions": [42], "split": "train"},
        {"id": 1, "img_path": good["img_path"], "captions": ["dup"], "split": good["split"]},
        {"id": 1, "img_path": "ok_c.jpg", "captions": ["x"], "split": "dev"},
        {"img_path": "ok_c.jpg", "captions": ["x"], "split": "train"},
        {"id": 1, "img_path": "../outside.jpg", "captions": ["x"], "split": "train"},
        {"id": 1, "img_path": str(outside), "captions": ["x"], "split": "train"},
        "not even an object",
    ]
    (root / "data_captions.json").write_text(json.dumps(records))
    return {"missing.jpg": "missing image file", "truncated.jpg": "unreadable or truncated image",
            "garbage.jpg": "unreadable or truncated image", "ok_a.jpg": "empty or non-string caption",
            "ok_b.jpg": "empty or non-string caption", good["img_path"]: "duplicate image entry",
            "ok_c.jpg": "unknown split|record without id", "../outside.jpg": "path escapes the root",
            str(outside): "path escapes the root"}


def test_planted_faults_are_rejected_with_their_reasons(tmp_path):
    make_rstpreid(tmp_path / "raw")
    expected = _plant_faults(tmp_path / "raw")
    run = subprocess.run([sys.executable, "-m", "shards", "build", "--dataset", "rstpreid", "--root",
                          str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--no-progress"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "read 51 = written 40 + rejected 11" in run.stdout and "images/s" in run.stdout
    rejects = [json.loads(line) for line in (tmp_path / "out" / schema.REJECTS_FILE).read_text().splitlines()]
    assert len(rejects) == 11
    by_source = {}
    for r in rejects:
        by_source.setdefault(r["source"], []).append(r["reason"])
    for source, reasons in expected.items():
        wanted = reasons.split("|")
        assert sorted(by_source[source]) == sorted(wanted) if len(wanted) > 1 else by_source[source] == wanted, source
    assert any(r["reason"] == "malformed record" for r in rejects)
    info = json.loads((tmp_path / "out" / schema.DATASET_FILE).read_text())
    assert info["read"] == info["written"] + info["rejected"] == 51


def test_strict_fails_and_writes_no_dataset_json(tmp_path):
    make_rstpreid(tmp_path / "raw")
    records = json.loads((tmp_path / "raw" / "data_captions.json").read_text())
    records.append({"id": 1, "img_path": "missing.jpg", "captions": ["x"], "split": "train"})
    (tmp_path / "raw" / "data_captions.json").write_text(json.dumps(records))
    run = subprocess.run([sys.executable, "-m", "shards", "build", "--dataset", "rstpreid", "--root",
                          str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--strict", "--no-progress"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 2  # the data refused: nothing written
    assert run.stderr.startswith("error: --strict: 1 of 41 records rejected (missing image file: 1)")
    assert "rejected: missing image file: 1" in run.stdout and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()  # nothing created, not even a folder
    kept = tmp_path / ("out" + ".rejects.jsonl")  # the refused build's rejects, beside --out
    assert str(kept) in run.stderr
    assert [json.loads(line)["source"] for line in kept.read_text().splitlines()] == ["missing.jpg"]


def test_missing_annotations_name_the_expected_files(tmp_path):
    (tmp_path / "raw").mkdir()
    run = subprocess.run([sys.executable, "-m", "shards", "build", "--dataset", "icfg-pedes", "--root",
                          str(tmp_path / "raw"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 2 and "ICFG-PEDES.json, ICFG_PEDES.json" in run.stderr


def test_an_images_folder_linked_out_of_the_root_by_someone_else_is_refused(tmp_path):
    # A raw folder handed over with imgs/ linking to another user's photos: a build run as root
    # would pack them into a dataset its giver can read. One's own link (images on another disk) is fine.
    import shutil

    make_cuhk(tmp_path / "raw")
    shutil.move(tmp_path / "raw" / "imgs", tmp_path / "private")
    (tmp_path / "raw" / "imgs").symlink_to(tmp_path / "private")
    info = convert("cuhk-pedes", tmp_path / "raw", tmp_path / "mine", workers=1, progress=False)
    assert info["written"] == 16
    if os.geteuid() != 0:
        pytest.skip("giving the link to another user needs root (one's own link: checked above)")
    os.lchown(tmp_path / "raw" / "imgs", 65534, 65534)
    try:
        convert("cuhk-pedes", tmp_path / "raw", tmp_path / "theirs", workers=1, progress=False)
    except Exception as e:  # noqa: BLE001 - the type is checked below
        from shards.errors import ConvertError

        assert isinstance(e, ConvertError) and "leads out of --root" in str(e) and "made by uid 65534, not by you" in str(e)
    else:
        raise AssertionError("the build followed another user's link out of --root")
    assert not (tmp_path / "theirs" / "dataset.json").exists()


def test_an_annotation_file_linked_out_of_the_root_by_someone_else_is_refused(tmp_path):
    # reid_raw.json (or a corpus's annotations) as another user's link to a file root can read: its
    # records would be built into a dataset the giver reads. One's own link, or --annotations, is read.
    from corpus_plant import plant_luperson_t
    from shards.corpus_build import CorpusOptions, convert_corpus
    from shards.errors import ConvertError

    make_cuhk(tmp_path / "raw")
    (tmp_path / "raw" / "reid_raw.json").rename(tmp_path / "private.json")
    (tmp_path / "raw" / "reid_raw.json").symlink_to(tmp_path / "private.json")
    assert convert("cuhk-pedes", tmp_path / "raw", tmp_path / "mine", workers=1, progress=False)["written"] == 16
    plant_luperson_t(tmp_path / "corpus", n=4, faults=False)
    (tmp_path / "corpus" / "luperson_t.json").rename(tmp_path / "private_t.json")
    (tmp_path / "corpus" / "luperson_t.json").symlink_to(tmp_path / "private_t.json")
    if os.geteuid() != 0:
        pytest.skip("giving the link to another user needs root (one's own link: checked above)")
    os.lchown(tmp_path / "raw" / "reid_raw.json", 65534, 65534)
    os.lchown(tmp_path / "corpus" / "luperson_t.json", 65534, 65534)
    message = "leads out of --root .* a link made by uid 65534, not by you: refused"
    with pytest.raises(ConvertError, match=f"the annotation file {tmp_path / 'raw' / 'reid_raw.json'} {message}"):
        convert("cuhk-pedes", tmp_path / "raw", tmp_path / "theirs", workers=1, progress=False)
    with pytest.raises(ConvertError, match=message):
        convert_corpus("luperson-t", tmp_path / "corpus", tmp_path / "theirs2", CorpusOptions(val_fraction=0), workers=1,
                       progress=False)
    assert convert("cuhk-pedes", tmp_path / "raw", tmp_path / "named", annotations=str(tmp_path / "private.json"),
                   workers=1, progress=False)["written"] == 16  # (named by the user: theirs to read)
    assert not (tmp_path / "theirs").exists() and not (tmp_path / "theirs2").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plant", ["fifo", "/dev/zero", "sparse 2 GiB", "a line of 65 MiB"])
def test_annotation_files_that_are_fifos_devices_or_huge_are_refused_unread(tmp_path, plant):
    # Read whole (a benchmark's) or streamed (a corpus's): a FIFO would block forever, /dev/zero never
    # end, a sparse file of 2 GiB take its size in memory, a line without end be read whole.
    from corpus_plant import plant_luperson_t
    from shards.corpus_build import CorpusOptions, convert_corpus
    from shards.errors import ConvertError

    make_cuhk(tmp_path / "raw")
    plant_luperson_t(tmp_path / "corpus", n=4, faults=False)
    files = [tmp_path / "raw" / "reid_raw.json", tmp_path / "corpus" / "luperson_t.json"]
    if plant == "a line of 65 MiB":
        files = [tmp_path / "corpus" / "pairs.jsonl"]
        (tmp_path / "corpus" / "luperson_t.json").unlink()
    for path in files:
        path.unlink(missing_ok=True)
        if plant == "fifo":
            os.mkfifo(path)
        elif plant == "/dev/zero":
            path.symlink_to("/dev/zero")
        else:
            with open(path, "wb") as f:
                f.truncate(2 << 30 if plant.startswith("sparse") else 65 << 20)
    expected = {"fifo": "is a FIFO, not a regular file: refused unread", "/dev/zero": "is a device, not a regular file",
                "sparse 2 GiB": "is 2147483648 bytes, more than the 1073741824 read",
                "a line of 65 MiB": "line 1 is longer than the largest record accepted"}[plant]
    if plant != "a line of 65 MiB":
        with pytest.raises(ConvertError, match=expected):
            convert("cuhk-pedes", tmp_path / "raw", tmp_path / "out", workers=1, progress=False)
    if plant != "sparse 2 GiB":  # (a corpus is streamed: its size alone is no problem)
        corpus = "pairs" if plant == "a line of 65 MiB" else "luperson-t"
        with pytest.raises(ConvertError, match=expected):
            convert_corpus(corpus, tmp_path / "corpus", tmp_path / "out2", CorpusOptions(val_fraction=0), workers=1,
                           progress=False)


def test_an_image_swapped_for_a_link_after_the_annotations_were_checked_is_not_read(tmp_path):
    # The folder's owner can replace a checked image by a link out of the root while the build runs:
    # the file opened is checked, not only the path screened before.
    from shards.converters import read_image_file

    root, outside = tmp_path / "raw", tmp_path / "secret.png"
    _image(root / "imgs" / "a.png", fmt="PNG")
    _image(outside, fmt="PNG")
    inside = os.path.realpath(root)
    data, problem = read_image_file(str(root / "imgs" / "a.png"), inside)
    assert data is not None and problem is None
    (root / "imgs" / "a.png").unlink()
    (root / "imgs" / "a.png").symlink_to(outside)
    data, problem = read_image_file(str(root / "imgs" / "a.png"), inside)
    assert data is None and problem[0] == "path escapes the root" and f"led to {outside} when opened" in problem[1]


def test_a_corpus_tree_nested_thousands_deep_is_an_error_line(tmp_path):
    from shards.corpora import annotation_files
    from shards.errors import ConvertError

    deep = root = tmp_path / "raw"
    deep.mkdir()
    for _ in range(1500):  # (os.makedirs recurses too)
        deep = deep / "a"
        deep.mkdir()
    try:
        with pytest.raises(ConvertError, match="nested too deeply to search; pass the annotation files with --annotations"):
            annotation_files("mals", root)
    finally:
        while deep != root:  # (removed from the bottom: shutil.rmtree recurses too, at pytest's clean-up)
            deep.rmdir()
            deep = deep.parent


def test_names_from_the_folder_reach_the_terminal_escaped(tmp_path, capsys):
    # A file name holding a newline and a terminal escape, quoted by an error: one error line, the
    # escape shown, not run (it would clear the screen; the newline would print a line of its own).
    from corpus_plant import plant_luperson_t
    from shards.cli import main

    plant_luperson_t(tmp_path / "raw", n=2, faults=False)
    (tmp_path / "raw" / "x\nerror: all is well\x1b[2J\u202e.json").write_text("[]")
    assert main(["build", "--dataset", "luperson-t", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: luperson-t: 2 JSON files in ")
    assert "x\\x0aerror: all is well\\x1b[2J\\u202e.json" in err[0] and "\x1b" not in err[0]


def test_ones_own_link_to_nothing_is_a_missing_image_folder_not_a_crash(tmp_path):
    # (an images folder on a disk that is not mounted: every image is then a missing file)
    from shards.inputs import check_found

    make_cuhk(tmp_path / "raw")
    (tmp_path / "raw" / "imgs").rename(tmp_path / "elsewhere")
    (tmp_path / "raw" / "imgs").symlink_to(tmp_path / "unmounted" / "imgs")
    check_found(tmp_path / "raw", tmp_path / "raw" / "imgs", "the images folder")
    from shards.errors import RejectsError

    with pytest.raises(RejectsError, match="all 16 records rejected: missing image file"):
        convert("cuhk-pedes", tmp_path / "raw", tmp_path / "out", workers=1, progress=False)


def test_an_annotation_file_swapped_for_another_users_link_after_the_check_is_refused_as_opened(tmp_path):
    # The raw folder's owner replaces the checked annotation file by a link out of it before the build
    # opens it (corpora open their files one after another, minutes apart): the file opened is checked.
    from shards.errors import ConvertError
    from shards.inputs import check_found, open_input

    make_cuhk(tmp_path / "raw")
    path, private = tmp_path / "raw" / "reid_raw.json", tmp_path / "private.json"
    check_found(tmp_path / "raw", path, "the annotation file")
    private.write_text(path.read_text())
    path.unlink()
    path.symlink_to(private)  # (one's own link out of the folder: followed)
    open_input(path, "the annotation file", root=tmp_path / "raw").close()
    if os.geteuid() != 0:
        pytest.skip("giving the link to another user needs root")
    os.lchown(path, 65534, 65534)
    with pytest.raises(ConvertError, match="leads out of --root .* a link made by uid 65534, not by you"):
        open_input(path, "the annotation file", root=tmp_path / "raw")

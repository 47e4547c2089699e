"""`python -m shards build` speaks one error convention: a usage or configuration mistake, or
data the build refuses, is one `error: ...` line and exit 2 (never a traceback, never argparse's
usage dump), and nothing is written. A build that would write nothing, or that rejects most
records for one reason, is refused and names the likely cause. (Runtime failures, exit 1:
tests/faults/test_build_transactions.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runs import REPO
from shards import schema
from test_converters import make_cuhk, make_jsonl, make_rstpreid


def build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", "build", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def assert_error(run: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2 and exactly one line on stderr: `error: ...` holding every fragment."""
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "rstp"
    make_rstpreid(root)
    return root


USAGE = [  # (arguments, fragments of the one error line); {raw} and {tmp} are filled in
    (["--dataset", "foo", "--out", "{tmp}/o"], ["argument --dataset: invalid choice: 'foo'", "--help"]),
    (["--dataset", "synthetic"], ["the following arguments are required: --out"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--num-ids", "many"], ["argument --num-ids: invalid int value: 'many'"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--image-size", "3"], ["--image-size: expected HxW", "got '3'"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--image-size", "0x5"], ["--image-size: expected HxW"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--image-size", "8x8"], ["--image-size: must be an integer in 16..4096, got 8"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--num-ids", "2"], ["--num-ids: must be an integer in 3..", "got 2"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--images-per-id", "0"], ["--images-per-id: must be an integer in 1.."]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--captions-per-image", "0"], ["--captions-per-image: must be"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--twin-fraction", "2"], ["--twin-fraction: must be a share in [0, 1]"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--shard-samples", "0"], ["--shard-samples: must be at least 1, got 0"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--shard-bytes", "-5"], ["--shard-bytes: must be at least 1, got -5"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--root", "{raw}"], ["--root: only for the raw datasets"]),
    (["--dataset", "synthetic", "--out", "{tmp}/o", "--resize", "64x32", "--strict"], ["--resize, --strict: only for the raw"]),
    (["--dataset", "rstpreid", "--out", "{tmp}/o"], ["--root is required for --dataset rstpreid"]),
    (["--dataset", "rstpreid", "--root", "{tmp}/nowhere", "--out", "{tmp}/o"], ["--root {tmp}/nowhere: not a directory"]),
    (["--dataset", "rstpreid", "--root", "{raw}", "--out", "{tmp}/o", "--num-ids", "5"], ["--num-ids: only for --dataset synthetic"]),
    (["--dataset", "rstpreid", "--root", "{raw}", "--out", "{tmp}/o", "--resize", "384by128"], ["--resize: expected HxW", "got '384by128'"]),
    (["--dataset", "rstpreid", "--root", "{raw}", "--out", "{tmp}/o", "--workers", "0"], ["--workers: must be at least 1, got 0"]),
    (["--dataset", "icfg-pedes", "--root", "{raw}", "--out", "{tmp}/o", "--val-fraction", "1.5"], ["--val-fraction: must be a share in [0, 1), got 1.5"]),
    (["--dataset", "icfg-pedes", "--root", "{raw}", "--out", "{tmp}/o", "--val-fraction", "nan"], ["--val-fraction: must be a share in [0, 1), got nan"]),
    (["--dataset", "rstpreid", "--root", "{raw}", "--out", "{tmp}/o", "--annotations", "{tmp}/none.json"], ["--annotations {tmp}/none.json: file not found"]),
    (["--dataset", "rstpreid", "--root", "{raw}", "--out", "{tmp}/o", "--annotations", "{raw}"], ["--annotations {raw}: not a file"]),
    (["--dataset", "icfg-pedes", "--root", "{raw}", "--out", "{tmp}/o"], ["icfg-pedes: none of ICFG-PEDES.json, ICFG_PEDES.json found in {raw}"]),
    (["--dataset", "rstpreid", "--root", "{raw}", "--out", "{raw}/data_captions.json"], ["--out {raw}/data_captions.json exists and is not a folder"]),
    (["--dataset", "rstpreid", "--root", "{raw}", "--out", "{raw}/data_captions.json/o"], ["--out {raw}/data_captions.json/o: cannot create"]),
    (["--dataset", "rstpreid", "--root", "{raw}", "--out", "{raw}"], ["--out {raw} holds files a dataset build does not write (data_captions.json, imgs)"]),
]


@pytest.mark.parametrize("args, fragments", USAGE, ids=[" ".join(a[2:] if a[0] == "--dataset" else a)[:60] for a, _ in USAGE])
def test_usage_and_configuration_mistakes_are_one_error_line_and_exit_2(tmp_path, raw, args, fragments):
    fill = lambda text: text.replace("{raw}", str(raw)).replace("{tmp}", str(tmp_path))  # noqa: E731
    before = sorted(p.name for p in raw.parent.iterdir()) + sorted(str(p) for p in raw.rglob("*"))
    run = build(*[fill(a) for a in args], "--no-progress")
    assert_error(run, *[fill(f) for f in fragments])
    assert "usage:" not in run.stderr and "Traceback" not in run.stderr and run.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written, not even beside --out
    assert sorted(p.name for p in raw.parent.iterdir()) + sorted(str(p) for p in raw.rglob("*")) == before


def test_image_paths_relative_to_the_wrong_folder_fail_and_name_the_likely_cause(tmp_path):
    root = tmp_path / "raw"
    make_cuhk(root)
    ann = root / "reid_raw.json"
    records = json.loads(ann.read_text())
    ann.write_text(json.dumps([{**r, "file_path": "imgs/" + r["file_path"]} for r in records]))  # relative to the root
    out = tmp_path / "out"
    for extra in ([], ["--allow-rejects"]):  # a build that writes nothing is refused even then
        run = build("--dataset", "cuhk-pedes", "--root", str(root), "--out", str(out), "--no-progress", *extra)
        error = assert_error(run, "all 16 records rejected: missing image file (e.g. 'imgs/",
                             f"the image paths are read relative to {root}/imgs: were they given relative to {root}? "
                             f"(16 of 16 checked exist there",
                             f"no dataset written ({out} not created)", f"every reject is listed in {out}.rejects.jsonl")
        assert len(error) < 1000
        assert "read 16 = written 0 + rejected 16" in run.stdout
        assert not out.exists()
        assert len(Path(f"{out}.rejects.jsonl").read_text().splitlines()) == 16

    # Given relative to a sub-folder of the root instead of the root itself.
    jroot = tmp_path / "jraw"
    make_jsonl(jroot)
    lines = [json.loads(x) for x in (jroot / "annotations.jsonl").read_text().splitlines()]
    (jroot / "annotations.jsonl").write_text("".join(
        json.dumps({**x, "image": x["image"].removeprefix("photos/")}) + "\n" for x in lines))
    run = build("--dataset", "jsonl", "--root", str(jroot), "--out", str(tmp_path / "jout"), "--no-progress")
    assert_error(run, "all 16 records rejected: missing image file",
                 f"the image paths are read relative to {jroot}: were they given relative to {jroot}/photos?")

    # No image folder at all, and the files nowhere near.
    shutil.rmtree(root / "imgs")
    run = build("--dataset", "cuhk-pedes", "--root", str(root), "--out", str(out), "--no-progress")
    assert_error(run, f"the image folder {root}/imgs does not exist, and none of 16 checked is found relative to "
                      f"{root} or its folders either: is --root the folder the annotations describe?")


def test_most_records_rejected_for_one_reason_fail_unless_allowed(tmp_path):
    root = tmp_path / "raw"
    make_rstpreid(root)  # 40 records
    ann = root / "data_captions.json"
    good = json.loads(ann.read_text())
    missing = [{"id": 900 + i, "img_path": f"gone/{i}.jpg", "captions": ["x"], "split": "test"} for i in range(41)]
    ann.write_text(json.dumps(good + missing))
    out = tmp_path / "out"
    run = build("--dataset", "rstpreid", "--root", str(root), "--out", str(out), "--no-progress")
    assert_error(run, "41 of 81 records rejected for one reason, missing image file (e.g. 'gone/0.jpg': ",
                 "more than half of the input", "pass --allow-rejects to write the other 40 records anyway",
                 f"{out} not created")
    assert not out.exists()
    allowed = build("--dataset", "rstpreid", "--root", str(root), "--out", str(out), "--no-progress", "--allow-rejects")
    assert allowed.returncode == 0, allowed.stderr
    info = json.loads((out / schema.DATASET_FILE).read_text())
    assert (info["read"], info["written"], info["rejected"]) == (81, 40, 41)
    assert not Path(f"{out}.rejects.jsonl").exists()  # the refused build's rejects: gone once a build succeeds
    ann.write_text(json.dumps(good + missing[:40]))  # exactly half is not "most"
    again = build("--dataset", "rstpreid", "--root", str(root), "--out", str(out), "--no-progress", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert "read 80 = written 40 + rejected 40" in again.stdout


def test_help_documents_the_exit_codes():
    text = build("--help").stdout
    for fragment in ("exit status:", "0  the dataset was written", "1  error: the build failed while running",
                     "2  error: the build cannot be done as asked", "--allow-rejects", "more than 50%",
                     "<out>.rejects.jsonl"):
        assert fragment in text, fragment

"""Folders a build finds beside its `--out` at the names it uses (a corpus conversion's work folder
`.<out>.convert/`, a replaced dataset `.<out>.old-*`) are trusted only when they are the user's
own: someone else's, planted beside a shared `--out`, is refused or left alone, never merged, put in
place or deleted. (Root here: "someone else" is uid 65534.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from corpus_plant import plant_luperson_t
from shards.chunking import chunk_dir, work_folder
from shards.chunks import convert_chunks
from shards.corpus_build import CorpusOptions, convert_corpus, merge_corpus, plan_corpus
from shards.errors import BuildError

OPTIONS = CorpusOptions(val_fraction=0, chunk_size=4)


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret"
    path.write_text("SECRET\n")
    os.chmod(path, 0o600)
    return path


def _chown_tree(top: Path, uid: int) -> None:
    for folder, dirs, files in os.walk(top):
        for name in (".", *dirs, *files):
            os.chown(Path(folder, name), uid, uid, follow_symlinks=False)


def _root_needed():
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")


@pytest.mark.parametrize("how", ["another user's", "writable by anyone", "another user's link"])
def test_a_conversion_work_folder_someone_else_planted_is_never_resumed(tmp_path, secret, how):
    # The planter made the plan the user's command makes (same settings: it resumes), then a chunk
    # naming the secret as its train shard; as root, a resume merged it into a readable dataset.
    raw, out = tmp_path / "raw", tmp_path / "out"
    plant_luperson_t(raw, n=8, faults=False)
    work, _ = plan_corpus("luperson-t", raw, out, OPTIONS, progress=False)
    chunk = chunk_dir(work, 0)
    chunk.mkdir(parents=True, exist_ok=True)
    (chunk / "chunk.json").write_text(json.dumps({"splits": {"train": {"shards": [{"name": f"../../../{secret.name}"}]}}}))
    if how == "another user's link":
        _root_needed()
        mine = tmp_path / "mine"
        (mine / "chunks").mkdir(parents=True)
        (mine / "chunks" / "precious.txt").write_text("keep\n")
        work.rename(tmp_path / "planted")
        work.symlink_to(mine)
        os.chown(work, 65534, 65534, follow_symlinks=False)
        message = f"{work} belongs to uid 65534"
    elif how == "writable by anyone":
        os.chmod(chunk, 0o777)
        message = f"{chunk} is writable by anyone"
    else:
        _root_needed()
        _chown_tree(work, 65534)
        message = f"{work} belongs to uid 65534"
    with pytest.raises(BuildError, match=f"{message}.*: a conversion resumes from what its work folder holds"):
        convert_corpus("luperson-t", raw, out, OPTIONS, workers=1, progress=False)
    assert not out.exists() and not any("SECRET" in p.read_text(errors="replace") for p in tmp_path.rglob("*.tar"))
    if how == "another user's link":
        assert (tmp_path / "mine" / "chunks" / "precious.txt").read_text() == "keep\n"


def test_a_chunk_naming_a_file_outside_its_folder_is_refused_at_the_merge(tmp_path, secret):
    raw, out = tmp_path / "raw", tmp_path / "out"
    plant_luperson_t(raw, n=8, faults=False)
    work, plan = plan_corpus("luperson-t", raw, out, OPTIONS, progress=False)
    convert_chunks(work, list(range(len(plan["chunks"]))), 1, progress=False)
    info_path = chunk_dir(work, 0) / "chunk.json"
    info = json.loads(info_path.read_text())
    info["splits"]["train"]["shards"][0]["name"] = f"../../../{secret.name}"
    info_path.write_text(json.dumps(info))
    with pytest.raises(BuildError, match=r"000000: train shard '\.\./\.\./\.\./secret' is not a file a conversion writes"):
        merge_corpus(out)
    assert not out.exists() and work == work_folder(out) and work.is_dir()


def test_a_replaced_dataset_someone_else_planted_is_neither_put_in_place_nor_removed(tmp_path):
    # `.<out>.old-<pid>-<hex>` is what a build killed between the two renames of its commit leaves;
    # the next build puts it back at <out>. One planted by someone else stays where it is.
    from shards.cli import main

    _root_needed()
    out = tmp_path / "data"
    planted = tmp_path / ".data.old-1-deadbeef"
    planted.mkdir()
    (planted / "dataset.json").write_text("{}")
    os.chmod(planted, 0o777)
    os.chown(planted, 65534, 65534)
    assert main(["build", "--dataset", "synthetic", "--out", str(out), "--num-ids", "12", "--images-per-id", "2",
                 "--image-size", "48x16", "--no-progress"]) == 0
    assert json.loads((out / "dataset.json").read_text())["name"] == "synthetic"
    assert (planted / "dataset.json").read_text() == "{}"


def test_ones_own_link_is_followed_into_a_folder_that_must_be_yours_too(tmp_path):
    # A link at a work folder's name that is one's own (a bigger disk) is followed: the folder there
    # is checked as well. A tree thousands of folders deep (os.walk recurses) is refused, not a crash.
    from shards.ownership import first_foreign

    _root_needed()
    theirs, link = tmp_path / "theirs", tmp_path / ".out.convert"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    link.symlink_to(theirs)
    assert first_foreign(link) == (link, "belongs to uid 65534, not to you (uid 0)")
    deep = top = tmp_path / "deep"
    deep.mkdir()
    for _ in range(1500):
        deep = deep / "a"
        deep.mkdir()
    try:
        assert first_foreign(top) == (top, "holds folders nested too deeply to check")
    finally:
        while deep != top:  # (from the bottom: shutil.rmtree recurses too)
            deep.rmdir()
            deep = deep.parent
    assert first_foreign(tmp_path / "nothing") is None

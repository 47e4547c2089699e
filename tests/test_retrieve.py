"""Person search for users: index a gallery, query it, and the HTML report opened in Chromium."""

from __future__ import annotations

import json
import math
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from itself.config import from_dict, to_dict
from itself.model import ITSELF
from itself.model.export import export
from browser import DevTools
from itself.retrieve import Index
from itself.retrieve.store import IndexDir
from itself.retrieve.cli import main
from runs import run_main


def _cli(*args) -> subprocess.CompletedProcess:
    """`python -m itself.retrieve ARGS`, run by this process (tests/faults/test_exit_codes.py starts
    the real script)."""
    return run_main(main, args)


def _index(model: Path, data: Path, out: Path) -> Path:
    res = _cli("index", "--model", str(model), "--gallery", str(data), "--split", "test", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def index_dir(untrained_model, small_dataset, tmp_path_factory):
    """The small dataset's test split (16 images) indexed by a model with random weights: what the
    commands do does not depend on training."""
    return _index(untrained_model, small_dataset, tmp_path_factory.mktemp("index") / "test")


@pytest.fixture(scope="module")
def trained_index(trained_run, tmp_path_factory):
    """The default synthetic test split (160 images) indexed by the trained model."""
    run, data = trained_run
    return _index(run / "model.pt", data, tmp_path_factory.mktemp("index") / "trained")


def _test_captions(data: Path) -> list[tuple[str, int]]:
    rows = pq.read_table(data / "manifest.parquet").to_pylist()
    return [(c, r["pid"]) for r in rows if r["split"] == "test" for c in r["captions"]]


def test_index_holds_both_embeddings_and_metadata(index_dir):
    info = json.loads((index_dir / "index.json").read_text())
    assert info["images"] == 16 and info["global_dim"] == 64 and info["grab_dim"] == 32
    store = IndexDir(index_dir).embeddings()
    g, l = store.rows(np.arange(len(store)))
    assert g.shape == (16, 64) and l.shape == (16, 32)
    assert np.allclose(np.linalg.norm(g, axis=1), 1, atol=1e-5) and np.allclose(np.linalg.norm(l, axis=1), 1, atol=1e-5)
    items = store.items()
    assert len(items) == 16 and all(i["pid"] is not None and i["name"].startswith("synthetic/test/") for i in items)


def test_query_returns_sorted_scores_as_json(index_dir, small_dataset):
    (text, _), (text2, _) = _test_captions(small_dataset)[:2]
    res = _cli("query", "--index", str(index_dir), "--text", text, "--text", text2, "--top-k", "7", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert [o["query"] for o in out] == [text, text2]
    for o in out:
        scores = [r["score"] for r in o["results"]]
        assert len(scores) == 7 and scores == sorted(scores, reverse=True)
        assert [r["rank"] for r in o["results"]] == list(range(1, 8))
    plain = _cli("query", "--index", str(index_dir), "--text", text, "--top-k", "3")
    assert plain.returncode == 0 and len(re.findall(r"^\s+\d+\s+-?\d\.\d{4}\s", plain.stdout, re.M)) == 3


@pytest.mark.slow
def test_the_queried_identity_ranks_high_more_often_than_chance(trained_index, trained_run):
    _, data = trained_run
    captions = _test_captions(data)
    index = Index(str(trained_index))
    assert len(index.items) == 160
    results = index.search([c for c, _ in captions], top_k=10)
    hits = [any(r["pid"] == pid for r in hits) for (_, pid), hits in zip(captions, results)]
    gallery = [i["pid"] for i in index.items]
    chance = [1 - math.comb(len(gallery) - gallery.count(pid), 10) / math.comb(len(gallery), 10) for _, pid in captions]
    assert np.mean(hits) > 1.5 * np.mean(chance), (np.mean(hits), np.mean(chance))


def test_folder_gallery_and_errors(untrained_model, small_dataset, index_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    with tarfile.open(small_dataset / "test" / "test-000000.tar") as t:
        for m in t.getmembers()[:10]:
            if m.name.endswith(".jpg"):
                (folder / m.name).write_bytes(t.extractfile(m).read())
    res = _cli("index", "--model", str(untrained_model), "--gallery", str(folder), "--out", str(tmp_path / "fi"))
    assert res.returncode == 0 and "indexed 5 images" in res.stdout
    assert all(i["pid"] is None for i in IndexDir(tmp_path / "fi").embeddings().items())
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _cli("index", "--model", str(untrained_model), "--gallery", str(empty), "--out", str(tmp_path / "e"))
    assert res.returncode == 2 and "holds no readable image" in res.stderr
    # A model with another embedding size cannot query this index.
    blob = torch.load(untrained_model, weights_only=True)
    cfg = from_dict(blob["config"])
    cfg.model.grab_dim = 16
    other = ITSELF(cfg.model, blob["num_ids"], cfg.data.image_size)

    export(tmp_path / "other.pt", other.state_dict(), to_dict(cfg), blob["num_ids"], 0.5)
    res = _cli("query", "--index", str(index_dir), "--model", str(tmp_path / "other.pt"), "--text", "a man")
    assert res.returncode == 2 and "model/index mismatch" in res.stderr and "16 (GRAB)" in res.stderr and "64 / 32" in res.stderr


@pytest.mark.slow
def test_report_is_self_contained_and_renders_in_chromium(trained_index, trained_run, tmp_path):
    run, data = trained_run
    out = tmp_path / "report"
    res = _cli("report", "--index", str(trained_index), "--sample-queries", "3", "--top-k", "4", "--run", str(run),
               "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    page = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 3 * 4 + 2  # thumbnails with MARS overlays, loss and val curves
    for src in sources:
        assert not src.startswith(("/", "http", "file:")) and (out / src).is_file(), src
    assert page.count('class="hit"') + page.count('class="miss"') == 12  # identities known: outlined
    assert str(data) not in page and "loaded:" not in page  # (no server paths, no debugging counters)
    with DevTools(tmp_path) as browser:
        browser.navigate((out / "index.html").as_uri())
        assert browser.image_check() == f"images: {len(sources)} loaded: {len(sources)} broken: 0"
        shot = browser.screenshot()
    assert np.asarray(shot, dtype=np.float32).std() > 10  # (thumbnails drawn: not a blank page)

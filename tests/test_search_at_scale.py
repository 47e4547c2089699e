"""Person search at scale: indexing on several ranks, resuming a failed build, adding images, FAISS
against brute force, and the search page over real HTTP in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from browser import DevTools
from itself.dist import free_port
from itself.retrieve import Index
from itself.retrieve.store import IndexDir
from itself.retrieve.cli import main
from runs import REPO, run_main, train_env, wait_until

ALL = 10_000  # a top-k that covers every gallery here


def _retrieve(*args, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m itself.retrieve ARGS` under `launcher`; without one, run by this process."""
    quiet = ["--no-progress"] if args[0] in ("index", "add") else []
    if launcher is None:
        return run_main(main, [*args, *quiet])
    return subprocess.run(launcher + [*args, *quiet], cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=600)


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"{res.args}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def one_rank_index(untrained_model, small_dataset, tmp_path_factory) -> Path:
    """The train split (64 images in 8 shards: 8 parts) indexed by plain python, a world of one."""
    out = tmp_path_factory.mktemp("index") / "one"
    res = _ok(_retrieve("index", "--model", str(untrained_model), "--gallery", str(small_dataset), "--split", "train",
                        "--out", str(out)))
    assert "indexed 64 images (0 unreadable skipped)" in res.stdout
    return out


def _embeddings(index_dir: Path):
    store = IndexDir(index_dir).embeddings()
    glob, grab = store.rows(np.arange(len(store)))
    return glob, grab, store.items()


def _captions(data: Path, split: str) -> list[tuple[str, int]]:
    rows = pq.read_table(data / "manifest.parquet").to_pylist()
    return [(c, r["pid"]) for r in rows if r["split"] == split for c in r["captions"]]


def _same_ranking(hits: list[dict], scores: torch.Tensor, tol: float = 1e-5) -> None:
    """`hits` rank as `scores` (brute force) do: the same scores in order, and each hit's row has
    the score reported; rows may differ only between scores equal within `tol` (ties)."""
    expected = scores.sort(descending=True).values[: len(hits)]
    assert np.allclose([h["score"] for h in hits], expected.numpy(), atol=tol)
    for h in hits:
        assert abs(float(scores[h["row"]]) - h["score"]) <= tol
    assert len({h["row"] for h in hits}) == len(hits)


# ----------------------------------------------------------------------------------- ranks


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_ranks_index_the_same_as_one(launcher, one_rank_index, untrained_model, small_dataset, tmp_path):
    port = str(free_port())
    command = {"torchrun": ["--nproc_per_node", "2", "--master_port", port, "-m", "itself.retrieve"],
               "deepspeed": ["--num_gpus", "2", "--master_port", port, "itself/retrieve/__main__.py"]}[launcher]
    out = tmp_path / "two"
    res = _ok(_retrieve("index", "--model", str(untrained_model), "--gallery", str(small_dataset), "--split", "train",
                        "--out", str(out), "--device", "cpu", launcher=[shutil.which(launcher) or launcher, *command]))
    assert "indexed 64 images" in res.stdout
    # Each rank embedded a disjoint half of the 8 parts.
    assert "rank 0: embedded 32 images in 4 parts" in res.stderr and "rank 1: embedded 32 images in 4 parts" in res.stderr
    g1, l1, items1 = _embeddings(one_rank_index)
    g2, l2, items2 = _embeddings(out)
    assert items2 == items1 and len(items1) == 64
    # Same images in the same batches; only the CPU threads per rank differ (GEMM blocking).
    assert np.allclose(g2, g1, atol=1e-6) and np.allclose(l2, l1, atol=1e-6)
    texts = [c for c, _ in _captions(small_dataset, "train")[:8]]
    one, two = Index(str(one_rank_index)).search(texts, 10), Index(str(out)).search(texts, 10)
    assert [[h["row"] for h in q] for q in two] == [[h["row"] for h in q] for q in one]


# ----------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_a_failed_build_resumes_from_its_finished_parts(untrained_model, small_dataset, one_rank_index, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for tar in sorted((small_dataset / "train").glob("*.tar")):
        shutil.copy(tar, shards / tar.name)
    names = sorted(p.name for p in shards.iterdir())
    assert len(names) == 8
    # Shard 5 is cut in the middle of a member: reading it fails, as a damaged copy would.
    damaged = shards / names[5]
    intact = damaged.read_bytes()
    damaged.write_bytes(intact[: len(intact) // 2 + 100])
    pattern = str(shards / (names[0].rsplit("-", 1)[0] + "-{000000..000007}.tar"))
    out = tmp_path / "index"
    args = ("index", "--model", str(untrained_model), "--gallery", pattern, "--out", str(out))
    res = _retrieve(*args)
    assert res.returncode == 2 and "cannot read shard" in res.stderr and names[5] in res.stderr
    assert "the finished parts are kept" in res.stderr
    batch = IndexDir(out).batch(0)
    assert [batch.part(u).done() for u in range(8)] == [True] * 5 + [False] * 3
    assert not IndexDir(out).exists()  # nothing is committed before every part is there
    before = {u: os.stat(batch.part(u).global_file) for u in range(5)}

    damaged.write_bytes(intact)  # the shard repaired, the same command again
    res = _ok(_retrieve(*args))
    assert "resuming: 5 of 8 parts already embedded" in res.stdout and "indexed 64 images" in res.stdout
    for u, st in before.items():  # the finished parts were kept, not embedded again
        now = os.stat(batch.part(u).global_file)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    g, l, items = _embeddings(out)
    g1, l1, items1 = _embeddings(one_rank_index)
    assert np.array_equal(g, g1) and np.array_equal(l, l1)
    assert [i["name"] for i in items] == [i["name"] for i in items1]


@pytest.mark.slow
def test_a_killed_build_resumes(untrained_model, small_dataset, tmp_path):
    # A real kill (SIGKILL, no clean-up) while parts are being written: whatever it finished is
    # kept, a part it was writing is not taken as finished, and the rerun completes the index.
    folder = tmp_path / "photos"
    folder.mkdir()
    for tar in sorted((small_dataset / "train").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    (folder / m.name.replace("/", "_")).write_bytes(t.extractfile(m).read())
    out = tmp_path / "index"
    args = ["index", "--model", str(untrained_model), "--gallery", str(folder), "--out", str(out), "--part-size", "4",
            "--batch-size", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "itself.retrieve", *args, "--no-progress"], cwd=REPO, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    batch = IndexDir(out).batch(0)
    try:
        wait_until(lambda: batch.part(1).done() or proc.poll() is not None, 300, "the second part")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    units = batch.read_plan()["units"]
    done = [u for u in range(units) if batch.part(u).done()]
    assert units == 16 and len(done) >= 2
    res = _ok(_retrieve(*args))
    if len(done) < units:  # (killed in time, as is usual: a part takes a fraction of a second)
        assert f"resuming: {len(done)} of 16 parts already embedded" in res.stdout and "indexed 64 images" in res.stdout
    assert len(Index(str(out))) == 64


# ----------------------------------------------------------------------------------- add


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_added_images_are_found(kind, untrained_model, small_dataset, tmp_path):
    out = tmp_path / "index"
    _ok(_retrieve("index", "--model", str(untrained_model), "--gallery", str(small_dataset), "--split", "val",
                  "--out", str(out), "--index-type", kind))
    vectors_before = json.loads((out / "index.json").read_text())["vectors"]
    res = _ok(_retrieve("add", "--index", str(out), "--gallery", str(small_dataset), "--split", "test"))
    assert "added 16 images (0 unreadable skipped)" in res.stdout and "32 images now" in res.stdout
    info = json.loads((out / "index.json").read_text())
    assert info["images"] == 32 and [b["split"] for b in info["batches"]] == ["val", "test"]
    assert info["index"]["kind"] == kind
    assert not (out / vectors_before).exists() and (out / info["vectors"]).exists()  # the old generation dropped

    index = Index(str(out))
    added = [r for r in range(32) if index.item(r)["name"].startswith("synthetic/test/")]
    assert added == list(range(16, 32))
    # Each added image, searched with its own embeddings, is found first (score 1: itself).
    glob, grab = index.store.rows(np.array(added))
    found = index.vectors.search(glob, grab, 1)
    assert [hits[0][0] for hits in found] == added
    assert np.allclose([hits[0][1] for hits in found], 1.0, atol=1e-5)
    # Text queries rank the grown gallery as brute force does.
    texts = [c for c, _ in _captions(small_dataset, "test")[:6]]
    for hits, scores in zip(index.search(texts, 8, candidates=32), index.scores(texts)):
        _same_ranking(hits, scores)
    # The same images twice would be duplicates: refused.
    res = _retrieve("add", "--index", str(out), "--gallery", str(small_dataset), "--split", "test")
    assert res.returncode == 2 and "already in the index (batch 1)" in res.stderr


@pytest.mark.slow
def test_index_folder_errors(untrained_model, small_dataset, one_rank_index, tmp_path):
    res = _retrieve("add", "--index", str(tmp_path / "none"), "--gallery", str(small_dataset))
    assert res.returncode == 2 and "is not an index" in res.stderr
    res = _retrieve("index", "--model", str(untrained_model), "--gallery", str(small_dataset), "--split", "val",
                    "--out", str(one_rank_index))
    assert res.returncode == 2 and "already holds an index of another gallery" in res.stderr and "use `add`" in res.stderr
    res = _retrieve("index", "--model", str(untrained_model), "--gallery", str(small_dataset), "--split", "nope",
                    "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "has the splits train, val, test" in res.stderr
    # Same gallery and model again: nothing to embed, nothing to change.
    res = _ok(_retrieve("index", "--model", str(untrained_model), "--gallery", str(small_dataset), "--split", "train",
                        "--out", str(one_rank_index)))
    assert "already indexes" in res.stdout


# ----------------------------------------------------------------------------------- FAISS


def test_the_flat_index_ranks_as_brute_force(one_rank_index, small_dataset):
    index = Index(str(one_rank_index))
    assert index.info["index"]["kind"] == "flat"
    texts = [c for c, _ in _captions(small_dataset, "train")]
    assert len(texts) == 128
    scores = index.scores(texts)
    for hits, row_scores in zip(index.search(texts, ALL), scores):
        assert len(hits) == 64  # the whole gallery, in brute-force order
        _same_ranking(hits, row_scores)


def test_hnsw_rebuilt_from_stored_embeddings_and_rescored_exactly(one_rank_index, untrained_model, small_dataset, tmp_path):
    # Another index type over the same folder: rebuilt from the stored embeddings, nothing embedded.
    out = tmp_path / "copy"
    shutil.copytree(one_rank_index, out)
    res = _ok(_retrieve("index", "--model", str(untrained_model), "--gallery", str(small_dataset), "--split", "train",
                        "--out", str(out), "--index-type", "hnsw", "--pca-dim", "16"))
    assert "(hnsw index)" in res.stdout and "resuming" not in res.stdout
    index = Index(str(out))
    assert index.vectors.approximate and index.vectors.index.chain.at(0).d_out == 16  # PCA to 16 dims
    texts = [c for c, _ in _captions(small_dataset, "train")[:20]]
    # With every image a candidate, the exact re-scoring makes the approximate index exact.
    for hits, row_scores in zip(index.search(texts, 10, candidates=64), index.scores(texts)):
        _same_ranking(hits, row_scores)


# ----------------------------------------------------------------------------------- page


class Server:
    """`python -m itself.retrieve serve` as a real process on a free port."""

    def __init__(self, index_dir: Path, workdir: Path, *extra: str):
        self.out = workdir / "serve.out"
        self.err = workdir / "serve.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "itself.retrieve", "serve", "--index", str(index_dir),
                                          "--port", "0", *extra], cwd=REPO, env=train_env(), stdout=out, stderr=err)
        try:
            wait_until(lambda: "serving" in self.out.read_text() or self.proc.poll() is not None, 120, "the server")
            found = re.search(r"at (http://127\.0\.0\.1:\d+/)", self.out.read_text())
            assert found, self.out.read_text() + self.err.read_text()
            self.url = found.group(1)
        except BaseException:
            self.close()
            raise

    def get(self, path: str, **headers: str) -> tuple[int, dict, bytes]:
        try:
            request = urllib.request.Request(self.url + path.lstrip("/"), headers=headers)
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def evil_index(untrained_model, small_dataset, tmp_path_factory) -> Path:
    """A folder gallery whose file names are HTML."""
    import tarfile

    folder = tmp_path_factory.mktemp("evil") / "photos"
    folder.mkdir()
    with tarfile.open(next((small_dataset / "test").glob("*.tar"))) as t:
        jpgs = [m for m in t.getmembers() if m.name.endswith(".jpg")]
        for i, m in enumerate(jpgs):
            (folder / (f"{EVIL}{i}.jpg" if i % 2 else f"{i}.jpg")).write_bytes(t.extractfile(m).read())
    out = folder.parent / "index"
    _ok(_retrieve("index", "--model", str(untrained_model), "--gallery", str(folder), "--out", str(out)))
    return out


@pytest.mark.slow
def test_search_page_over_http(evil_index, tmp_path):
    index = Index(str(evil_index))
    with Server(evil_index, tmp_path) as server:
        assert server.url.startswith("http://127.0.0.1:")  # bound to this machine unless told otherwise
        status, headers, body = server.get("/")
        assert status == 200 and 'name="q"' in body.decode() and 'maxlength="300"' in body.decode()
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        # A query that is HTML, answered: everything user- or gallery-controlled comes back escaped.
        query = f"{EVIL} a person"
        status, _, body = server.get("/?" + urllib.parse.urlencode({"q": query, "k": 8}))
        page = body.decode()
        assert status == 200 and page.count("<figure") == 8
        # (the query in the text box and the summary, and the 4 HTML names of the 8 images)
        assert "<img src=x" not in page and page.count("&lt;img src=x onerror=alert(1)&gt;") == 2 + 4
        # The JSON API gives the rows and exact scores the Python API gives.
        status, _, body = server.get("/api/search?" + urllib.parse.urlencode({"q": query, "k": 8}))
        api = json.loads(body)["results"]
        expected = index.search([query], 8)[0]
        assert [r["row"] for r in api] == [h["row"] for h in expected]
        assert np.allclose([r["score"] for r in api], [h["score"] for h in expected], atol=1e-6)
        assert all("locator" not in r for r in api)  # no server paths
        # Thumbnails: the gallery image at twice the model's input size, MARS patches drawn on it.
        status, headers, body = server.get(api[0]["thumbnail"])
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(body)).size == (2 * index.cfg.data.image_size[1], 2 * index.cfg.data.image_size[0])
        assert server.get(f"/thumb/{len(index)}.png")[0] == 404 and server.get("/thumb/../index.json")[0] == 404
        # Bounds: a query longer than the limit and a bad k are refused with a message.
        status, _, body = server.get("/?" + urllib.parse.urlencode({"q": "a" * 301}))
        assert status == 400 and "at most 300 are read" in body.decode()
        status, _, body = server.get("/api/search?q=a&k=0")
        assert status == 400 and "k must be" in json.loads(body)["error"]
        # DNS rebinding: a page whose name now resolves to 127.0.0.1 gets nothing through the browser.
        port = server.url.rsplit(":", 1)[1].rstrip("/")
        for path in ("/", "/api/search?q=a", "/thumb/0.png"):
            status, _, body = server.get(path, Host=f"attacker.example:{port}")
            assert status == 403 and b"localhost only" in body
        assert server.get("/thumb/0.png", Host=f"localhost:{port}")[0] == 200


@pytest.mark.slow
def test_search_page_in_chromium(one_rank_index, small_dataset, tmp_path):
    query = _captions(small_dataset, "train")[0][0]
    with Server(one_rank_index, tmp_path) as server, DevTools(tmp_path) as page:
        page.navigate(server.url)
        assert page.evaluate("document.querySelectorAll('figure').length") == 0
        page.type_text("#q", query)
        page.press_enter()  # submits the form: the browser goes to /?q=...
        page.wait_loaded(server.url + "?q=")
        assert page.image_check() == "images: 10 loaded: 10 broken: 0"
        assert page.evaluate("new URLSearchParams(location.search).get('q')") == query
        assert page.evaluate("document.querySelector('#summary .q').textContent") == query
        captions = page.evaluate("[...document.querySelectorAll('figcaption')].map(f => f.textContent)")
        shown = [re.match(r"#(\d+) (-?\d\.\d{3})", c).groups() for c in captions]
        expected = Index(str(one_rank_index)).search([query], 10)[0]
        assert [int(rank) for rank, _ in shown] == [h["rank"] for h in expected]
        assert [float(score) for _, score in shown] == pytest.approx([h["score"] for h in expected], abs=1e-3)
        # The screenshot: every thumbnail drawn, none blank (a broken or empty image is one flat colour).
        shot = page.screenshot()
        boxes = page.evaluate("[...document.querySelectorAll('figure img')].map(i => { const r = "
                              "i.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })")
        scale = page.evaluate("window.devicePixelRatio")
        assert len(boxes) == 10
        for box in boxes:
            crop = np.asarray(shot.crop(tuple(round(v * scale) for v in box)), dtype=np.float32)
            assert crop.shape[0] > 20 and crop.shape[1] > 10 and crop.std() > 10, box

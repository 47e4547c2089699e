"""Who may write and with what (issue 25): one writer per index folder and per report folder (a
second is refused at once, naming the holder; readers go on), the model that built an index and
no other (`--allow-model-mismatch` to search anyway), a report `--out` that is the user's own
folder, the search page's connections (idle ones closed, a bounded number at once, a port in
use), and no traceback from any retrieve command: mistakes and environment faults (a truncated
model, a gallery that is a file, `--out` inside the gallery, a full disk) exit 2 with one line,
runtime failures exit 1 with one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from retrieving import Served, cli, copy_index, edit_json, ok, refused, snapshot
from runs import REPO, train_env, wait_until

from itself.model.export import export
from itself.retrieve import Index

HOLD = ("import sys, time; from shards.locking import FolderLock; FolderLock(sys.argv[1]).acquire('x'); "
        "print('held', flush=True); time.sleep(600)")


class Holder:
    """Another process holding a folder's lock (a real process: the lock dies with it)."""

    def __init__(self, lock: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], cwd=REPO, env=train_env(),
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


# ----------------------------------------------------------------------------------- one writer per folder


def test_one_writer_per_index_folder_and_readers_go_on(folder_index, untrained_model, photos, tmp_path):
    d = copy_index(folder_index, tmp_path / "index")
    with Holder(d / "index.lock") as holder:
        before = snapshot(d)
        start = time.monotonic()
        refused(cli("index", "--model", untrained_model, "--gallery", photos, "--out", d, "--index-type", "hnsw"),
                f"the index folder {d} is in use by another process (pid {holder.proc.pid} on {socket.gethostname()}")
        refused(cli("add", "--index", d, "--gallery", photos), f"(pid {holder.proc.pid} on")
        assert time.monotonic() - start < 30  # (refused at once, not after waiting)
        assert snapshot(d) == before
        ok(cli("query", "--index", d, "--text", "a man"))  # readers do not wait for writers
    _, out, _ = ok(cli("index", "--model", untrained_model, "--gallery", photos, "--out", d, "--index-type", "hnsw"))
    assert "(hnsw index)" in out and not (d / "index.lock").exists()


def test_one_writer_per_report_folder(folder_index, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    with Holder(out / ".report.lock") as holder:
        refused(cli("report", "--index", folder_index, "--text", "a man", "--out", out),
                f"the report folder {out} is in use by another process (pid {holder.proc.pid}")
    assert sorted(p.name for p in out.iterdir()) == [".report.lock"]  # (the holder's, killed: no lock, no report)
    ok(cli("report", "--index", folder_index, "--text", "a man", "--out", out))


# ----------------------------------------------------------------------------------- the model of the index


@pytest.fixture(scope="module")
def other_weights(untrained_model, tmp_path_factory) -> Path:
    """A model of the same architecture and sizes as `untrained_model`, with other weights."""
    blob = torch.load(untrained_model, weights_only=True)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    path = tmp_path_factory.mktemp("other") / "other.pt"
    export(path, state, blob["config"], blob["num_ids"], blob["fusion_weight"])
    return path


def test_a_model_of_the_same_shape_with_other_weights_is_refused(folder_index, other_weights, photos, tmp_path):
    for command in (["query", "--text", "a man"], ["report", "--text", "a man", "--out", tmp_path / "r"],
                    ["serve", "--port", "0"]):
        refused(cli(command[0], "--index", folder_index, "--model", other_weights, *command[1:]),
                "model/index mismatch", "is not the model that built the index", "--allow-model-mismatch")
    assert not (tmp_path / "r").exists()
    refused(cli("add", "--index", folder_index, "--model", other_weights, "--gallery", photos),
            "was built with another model")
    _, out, _ = ok(cli("query", "--index", folder_index, "--model", other_weights, "--text", "a man",
                       "--allow-model-mismatch"))
    assert "  1  " in out
    # The model file index.json names, replaced by another one: found before it is loaded.
    d = copy_index(folder_index, tmp_path / "index")
    edit_json(d / "index.json", lambda i: i.update(model=str(other_weights)))
    refused(cli("query", "--index", d, "--text", "a man"), "model/index mismatch")


# ----------------------------------------------------------------------------------- the report folder


def test_a_report_never_overwrites_a_folder_it_did_not_write(folder_index, photos, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.html").write_text("<p>my own page</p>")
    (out / "holiday.png").write_bytes(b"my photo")
    refused(cli("report", "--index", folder_index, "--text", "a man", "--out", out),
            "holds other files (holiday.png, index.html)", "--overwrite")
    assert (out / "index.html").read_text() == "<p>my own page</p>"
    ok(cli("report", "--index", folder_index, "--text", "a man", "--out", out, "--overwrite"))
    assert (out / "holiday.png").read_bytes() == b"my photo" and "Person search report" in (out / "index.html").read_text()
    # A report folder we wrote is ours to replace, without a flag; the old thumbnails go with it.
    ok(cli("report", "--index", folder_index, "--text", "a woman", "--top-k", "3", "--out", out))
    assert len(list((out / "img").iterdir())) == 3
    assert sorted(p.name for p in out.iterdir()) == [".itself-report", "holiday.png", "img", "index.html"]
    for bad, message in [(photos / "r", "and the gallery"), (folder_index, "and the index folder"),
                         (photos.parent, "and the gallery"), (out / "holiday.png", "a file, not a folder")]:
        refused(cli("report", "--index", folder_index, "--text", "a man", "--out", bad, "--overwrite"), message)
    assert not (photos / "r").exists()


def test_a_failed_report_leaves_the_previous_page_whole(untrained_model, photos, tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    for p in sorted(photos.iterdir())[:4]:
        (g / p.name).write_bytes(p.read_bytes())
    ok(cli("index", "--model", untrained_model, "--gallery", g, "--out", tmp_path / "index"))
    out = tmp_path / "report"
    ok(cli("report", "--index", tmp_path / "index", "--text", "a man", "--top-k", "4", "--out", out))
    before = snapshot(out)
    sorted(g.iterdir())[-1].write_bytes(sorted(g.iterdir())[0].read_bytes())  # one image changed: fails mid-way
    refused(cli("report", "--index", tmp_path / "index", "--text", "a woman", "--top-k", "4", "--out", out),
            "changed since it was indexed")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == [".itself-report", "img", "index.html"]


# ----------------------------------------------------------------------------------- the search page


def test_idle_connections_are_closed_and_connections_bounded(folder_index):
    with Served(folder_index, idle_timeout_s=1.0, max_connections=2) as server:
        port = server.server.server_port
        idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]  # connect, say nothing
        time.sleep(0.2)
        status, body = server.get("/")
        assert status == 503 and body == b"too busy"  # a third is answered at once, not queued behind them
        start = time.monotonic()
        for s in idle:
            assert s.recv(1) == b""  # closed by the server after its idle timeout
            s.close()
        assert time.monotonic() - start < 10
        wait_until(lambda: server.get("/")[0] == 200, 10, "a free connection slot")


def test_the_page_shows_the_query_count_and_time_and_no_server_path(folder_index, photos, tmp_path):
    with Served(folder_index) as server:
        status, body = server.get("/?q=a+man+in+a+grey+coat&k=3")
    page = body.decode()
    assert status == 200 and "3 results for" in page and " ms)" in page and "a man in a grey coat" in page
    assert str(photos) not in page and str(folder_index) not in page and "loaded:" not in page and "image-check" not in page
    ok(cli("report", "--index", folder_index, "--text", "a man", "--out", tmp_path / "r"))
    report = (tmp_path / "r" / "index.html").read_text()
    assert str(photos) not in report and "loaded:" not in report and "8 images of photos" in report


def test_a_port_in_use_or_a_host_that_cannot_be_bound_is_one_error_line(folder_index):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        refused(cli("serve", "--index", folder_index, "--port", port), f"port {port} is in use", "choose another --port")
    finally:
        taken.close()
    refused(cli("serve", "--index", folder_index, "--host", "203.0.113.7", "--port", "0"),
            "cannot serve on --host 203.0.113.7", "choose another --host")


# ----------------------------------------------------------------------------------- no traceback


def test_a_truncated_model_file_is_one_error_line(folder_index, untrained_model, photos, tmp_path):
    truncated = tmp_path / "model.pt"
    truncated.write_bytes(untrained_model.read_bytes()[: untrained_model.stat().st_size // 2])
    refused(cli("index", "--model", truncated, "--gallery", photos, "--out", tmp_path / "i"),
            f"--model {truncated}: not a readable exported model")
    refused(cli("query", "--index", folder_index, "--model", truncated, "--text", "a man"),
            "not a readable exported model")
    (tmp_path / "run").mkdir()
    refused(cli("query", "--index", folder_index, "--model", tmp_path / "run", "--text", "a man"),
            "run/model.pt: no such file")


def test_galleries_and_outs_that_cannot_be_are_one_error_line(untrained_model, photos, tmp_path):
    photo = sorted(photos.iterdir())[0]
    refused(cli("index", "--model", untrained_model, "--gallery", photo, "--out", tmp_path / "i"),
            "a file, not a gallery")
    g = tmp_path / "g"
    g.mkdir()
    (g / "a.jpg").write_bytes(photo.read_bytes())
    refused(cli("index", "--model", untrained_model, "--gallery", g, "--out", g / "index"), "hold one another")
    (tmp_path / "file").write_text("x")
    refused(cli("index", "--model", untrained_model, "--gallery", g, "--out", tmp_path / "file"), "a file, not a folder")
    assert sorted(p.name for p in g.iterdir()) == ["a.jpg"] and not (tmp_path / "i").exists()


def test_a_full_disk_is_one_error_line(untrained_model, folder_index, photos, mount):
    full = mount("size=64k")
    fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)  # another program took all the space
    with pytest.raises(OSError, match="No space left"):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    refused(cli("index", "--model", untrained_model, "--gallery", photos, "--out", full / "index"),
            "No space left on device")
    refused(cli("report", "--index", folder_index, "--text", "a man", "--out", full / "report"),
            "No space left on device")


def test_a_runtime_failure_is_one_line_and_exit_1(folder_index, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("the search\nfailed")

    monkeypatch.setattr(Index, "search", fail)  # (a failure no input can cause: the CLI's last resort)
    code, out, err = cli("query", "--index", folder_index, "--text", "a man")
    assert code == 1 and err == "query failed: RuntimeError: the search failed\n" and out == ""

"""`python -m itself.retrieve` refuses a user's mistake with one `error: ...` line and exit 2, no
traceback, and changes nothing: counts outside their range, empty queries, malformed queries files
(the line is named), an index folder that is missing, damaged or copied in part, unknown options.
A folder named like an image inside a gallery is not an image (ignored). HTML output escapes what
comes from queries files and galleries."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from retrieving import cli


def retrieve(*args: str) -> subprocess.CompletedProcess:
    """The command run in this process (its exit code is main's return value): a process adds nothing."""
    code, out, err = cli(*args)
    return subprocess.CompletedProcess(args, code, out, err)


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(res: subprocess.CompletedProcess, message: str) -> None:
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert message in res.stderr, res.stderr[-3000:]
    assert "error: " in res.stderr


@pytest.fixture(scope="module")
def index_dir(untrained_model, small_dataset, tmp_path_factory) -> Path:
    """The test split of the small dataset (16 images), indexed."""
    out = tmp_path_factory.mktemp("retrieve-inputs") / "index"
    res = retrieve("index", "--model", str(untrained_model), "--gallery", str(small_dataset), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("args,message", [
    (["--text", "a man", "--top-k", "0"], "error: --top-k must be >= 1, got 0"),
    (["--text", "a man", "--top-k", "-1"], "error: --top-k must be >= 1, got -1"),
    (["--text", "a man", "--candidates", "0"], "error: --candidates must be >= 1, got 0"),
    (["--text", "a man", "--ef-search", "-5"], "error: --ef-search must be >= 1, got -5"),
    (["--text", ""], "error: --text: query 1 is empty"),
    (["--text", "a man", "--text", "  \t "], "error: --text: query 2 is empty"),
    (["--text", "a man", "--bogus"], "error: unrecognized arguments: --bogus"),
])
def test_query_arguments_are_refused(index_dir, args, message):
    before = snapshot(index_dir)
    res = retrieve("query", "--index", str(index_dir), *args)
    refused(res, message)
    assert res.stdout == ""  # no results printed for a refused query
    assert snapshot(index_dir) == before


def test_report_and_serve_refuse_top_k_0_and_write_nothing(index_dir, tmp_path):
    before = snapshot(index_dir)
    refused(retrieve("report", "--index", str(index_dir), "--text", "a man", "--top-k", "0", "--out",
                     str(tmp_path / "report")), "error: --top-k must be >= 1, got 0")
    refused(retrieve("serve", "--index", str(index_dir), "--top-k", "0", "--port", "0"), "error: --top-k must be >= 1")
    assert not (tmp_path / "report").exists()
    assert snapshot(index_dir) == before


@pytest.mark.parametrize("lines,message", [
    (['a man in a grey coat', '{"text": "a woman", "pid": 3}', '{bad json'], ", line 3: not valid JSON"),
    (['a man', '', '{"pid": 4}'], ", line 3: a JSON line needs a non-empty \"text\" string"),
    (['{"text": "   "}'], ", line 1: a JSON line needs a non-empty \"text\" string"),
    (['{"text": 5}'], ", line 1: a JSON line needs a non-empty \"text\" string"),
    (['{"text": "a man", "pid": [1, 2]}'], ', line 1: "pid" must be a number or a string, got list'),
    (['', '   '], ": no queries in the file"),
])
def test_malformed_queries_files_name_the_line(index_dir, tmp_path, lines, message):
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(lines) + "\n")
    before = snapshot(index_dir)
    refused(retrieve("query", "--index", str(index_dir), "--queries", str(queries)), f"--queries {queries}{message}")
    refused(retrieve("report", "--index", str(index_dir), "--queries", str(queries), "--out", str(tmp_path / "r")),
            f"--queries {queries}{message}")
    assert not (tmp_path / "r").exists()
    assert snapshot(index_dir) == before


def test_unreadable_queries_files(index_dir, tmp_path):
    refused(retrieve("query", "--index", str(index_dir), "--queries", str(tmp_path / "none.txt")), "no such file")
    refused(retrieve("query", "--index", str(index_dir), "--queries", str(tmp_path)), "a folder, not a file")
    (tmp_path / "latin1.txt").write_bytes("un homme \xe0 lunettes\n".encode("latin-1"))
    refused(retrieve("query", "--index", str(index_dir), "--queries", str(tmp_path / "latin1.txt")), "not UTF-8")


def _damage_part_items(d: Path) -> str:
    f = next((d / "batches" / "000").glob("part-*.json"))
    f.unlink()  # (the part's item list: this format's items.jsonl)
    return f"{f} is missing; the index folder is damaged"


def _damage_vectors(d: Path) -> str:
    f = next(d.glob("vectors-*.faiss"))
    f.unlink()
    return f"{f} is missing; the index folder is damaged"


def _truncate_embeddings(d: Path) -> str:
    f = next((d / "batches" / "000").glob("part-*.grab.npy"))
    f.write_bytes(f.read_bytes()[:200])
    return "the index folder is damaged"


def _bad_index_json(d: Path) -> str:
    (d / "index.json").write_text('{"format": "itself-index/2", ')
    return "index.json: unreadable"


def _old_format(d: Path) -> str:
    """An index of the single-file retrieve (global.npy, grab.npy, items.jsonl)."""
    for p in list(d.iterdir()):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (d / "index.json").write_text('{"model": "m.pt", "images": 1}')
    (d / "items.jsonl").write_text('{"name": "a.jpg"}\n')
    return "an index of format 'itself-index/1', this version reads 'itself-index/3'; build the index again"


def _old_format_without_items(d: Path) -> str:
    _old_format(d)
    (d / "items.jsonl").unlink()
    return "an index of format 'itself-index/1'"


@pytest.mark.parametrize("damage", [_damage_part_items, _damage_vectors, _truncate_embeddings, _bad_index_json,
                                    _old_format, _old_format_without_items])
def test_a_damaged_index_folder_is_named_not_a_traceback(index_dir, tmp_path, damage):
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    message = damage(copy)
    before = snapshot(copy)
    refused(retrieve("query", "--index", str(copy), "--text", "a man"), message)
    refused(retrieve("report", "--index", str(copy), "--text", "a man", "--out", str(tmp_path / "r")), message)
    assert snapshot(copy) == before and not (tmp_path / "r").exists()


def test_a_missing_index_folder(tmp_path):
    for command in (["query", "--text", "a man"], ["report", "--text", "a man", "--out", str(tmp_path / "r")],
                    ["serve", "--port", "0"]):
        res = retrieve(command[0], "--index", str(tmp_path / "none"), *command[1:])
        refused(res, f"error: {tmp_path / 'none'} is not an index (no index.json)")
    assert sorted(tmp_path.iterdir()) == []


def test_a_folder_named_like_an_image_is_not_an_image(untrained_model, tmp_path):
    gallery = tmp_path / "gallery"
    (gallery / "x.jpg").mkdir(parents=True)
    (gallery / "x.jpg" / "inside.png").write_bytes(b"")  # (an empty file: unreadable, skipped and counted)
    (gallery / "cam1").mkdir()
    for i, name in enumerate(["a.jpg", "cam1/b.png"]):
        Image.new("RGB", (16, 48), (40 * i, 120, 200)).save(gallery / name)
    res = retrieve("index", "--model", str(untrained_model), "--gallery", str(gallery), "--out", str(tmp_path / "i"))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "indexed 2 images (1 unreadable skipped)" in res.stdout
    res = retrieve("query", "--index", str(tmp_path / "i"), "--text", "a man", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(h["name"] for h in __import__("json").loads(res.stdout)[0]["results"]) == ["a.jpg", "cam1/b.png"]


def test_report_escapes_queries_and_identities(index_dir, tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    queries = tmp_path / "queries.txt"
    queries.write_text('{"text": "%s a man", "pid": "<script>alert(2)</script>"}\n%s\n' % (evil, evil))
    res = retrieve("report", "--index", str(index_dir), "--queries", str(queries), "--out", str(tmp_path / "r"),
                   "--top-k", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<img src=x" not in page and "<script>alert" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;script&gt;alert(2)&lt;/script&gt;" in page


def test_the_host_header_names_the_machine_or_the_request_is_refused():
    # (the server on 127.0.0.1 answers only these: tests/test_search_at_scale.py sends the requests)
    from itself.retrieve.serve import host_name, is_loopback

    for header, name in (("localhost:8000", "localhost"), ("127.0.0.1", "127.0.0.1"), ("[::1]:8000", "::1"),
                         ("LocalHost:1", "localhost"), ("attacker.example:8000", "attacker.example"),
                         ("localhost.attacker.example", "localhost.attacker.example"), (None, ""), ("[::1", "")):
        assert host_name(header) == name
    assert {is_loopback(host_name(h)) for h in ("attacker.example:80", "127.0.0.1.nip.io", "", "localhost.attacker.example",
                                                "10.0.0.1:80", "[::2]")} == {False}
    assert {is_loopback(host_name(h)) for h in ("localhost.:80", "127.0.0.2", "[::1]:1", "[::ffff:127.0.0.1]:8")} == {True}

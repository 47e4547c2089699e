"""Helpers of the retrieval fault tests: the CLI run in this process (its exit code is `main`'s
return value), refusals, snapshots of folders, and hostile edits of an index folder's JSON."""

from __future__ import annotations

import hashlib
import os
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

from itself.retrieve.cli import main
from runs import run_main


def cli(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m itself.retrieve ARGS`, run in this process."""
    quiet = ["--no-progress"] if args[0] in ("index", "add") else []
    run = run_main(main, [*args, *quiet], env=dict(os.environ), cwd=os.getcwd())
    return run.returncode, run.stdout, run.stderr


def refused(result: tuple[int, str, str], *messages: str) -> str:
    """Assert exit 2 with one `error:` line (the last) holding every message, no traceback; the line."""
    code, out, err = result
    assert code == 2, f"exit {code}\n{out[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err + out, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    for message in messages:
        assert message in last, f"{message!r} not in {last!r}"
    return last


def ok(result: tuple[int, str, str]) -> tuple[int, str, str]:
    code, out, err = result
    assert code == 0, f"exit {code}\n{out[-2000:]}\n{err[-3000:]}"
    return result


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under folder (links not followed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def copy_index(index: Path, to: Path) -> Path:
    shutil.copytree(index, to)
    return to


def edit_json(path: Path, change) -> None:
    """Rewrite a JSON file through change(obj), which edits obj in place."""
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def part_file(index: Path, unit: int = 0, batch: int = 0) -> Path:
    return index / "batches" / f"{batch:03d}" / f"part-{unit:06d}.json"


class Served:
    """`serve` of an index in this process, on a free port (a real HTTP server in a thread)."""

    def __init__(self, index_dir: Path, **options):
        from itself.retrieve import Index
        from itself.retrieve.serve import SearchApp, make_server

        self.server = make_server(SearchApp(Index(str(index_dir))), "127.0.0.1", 0, **options)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

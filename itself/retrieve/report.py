"""The HTML report: ranked thumbnails per query, the patches MARS kept, the run's training curves.

A self-contained folder (index.html, img/, the curves): thumbnails outlined green when the hit is
the query's identity, red when another (when identities are known).

The folder is the user's: `--out` must be new, empty, or a report this tool wrote (it holds the
marker `.itself-report`); another folder is refused unless `--overwrite` (which replaces its
index.html, img/ and curves, and nothing else). One report writes a folder at a time (a lock),
everything is written aside first and moved in at the end, index.html last: a killed report
leaves the previous page whole (at worst with broken thumbnails), never half a page. Thumbnail
names are new for every report, so a page never shows another report's images.
"""

from __future__ import annotations

import html
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from shards import schema
from shards.locking import FolderLock, LockBusy, LockUnavailable

from ..panels import overlay
from ..rundir import RunDir
from ..safeio import (
    UnsafePath,
    open_regular,
    printable,
    resolve_inside,
    write_atomic,
)
from .errors import RetrieveError
from .gallery import is_remote

if TYPE_CHECKING:
    from .search import Index

MARKER = ".itself-report"
LOCK = ".report.lock"
OURS = ("index.html", "img", "loss.png", "val.png")  # what a report writes into its folder (besides the marker)
_LEFTOVERS = (".partial-", ".old-")  # folders a killed report may leave behind (removed by the next)
MAX_METRICS_BYTES = 1 << 30


def training_curves(run_dir: Path, out: Path) -> list[str]:
    """loss.png and val.png from a run's metrics.jsonl; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = RunDir(run_dir)
    train = run.records("train")
    evals = run.evals("val")
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(6, 3.2), constrained_layout=True)
        ax.plot([r["step"] for r in train], [r["loss"] for r in train])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        fig.savefig(out / "loss.png", dpi=90)
        plt.close(fig)
        written.append("loss.png")
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.2), constrained_layout=True)
        epochs = [r.epoch + 1 for r in evals]
        for key in ("R1", "mAP"):
            ax.plot(epochs, [r.fused[key] for r in evals], marker="o", label=f"val {key} (fused)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.legend()
        fig.savefig(out / "val.png", dpi=90)
        plt.close(fig)
        written.append("val.png")
    return written


PAGE_STYLE = ("body{font-family:sans-serif;margin:20px} .row{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0;"
              "padding:3px;border:4px solid #ccc;font-size:11px;text-align:center} figure.hit{border-color:#1a9c3c}"
              " figure.miss{border-color:#d22} .q{font-style:italic} .curve{margin:6px}")


def hit_figure(hit: dict, src: str, query_pid=None) -> str:
    """One ranked thumbnail with its rank, score, name and identity; everything that comes from the
    gallery is made printable (names that were not UTF-8, control characters) and escaped.
    Outlined green / red when both identities are known."""
    known = query_pid is not None and hit["pid"] is not None
    cls = ("hit" if hit["pid"] == query_pid else "miss") if known else "unknown"
    pid = f"<br>id {html.escape(printable(str(hit['pid'])))}" if hit["pid"] is not None else ""
    return (f'<figure class="{cls}"><img src="{html.escape(src)}" alt="rank {hit["rank"]}">'
            f'<figcaption>#{hit["rank"]} {hit["score"]:.3f}<br>{html.escape(printable(hit["name"]))}{pid}'
            "</figcaption></figure>")


def page(title: str, style: str, body: list[str], tail: str = "") -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title><style>{style}</style></head>"
            f"<body>{''.join(body)}{tail}</body></html>")


def write_report(index: "Index", queries: list[dict], out: str, top_k: int = 5, run_dir: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write the HTML report folder (see the module docstring); returns its index.html."""
    out = Path(out)
    check_out(index, out, overwrite)
    metrics = _metrics_file(run_dir) if run_dir else None
    results = index.search([q["text"] for q in queries], top_k)
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out / LOCK)
    try:
        lock.acquire(f"the report folder {out}", "wait for it to finish, or use another --out")
    except (LockBusy, LockUnavailable) as e:
        raise RetrieveError(str(e)) from None
    try:
        check_out(index, out, overwrite)  # (again, holding the lock: another report may have just written it)
        _remove_leftovers(out)
        aside = Path(tempfile.mkdtemp(prefix=_LEFTOVERS[0], dir=out))
        try:
            _write_pages(index, queries, results, aside, metrics)
            _move_in(aside, out)
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        lock.release()
    return out / "index.html"


def check_out(index: "Index", out: Path, overwrite: bool) -> None:
    """RetrieveError unless `out` may take a report: not a file, apart from the index folder and the
    galleries, and new, empty, a report of ours, or `overwrite`."""
    if os.path.lexists(out) and not out.is_dir():
        raise RetrieveError(f"--out {out}: a file, not a folder; choose a folder for the report")
    index.dir.check_apart(out, "--out")
    for b in index.info["batches"]:
        real, root = os.path.realpath(out), os.path.realpath(b["root"])
        if not is_remote(b["root"]) and os.path.commonpath([real, root]) in (real, root):
            raise RetrieveError(f"--out {out} and the gallery {b['root']} hold one another; write the report "
                                "elsewhere (its images would join the gallery)")
    if not out.is_dir() or overwrite or _ours(out):
        return
    others = sorted(n for n in os.listdir(out) if n != LOCK and not n.startswith(_LEFTOVERS))
    if others:
        shown = ", ".join(printable(n, 60) for n in others[:3]) + (", ..." if len(others) > 3 else "")
        raise RetrieveError(f"--out {out}: the folder holds other files ({shown}) and is not a report written by "
                            "this tool; choose a new or empty folder, or pass --overwrite to replace its index.html, "
                            "img/ and curves")


def _ours(out: Path) -> bool:
    marker = out / MARKER
    return marker.is_file() and not marker.is_symlink()


def _remove_leftovers(out: Path) -> None:
    for entry in out.iterdir():
        if entry.name.startswith(_LEFTOVERS) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)


def _move_in(aside: Path, out: Path) -> None:
    """Our entries of `aside` replace those of `out` (moved, never followed: a link named img is
    moved away, not written through), index.html last; the previous ones are then removed."""
    old = Path(tempfile.mkdtemp(prefix=_LEFTOVERS[1], dir=out))
    for name in OURS:
        if os.path.lexists(out / name):
            os.rename(out / name, old / name)
        if os.path.lexists(aside / name) and name != "index.html":
            os.rename(aside / name, out / name)
    write_atomic(out / MARKER, json.dumps({"format": "itself-report/1"}) + "\n")
    os.replace(aside / "index.html", out / "index.html")
    shutil.rmtree(old)


def _metrics_file(run_dir: str) -> Path:
    """The run's metrics.jsonl, checked before it is read: inside the run folder, a regular file."""
    if not Path(run_dir).is_dir():
        raise RetrieveError(f"--run {run_dir}: no such run folder")
    path = resolve_inside(run_dir, RunDir.METRICS, f"--run {run_dir}: {RunDir.METRICS}")
    if os.path.lexists(path):
        os.close(open_regular(path, f"--run {run_dir}", MAX_METRICS_BYTES))  # (a regular file, bounded)
    return path


def _write_pages(index: "Index", queries: list[dict], results: list[list[dict]], out: Path, metrics: Path | None):
    size = tuple(index.cfg.data.image_size)
    (out / "img").mkdir()
    token = secrets.token_hex(4)
    name = os.path.basename(str(index.info["gallery"]).rstrip("/")) or "gallery"
    body = [f"<h1>Person search report</h1><p>{index.info['images']} images of {html.escape(printable(name, 200))}; "
            f"fused score a={index.fusion_weight:g}. Highlighted patches: the tokens MARS kept for GRAB. Outline: "
            "green = same identity as the query, red = another.</p>"]
    cache: dict[int, str] = {}
    for qi, (q, hits) in enumerate(zip(queries, results)):
        body.append(f"<h2>Query {qi + 1}</h2><p class=q>{html.escape(q['text'])}"
                    + (f" <span class=pid>(identity {html.escape(str(q['pid']))})</span>" if q.get("pid") is not None else "")
                    + f"</p><p>{len(hits)} results</p><div class=row>")
        for hit in hits:
            if hit["row"] not in cache:
                cache[hit["row"]] = f"img/{token}-{len(cache):05d}.png"
                overlay(index.model, _image(index, hit), size).save(out / cache[hit["row"]])
            body.append(hit_figure(hit, cache[hit["row"]], q.get("pid")))
        body.append("</div>")
    if metrics is not None:
        curves = _curves(metrics.parent, out)
        body.append("<h2>Training</h2>" + "".join(f'<img class=curve src="{c}" alt="{c}">' for c in curves))
    (out / "index.html").write_text(page("ITSELF person search", PAGE_STYLE, body), encoding="utf-8")


def _image(index: "Index", hit: dict) -> bytes:
    try:
        return index.image(hit["row"])
    except OSError as e:
        raise RetrieveError(f"{printable(hit['name'], 200)}: cannot read the image ({e.strerror}): the gallery changed "
                            "since it was indexed; build the index again") from None


def _curves(run_dir: Path, out: Path) -> list[str]:
    try:
        return training_curves(run_dir, out)
    except (RetrieveError, UnsafePath):
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign metrics.jsonl
        raise RetrieveError(f"--run {run_dir}: cannot read its training records ({type(e).__name__}: "
                            f"{printable(str(e), 200)})") from None


def sample_queries(index: "Index", n: int, seed: int = 0) -> list[dict]:
    """n captions (with their identities) drawn from the manifest of the indexed dataset split."""
    import random

    import pyarrow.parquet as pq

    root, split = index.info["batches"][0]["root"], index.info["split"]
    manifest = None if is_remote(root) else resolve_inside(root, schema.MANIFEST_FILE, f"{root}: {schema.MANIFEST_FILE}")
    if manifest is None or not manifest.is_file():
        raise RetrieveError(f"--sample-queries needs a dataset gallery with {schema.MANIFEST_FILE}; use --queries FILE")
    os.close(open_regular(manifest, "--sample-queries", 1 << 34))
    from shards.corpora import text_bomb

    try:
        bomb = text_bomb(pq.read_metadata(manifest), ["split", "pid", "captions"])
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise RetrieveError(f"{manifest}: unreadable ({type(e).__name__}); use --queries FILE") from None
    if bomb:
        raise RetrieveError(f"{manifest}: {bomb}: refused without decompressing it; use --queries FILE")
    try:
        table = pq.read_table(manifest, columns=["split", "pid", "captions"])
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise RetrieveError(f"{manifest}: unreadable ({type(e).__name__}); use --queries FILE") from None
    rows = [r for r in table.to_pylist() if r["split"] == split]
    pairs = [{"text": c, "pid": r["pid"]} for r in rows for c in r["captions"] or [] if isinstance(c, str) and c.strip()]
    return random.Random(seed).sample(pairs, min(n, len(pairs)))


def read_queries(path: str) -> list[dict]:
    """One query per line: plain text, or JSON {"text": ..., "pid": ...}; blank lines are skipped.
    A line that is not a query is refused with its number."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RetrieveError(f"--queries {path}: no such file") from None
    except IsADirectoryError:
        raise RetrieveError(f"--queries {path}: a folder, not a file of queries") from None
    except UnicodeDecodeError:
        raise RetrieveError(f"--queries {path}: not UTF-8 text") from None
    except OSError as e:
        raise RetrieveError(f"--queries {path}: cannot read it ({e.strerror})") from None
    queries = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if not line.startswith("{"):
            queries.append({"text": line})
            continue
        try:
            q = json.loads(line)
        except ValueError as e:
            raise RetrieveError(f"--queries {path}, line {n}: not valid JSON ({e.msg}); a line is plain text or "
                                '{"text": "...", "pid": 12}') from None
        if not isinstance(q, dict) or not isinstance(q.get("text"), str) or not q["text"].strip():
            raise RetrieveError(f'--queries {path}, line {n}: a JSON line needs a non-empty "text" string')
        pid = q.get("pid")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, (int, str))):
            raise RetrieveError(f'--queries {path}, line {n}: "pid" must be a number or a string, got {type(pid).__name__}')
        queries.append({"text": q["text"].strip(), "pid": pid})
    if not queries:
        raise RetrieveError(f"--queries {path}: no queries in the file")
    return queries

"""The HTML report: ranked thumbnails per query, the patches MARS kept, the run's training curves.

A self-contained folder (index.html + PNGs): thumbnails outlined green when the hit is the
query's identity, red when another (when identities are known).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

from shards import schema

from ..panels import overlay
from ..rundir import RunDir
from .errors import RetrieveError
from .gallery import read_image

if TYPE_CHECKING:
    from .search import Index


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

# Counts the page's images once loaded, into #image-check (the browser tests read it).
IMAGE_CHECK_JS = """window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  const el = document.getElementById('image-check');
  el.textContent = `images: ${imgs.length} loaded: ${imgs.length - broken.length} broken: ${broken.length}`;
  el.dataset.broken = broken.length;
});"""
IMAGE_CHECK = f"<script>\n{IMAGE_CHECK_JS}\n</script>"


def hit_figure(hit: dict, src: str, query_pid=None) -> str:
    """One ranked thumbnail with its rank, score, name and identity; everything that comes from the
    gallery is escaped. Outlined green / red when both identities are known."""
    known = query_pid is not None and hit["pid"] is not None
    cls = ("hit" if hit["pid"] == query_pid else "miss") if known else "unknown"
    pid = f"<br>id {html.escape(str(hit['pid']))}" if hit["pid"] is not None else ""
    return (f'<figure class="{cls}"><img src="{html.escape(src)}" alt="rank {hit["rank"]}">'
            f'<figcaption>#{hit["rank"]} {hit["score"]:.3f}<br>{html.escape(str(hit["name"]))}{pid}</figcaption></figure>')


def write_report(index: "Index", queries: list[dict], out: str, top_k: int = 5, run_dir: str | None = None) -> Path:
    """Write the HTML report folder; returns its index.html."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    size = tuple(index.cfg.data.image_size)
    results = index.search([q["text"] for q in queries], top_k)
    body = [f"<h1>Person search report</h1><p>Gallery: {html.escape(str(index.info['gallery']))} "
            f"({index.info['images']} images); fused score a={index.fusion_weight:g}. Highlighted patches: the "
            f"tokens MARS kept for GRAB. Outline: green = same identity as the query, red = another.</p>",
            '<p id="image-check">images: not checked</p>']
    cache: dict[str, str] = {}
    for qi, (q, hits) in enumerate(zip(queries, results)):
        body.append(f"<h2>Query {qi + 1}</h2><p class=q>{html.escape(q['text'])}"
                    + (f" <span class=pid>(identity {html.escape(str(q['pid']))})</span>" if q.get("pid") is not None else "")
                    + "</p><div class=row>")
        for hit in hits:
            if hit["locator"] not in cache:
                name = f"img/g{len(cache):05d}.png"
                overlay(index.model, read_image(hit["locator"]), size).save(out / name)
                cache[hit["locator"]] = name
            body.append(hit_figure(hit, cache[hit["locator"]], q.get("pid")))
        body.append("</div>")
    if run_dir:
        curves = training_curves(Path(run_dir), out)
        body.append("<h2>Training</h2>" + "".join(f'<img class=curve src="{c}" alt="{c}">' for c in curves))
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>ITSELF person search</title><style>{PAGE_STYLE}</style>"
            f"</head><body>{''.join(body)}{IMAGE_CHECK}</body></html>")
    (out / "index.html").write_text(page)
    return out / "index.html"


def sample_queries(gallery: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """n captions (with their identities) drawn from a dataset split's manifest."""
    import random

    import pyarrow.parquet as pq

    manifest = Path(gallery) / schema.MANIFEST_FILE
    if not manifest.exists():
        raise RetrieveError(f"--sample-queries needs a dataset gallery with {schema.MANIFEST_FILE}; use --queries FILE")
    rows = [r for r in pq.read_table(manifest, columns=["split", "pid", "captions"]).to_pylist() if r["split"] == split]
    pairs = [{"text": c, "pid": r["pid"]} for r in rows for c in r["captions"]]
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

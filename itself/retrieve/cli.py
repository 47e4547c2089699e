"""Person search for users: index a gallery (on any number of ranks), grow it, query it, see why.

    python -m itself.retrieve index  --model model.pt --gallery SHARDS_OR_IMAGE_FOLDER --out INDEX_DIR
                                     [--index-type flat|hnsw] [--device auto] [--part-size N]
    python -m itself.retrieve add    --index INDEX_DIR --gallery MORE_IMAGES
    python -m itself.retrieve query  --index INDEX_DIR --text "a man in a grey coat" [--top-k 10] [--json]
    python -m itself.retrieve report --index INDEX_DIR (--queries FILE | --sample-queries N) --out REPORT_DIR
                                     [--run RUN_DIR] [--top-k 5] [--overwrite]
    python -m itself.retrieve serve  --index INDEX_DIR [--host 127.0.0.1] [--port 8000]

`index` and `add` run under torchrun, deepspeed (itself/retrieve/__main__.py) and SLURM
(launch/index.py) too: every rank embeds its share of the gallery; a failed build resumes from the
parts it finished. The gallery is a built dataset folder (its `--split`, default test), a shard
pattern, or a plain folder of images. Scores are the fused similarity a * S_global + (1 - a) * S_grab
with the fusion weight chosen on val during training, searched with FAISS: exactly (flat, the
default) or approximately (hnsw) with the candidates re-scored exactly. The report is a
self-contained HTML folder, `serve` a search page: ranked thumbnails with the patches MARS kept.

An index folder may come from someone else: its files are data, checked before use, and every
image it names is read inside its gallery and must be the image indexed (sha256). query, report
and serve refuse a model other than the one that built the index (`--allow-model-mismatch` to
search anyway). Mistakes and environment faults end in one `error:` line and exit 2; anything
else that fails exits 1 with one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .. import logs
from ..dist import world_info_from_env
from ..errors import UserError
from ..safeio import printable
from .build import BuildRequest, run_build
from .errors import RetrieveError
from .gallery import DEFAULT_PART_SIZE
from .report import read_queries, sample_queries, write_report
from .search import Index
from .serve import IDLE_TIMEOUT_S, MAX_CONNECTIONS, MAX_QUERY_CHARS, SearchApp, serve
from .vectors import DEFAULT_CANDIDATES, DEFAULT_EF_SEARCH, KINDS, IndexSpec

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itself-retrieve" if sys.argv[0].endswith("itself-retrieve") else
                                "python -m itself.retrieve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # The DeepSpeed launcher passes --local_rank=N before the command (LOCAL_RANK says the same).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    logs.add_arguments(p)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("index", help="embed a gallery with an exported model (any launcher, resumable)")
    i.add_argument("--model", required=True, help="model.pt exported by itself/train.py")
    i.add_argument("--out", required=True, help="the index folder")
    _gallery_arguments(i)
    spec = IndexSpec()
    i.add_argument("--index-type", choices=KINDS, help="flat: exact (the default for a new index); hnsw: approximate, "
                   "for large galleries. Run again with another type to rebuild from the stored embeddings")
    i.add_argument("--pca-dim", type=int, default=spec.pca_dim, help="hnsw: dimensions after PCA (default %(default)s)")
    i.add_argument("--hnsw-m", type=int, default=spec.hnsw_m, help="hnsw: links per image (default %(default)s)")
    i.add_argument("--ef-construction", type=int, default=spec.ef_construction, help="hnsw: build breadth (default %(default)s)")
    a = sub.add_parser("add", help="embed more images into an existing index (any launcher, resumable)")
    a.add_argument("--index", required=True, dest="out", help="the index folder")
    a.add_argument("--model", help="model.pt (default: the one that built the index; must be the same model)")
    _gallery_arguments(a)
    q = sub.add_parser("query", help="rank the gallery for text queries")
    _index_arguments(q)
    q.add_argument("--text", action="append", help="a query (repeatable)")
    q.add_argument("--queries", help="file: one query per line")
    q.add_argument("--top-k", type=int, default=10)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    r = sub.add_parser("report", help="HTML report: ranked thumbnails, MARS patches, training curves")
    _index_arguments(r)
    r.add_argument("--out", required=True)
    r.add_argument("--text", action="append")
    r.add_argument("--queries", help='file: one query per line (text, or JSON {"text", "pid"})')
    r.add_argument("--sample-queries", type=int, default=0, help="draw N captions of the indexed split as queries")
    r.add_argument("--run", help="a training run folder: adds its loss and val curves")
    r.add_argument("--top-k", type=int, default=5)
    r.add_argument("--overwrite", action="store_true",
                   help="write into an --out that holds other files (its index.html, img/ and curves are replaced)")
    s = sub.add_parser("serve", help="the search page: a text box, ranked thumbnails with MARS patches")
    _index_arguments(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    s.add_argument("--top-k", type=int, default=10, help="results per query unless the page asks for another k")
    s.add_argument("--max-query-chars", type=int, default=MAX_QUERY_CHARS,
                   help="longer queries are refused (default %(default)s)")
    s.add_argument("--idle-timeout-s", type=float, default=IDLE_TIMEOUT_S,
                   help="a connection silent this long is closed (default %(default)s)")
    s.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help="connections served at once; more are answered 503 (default %(default)s)")
    return p


def _gallery_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gallery", required=True, help="dataset folder, shard pattern, or folder of images")
    p.add_argument("--split", default="test", help="split of a dataset gallery (default test)")
    p.add_argument("--device", default="auto", help="auto (each rank's GPU when there is one), cuda or cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--part-size", type=int, default=DEFAULT_PART_SIZE,
                   help="images per part of a folder gallery: the unit a failed build resumes from (a shard is one part)")
    p.add_argument("--workers", type=int, default=0, help="threads decoding images per rank (default: none)")
    p.add_argument("--wait-timeout-min", type=float, default=60.0,
                   help="how long a rank that finished waits for the others (default 60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True)
    p.add_argument("--model", help="model.pt (default: the one that built the index)")
    p.add_argument("--ef-search", type=int, default=DEFAULT_EF_SEARCH, help="hnsw: search breadth (default %(default)s)")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                   help="hnsw: candidates re-scored exactly per query (default %(default)s)")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="search with a model other than the one that built the index (its rankings are not meaningful "
                   "unless the weights are the same)")


def main(argv: list[str] | None = None) -> int:
    """The command's exit code: 0 done, 2 a mistake or an environment fault (`error: ...`, one
    line: a bad flag, a damaged or hostile index folder, a port in use, a full disk, no permission),
    1 anything else that failed (one line; the traceback is logged at debug level)."""
    args = parser().parse_args(argv)  # (argparse: `error: ...` and exit 2 for an unknown option)
    try:
        logs.setup_from(args, world_info_from_env().rank)
        _check_numbers(args)
        if args.command in ("index", "add"):
            return _build(args)
        return _use(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment: a full disk, no permission, a read-only or vanished file
        where = f"{printable(str(e.filename), 300)}: " if e.filename else ""
        print(f"error: {where}{e.strerror or one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a runtime failure: one line, the traceback for debugging
        log.debug("%s failed", args.command, exc_info=True)
        print(f"{args.command} failed: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 1


def one_line(e: BaseException) -> str:
    """An exception's message on one printable line (no control character reaches the terminal)."""
    return printable(" ".join(str(e).split()), 2000)


def _check_numbers(args) -> None:
    """Counts the user gives are positive: `--top-k 0` is refused, not turned into an empty or a
    whole-gallery answer."""
    for name in ("top_k", "ef_search", "candidates", "batch_size", "part_size", "pca_dim", "hnsw_m",
                 "ef_construction", "max_query_chars", "sample_queries"):
        value = getattr(args, name, None)
        minimum = 0 if name == "sample_queries" else 1
        if value is not None and value < minimum:
            raise RetrieveError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if getattr(args, "max_connections", 1) < 1 or not getattr(args, "idle_timeout_s", 1) > 0:
        raise RetrieveError("--max-connections must be >= 1 and --idle-timeout-s > 0")
    if getattr(args, "workers", 0) < 0:
        raise RetrieveError(f"--workers must be >= 0, got {args.workers}")
    if getattr(args, "command", None) == "serve" and not 0 <= args.port <= 65535:
        raise RetrieveError(f"--port must be from 0 to 65535, got {args.port}")
    for i, text in enumerate(getattr(args, "text", None) or []):
        if not text.strip():
            raise RetrieveError(f"--text: query {i + 1} is empty; describe the person, e.g. --text \"a man in a grey coat\"")


def _build(args) -> int:
    spec = None
    if args.command == "index" and args.index_type:
        spec = IndexSpec(args.index_type, args.pca_dim, args.hnsw_m, args.ef_construction)
    info = run_build(BuildRequest(
        gallery=args.gallery, out=args.out, model=args.model, split=args.split, add=args.command == "add", spec=spec,
        device=args.device, batch_size=args.batch_size, part_size=args.part_size, workers=args.workers,
        progress=not args.no_progress, wait_timeout_min=args.wait_timeout_min))
    if info is None:  # not rank 0
        return 0
    batch = info["batches"][-1]
    if info.get("unchanged"):
        print(f"{args.out} already indexes {args.gallery} ({info['images']} images, {info['index']['kind']} index)")
    elif args.command == "add":
        known = batch["already"] + batch["duplicates"]
        print(f"added {batch['images']} images ({batch['skipped']} unreadable skipped) to {args.out}: "
              f"{info['images']} images now; {known} already in the index skipped"
              + (f" ({batch['already']} indexed files or shards, {batch['duplicates']} copies of indexed images)"
                 if known else ""))
    else:
        print(f"indexed {info['images']} images ({info['skipped']} unreadable skipped) into {args.out} "
              f"({info['index']['kind']} index)")
    return 0


def _use(args) -> int:
    index = Index(args.index, args.model, args.allow_model_mismatch)
    changed = index.gallery_changes()
    if changed:
        print(f"warning: the gallery changed since it was indexed ({printable(changed, 500)}): results may name "
              "images that are gone or changed (those are never shown); build the index again", file=sys.stderr)
    if args.command == "serve":
        serve(SearchApp(index, args.top_k, args.max_query_chars, args.ef_search, args.candidates), args.host, args.port,
              args.idle_timeout_s, args.max_connections)
        return 0
    queries = [{"text": t} for t in (args.text or [])]
    if args.queries:
        queries += read_queries(args.queries)
    if args.command == "report" and args.sample_queries:
        queries += sample_queries(index, args.sample_queries)
    if not queries:
        raise RetrieveError("no queries: pass --text, --queries FILE" + (" or --sample-queries N" if args.command == "report" else ""))
    if args.command == "report":
        print(f"report: {write_report(index, queries, args.out, args.top_k, args.run, args.overwrite)}")
        return 0
    results = index.search([q["text"] for q in queries], args.top_k, args.ef_search, args.candidates)
    if args.json:
        print(json.dumps([{"query": q["text"], "results": r} for q, r in zip(queries, results)], indent=2))
        return 0
    for q, hits in zip(queries, results):
        print(f"\n{q['text']}")
        for h in hits:
            pid = f"  (id {printable(str(h['pid']), 300)})" if h["pid"] is not None else ""
            print(f"  {h['rank']:>3}  {h['score']:.4f}  {printable(h['name'])}{pid}")
    return 0

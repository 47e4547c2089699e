"""Person search at scale: the vector indexes of `python -m itself.retrieve` on galleries of 100k and
1M images with ViT-B/16's embedding sizes (global 512, GRAB 4096), on this machine's CPU.

For each gallery size: the index build time (the merge step of `index`, after embedding) and its
memory, single-query latency p50 / p99 (FAISS candidates + exact re-scoring from the stored
embeddings, as `query` and `serve` do; the FAISS part alone beside it), recall@10 of the
approximate index against exact search, and whether exact search gives the brute-force results
(scoring every image by a * S_global + (1 - a) * S_grab, as `query` did before FAISS).

    python bench/search_bench.py                       # 100k and 1M images, 500 new queries per row
    python bench/search_bench.py --sizes 100000 --data isotropic
    python bench/search_bench.py --quick               # 3,000 images (the test runs this)

The embeddings are synthetic (no model runs): identities drawn in a 64-d latent space, 4 images each,
each branch a fixed random projection of the identity plus view noise in the latent space and
isotropic noise in all dimensions, then L2-normalised (`--data isotropic`: no view noise in the
latent space, isotropic noise as large as the identity's signal). The stored embeddings are written
to a temporary folder (17 GiB at 1M; `--keep DIR` keeps them for the next run).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from bench.common import PeakAnon, gib  # noqa: E402
from itself.retrieve.store import EmbeddingStore, IndexDir  # noqa: E402
from itself.retrieve.vectors import (  # noqa: E402
    PCA_TRAIN_IMAGES, IndexSpec, VectorSearch, brute_force_topk, build_faiss, fuse, import_faiss, write_faiss)

DIMS = (512, 4096)  # ViT-B/16: global, GRAB
FUSION_WEIGHT = 0.5
PART = 50_000  # images per stored part
K = 10
SWEEP = ((128, 50), (256, 50), (512, 50), (1024, 50), (512, 200))  # (ef_search, candidates) of hnsw


@dataclasses.dataclass
class Synthetic:
    """Embeddings with identity structure: see the module docstring."""

    images: int
    latent: int = 64
    per_id: int = 4
    view_noise: float = 0.5  # in the latent space (changes which identities are near)
    query_noise: float = 0.7
    ambient: float = 0.3  # isotropic, in all dimensions
    seed: int = 0

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.identities = rng.standard_normal((-(-self.images // self.per_id), self.latent), dtype=np.float32)
        self.projections = [rng.standard_normal((self.latent, d), dtype=np.float32) for d in DIMS]

    def _embed(self, ids: np.ndarray, view_noise: float, rng) -> list[np.ndarray]:
        z = self.identities[ids] + view_noise * rng.standard_normal((len(ids), self.latent), dtype=np.float32)
        out = []
        for p in self.projections:
            x = _unit(z @ p) + self.ambient * _unit(rng.standard_normal((len(ids), p.shape[1]), dtype=np.float32))
            out.append(_unit(x))
        return out

    def gallery(self, start: int, end: int) -> list[np.ndarray]:
        return self._embed(np.arange(start, end) // self.per_id, self.view_noise, np.random.default_rng([self.seed, 0, start]))

    def queries(self, n: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, 1, 0])  # (gallery parts: [seed, start])
        return self._embed(rng.integers(0, len(self.identities), n), self.query_noise, rng)


def isotropic(images: int) -> Synthetic:
    return Synthetic(images, view_noise=0.0, query_noise=0.0, ambient=1.0)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


ROOT = "/synthetic"  # (a gallery root for the items' places: no image is read here)


def write_gallery(data: Synthetic, folder: Path, name: str) -> EmbeddingStore:
    """The synthetic gallery as the stored parts of an index (what `index` writes after embedding)."""
    batch = IndexDir(folder).batch(0)
    starts = range(0, data.images, PART)
    batch.write_plan({"gallery": name, "root": ROOT, "split": "test", "model": f"{ROOT}/model.pt", "model_sha256": "0" * 64,
                      "digest": "0" * 64, "units": len(starts)})
    counts = []
    for u, start in enumerate(starts):
        end = min(data.images, start + PART)
        glob, grab = data.gallery(start, end)
        batch.part(u).write(glob, grab, [{"name": f"img{i}", "pid": i // data.per_id, "file": f"img{i}.jpg",
                                          "sha256": "0" * 64, "bytes": 0} for i in range(start, end)], 0)
        counts.append(end - start)
    return _store(folder, counts)


def _store(folder: Path, counts: list[int]) -> EmbeddingStore:
    index = IndexDir(folder)
    return EmbeddingStore(index.batch_parts(index.batch(0), counts, ROOT, DIMS), counts)


def latencies(fn, n: int) -> np.ndarray:
    out = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return np.array(out) * 1000


def exact_matches(found: list[list[tuple[int, float]]], truth_rows, truth_scores, tol: float = 1e-5) -> tuple[bool, int]:
    """(same results as brute force, positions whose row differs): the scores agree position by
    position, and a row differs only where two images tie within `tol`."""
    rows = np.array([[r for r, _ in hits] for hits in found])
    scores = np.array([[s for _, s in hits] for hits in found])
    same_scores = rows.shape == truth_rows.shape and np.allclose(scores, truth_scores, atol=tol)
    differ = rows != truth_rows
    ties = all(np.any(np.abs(truth_scores[q] - scores[q, j]) <= tol) for q, j in zip(*np.nonzero(differ)))
    return bool(same_scores and ties), int(differ.sum())


def recall(found, truth_rows) -> float:
    return float(np.mean([len({r for r, _ in hits} & set(t)) / len(t) for hits, t in zip(found, truth_rows)]))


def stored_gallery(data: Synthetic, folder: Path, name: str) -> EmbeddingStore:
    """The gallery's stored parts in `folder`: written, or reused when a previous run left them."""
    batch = IndexDir(folder).batch(0)
    plan = batch.read_plan() if batch.plan_file.exists() and "root" in batch.plan_file.read_text() else None
    if plan and plan["gallery"] == name and all(p.done() for p in batch.parts()):
        print(f"stored embeddings: reused from {folder}", flush=True)
        return _store(folder, [p.read_meta()["images"] for p in batch.parts()])
    start = time.perf_counter()
    store = write_gallery(data, folder, name)
    print(f"stored embeddings: written in {time.perf_counter() - start:.0f} s", flush=True)
    return store


def run_size(data: Synthetic, name: str, queries: int, kinds: list[str], sweep, folder: Path) -> None:
    n = data.images
    dim = sum(DIMS)
    print(f"\n## {n:,} images x {dim} dims ({DIMS[0]} global + {DIMS[1]} GRAB), {queries} queries per row, "
          f"top-{K}", flush=True)
    store = stored_gallery(data, folder, name)
    disk = sum(f.stat().st_size for f in (folder / "batches").rglob("*.npy"))
    print(f"stored embeddings: {gib(disk)} on disk, memory-mapped; {gib(psutil.virtual_memory().available)} of "
          "memory available for them and the page cache", flush=True)
    # Every measured row gets its own queries: the rows they re-score were not read by an earlier row
    # (a gallery larger than the page cache is then read from disk, as for new queries).
    rows_measured = [("flat", None, None)] * ("flat" in kinds) + [("hnsw", ef, c) for ef, c in sweep] * ("hnsw" in kinds)
    q_glob, q_grab = data.queries(queries * len(rows_measured))
    with PeakAnon() as m:
        truth_scores, truth_rows = brute_force_topk(store, q_glob, q_grab, FUSION_WEIGHT, K)
    print(f"brute force (every image scored, all {len(q_glob)} queries in one pass): {m.seconds:.1f} s, "
          f"{m.seconds / len(q_glob) * 1000:.1f} ms/query amortised", flush=True)
    built, table = {}, []
    for i, (kind, ef, cand) in enumerate(rows_measured):
        if kind not in built:
            built[kind] = build(kind, store, folder)
        if built[kind] is None:
            continue
        search, secs, extra, size = built[kind]
        q = slice(i * queries, (i + 1) * queries)
        qg, ql, t_rows, t_scores = q_glob[q], q_grab[q], truth_rows[q], truth_scores[q]
        kw = {"ef_search": ef, "candidates": cand} if kind == "hnsw" else {}
        found = []
        total = latencies(lambda j: found.append(search.search(qg[j:j + 1], ql[j:j + 1], K, **kw)[0]), queries)
        fused = search.to_graph(fuse(qg, ql, FUSION_WEIGHT))
        params = search.search_params(ef)
        alone = latencies(lambda j: search.graph.search(fused[j:j + 1], cand or K, params=params), queries)
        label = kind + (f" ef={ef} candidates={cand}" if kind == "hnsw" else "")
        if kind == "flat":
            same, differ = exact_matches(found, t_rows, t_scores)
            check = f"exact == brute force: {same} ({differ} of {t_rows.size} rows differ, all ties)"
        else:
            check = f"recall@{K} = {recall(found, t_rows):.4f}"
        table.append((label, secs, extra, size, total, alone, check))
        print(f"{label}: build {secs:.1f} s, peak extra memory {gib(extra)}, index {gib(size)}; query p50 "
              f"{np.percentile(total, 50):.1f} ms p99 {np.percentile(total, 99):.1f} ms (FAISS alone p50 "
              f"{np.percentile(alone, 50):.1f} p99 {np.percentile(alone, 99):.1f}); {check}", flush=True)
    print("\n| index | build | peak extra memory | index size | query p50 | query p99 | FAISS alone p50 / p99 | check |")
    print("|---|---|---|---|---|---|---|---|")
    for label, secs, extra, size, total, alone, check in table:
        print(f"| {label} | {secs:.1f} s | {gib(extra)} | {gib(size)} | {np.percentile(total, 50):.1f} ms | "
              f"{np.percentile(total, 99):.1f} ms | {np.percentile(alone, 50):.1f} / {np.percentile(alone, 99):.1f} ms "
              f"| {check} |")
    print(f"(threads: torch / FAISS {import_faiss().omp_get_max_threads()})", flush=True)


def build(kind: str, store: EmbeddingStore, folder: Path):
    """(VectorSearch, build seconds, peak extra memory, index bytes), or None when it cannot fit here."""
    n, dim = len(store), sum(DIMS)
    # (flat: every fused vector in float32; hnsw: 256-d vectors, links, and the PCA's sample)
    need = n * dim * 4 * 1.2 if kind == "flat" else n * (256 + 64) * 4 * 1.5 + 2 * PCA_TRAIN_IMAGES * dim * 4
    free = psutil.virtual_memory().available
    if need > 0.7 * free:
        print(f"{kind}: NOT MEASURED: needs ~{gib(need)} in memory, {gib(free)} available", flush=True)
        return None
    with PeakAnon() as m:
        index = build_faiss(IndexSpec(kind), store, FUSION_WEIGHT)
        write_faiss(index, folder / f"{kind}.faiss")
    return VectorSearch(index, store, FUSION_WEIGHT), m.seconds, m.extra, (folder / f"{kind}.faiss").stat().st_size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=500, help="queries per measured row (default 500)")
    p.add_argument("--kinds", nargs="+", default=["flat", "hnsw"])
    p.add_argument("--data", choices=["structured", "isotropic"], default="structured")
    p.add_argument("--keep", help="keep the stored embeddings in this folder (and reuse them when run again)")
    p.add_argument("--quick", action="store_true", help="3,000 images, 50 queries (the test runs this)")
    args = p.parse_args()
    sizes, queries, sweep = ([3000], 50, SWEEP[2:3]) if args.quick else (args.sizes, args.queries, SWEEP)
    print(f"# machine: {psutil.cpu_count()} CPUs, {gib(psutil.virtual_memory().total)} memory "
          f"({gib(psutil.virtual_memory().available)} available); data: {args.data}")
    for n in sizes:
        data = Synthetic(n) if args.data == "structured" else isotropic(n)
        name = f"{args.data}-{n}"
        folder = Path(args.keep) / name if args.keep else Path(tempfile.mkdtemp(prefix="search-bench-"))
        try:
            run_size(data, name, queries, args.kinds, sweep, folder)
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

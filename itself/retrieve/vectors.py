"""The fused score as one inner product, and the FAISS indexes that search it.

The fused score of a query q and an image x is a * <q_g, x_g> + (1 - a) * <q_l, x_l>, every
embedding L2-normalised (g: global, l: GRAB). With

    fuse(v) = [sqrt(a) * v_g, sqrt(1 - a) * v_l]

it is exactly <fuse(q), fuse(x)>: one inner product between unit vectors (|fuse(v)|^2 = a + 1 - a),
so an inner-product index over fuse(gallery) ranks by the fused score. Two kinds of index:

- `flat` (default): FAISS IndexFlatIP, exact; 4 B x dims per image in memory (ViT-B/16, 512 + 4096
  dims: 18 KB per image, 18 GB per million).
- `hnsw`: approximate. The fused vectors are projected by PCA to `pca_dim` dimensions (256: 1 KB per
  image) and linked in an HNSW graph; a search takes `candidates` from the graph.

Either way the candidates are then re-scored with the stored embeddings by the brute-force formula
(`fused_scores`), so a reported score is the exact fused score whatever the index, and the flat
index ranks exactly as scoring every image does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from ..safeio import temp_beside
from .errors import RetrieveError
from .store import DAMAGED, KINDS, EmbeddingStore

# HNSW search breadth and candidates re-scored exactly per query (at least top-k). The breadth is
# what recall needs: the PCA keeps the ranking (the true top-10 are in the PCA top-50), the graph
# search is what misses (bench/search_bench.py: recall@10 at 1M images, BENCHMARKS.md).
DEFAULT_EF_SEARCH = 512
DEFAULT_CANDIDATES = 50
PCA_TRAIN_IMAGES = 25_000  # images sampled to fit the PCA


@dataclasses.dataclass
class IndexSpec:
    """How the vector index is built (recorded in index.json; `add` keeps it)."""

    kind: str = "flat"
    pca_dim: int = 256  # hnsw: dimensions after PCA (none when the fused vector is not longer)
    hnsw_m: int = 32  # hnsw: links per node
    ef_construction: int = 80  # hnsw: breadth of the search that links a new node

    def check(self) -> None:
        if self.kind not in KINDS:
            raise RetrieveError(f"--index-type {self.kind!r}: choose one of {', '.join(KINDS)}")
        for name in ("pca_dim", "hnsw_m", "ef_construction"):
            if getattr(self, name) < 1:
                raise RetrieveError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise RetrieveError("the vector index needs FAISS, which is not installed: "
                            "pip install 'itself-at-scale[search]'") from None
    return faiss


def fuse(glob: np.ndarray, grab: np.ndarray | None, a: float) -> np.ndarray:
    """[sqrt(a) * glob, sqrt(1 - a) * grab] (float32; just glob for a global-only model)."""
    if grab is None:
        return np.ascontiguousarray(glob, dtype=np.float32)
    return np.hstack([np.sqrt(a, dtype=np.float32) * glob, np.sqrt(1 - a, dtype=np.float32) * grab])


def fused_scores(q_glob, q_grab, glob, grab, a: float) -> torch.Tensor:
    """a * S_global + (1 - a) * S_grab [queries, images]: the brute-force score, computed as it
    always was (one float32 matmul per branch)."""
    sim = _tensor(q_glob) @ _tensor(glob).T
    if grab is not None:
        sim = a * sim + (1 - a) * (_tensor(q_grab) @ _tensor(grab).T)
    return sim


def _tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float32, copy=True))


def brute_force_topk(store: EmbeddingStore, q_glob, q_grab, a: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) [queries, k] of the best k images by scoring every image, part by part."""
    best_s = torch.full((len(q_glob), 0), -torch.inf)
    best_i = torch.zeros((len(q_glob), 0), dtype=torch.long)
    for start, glob, grab in store.blocks():
        s = fused_scores(q_glob, q_grab, glob, grab, a)
        best_s = torch.cat([best_s, s], dim=1)
        best_i = torch.cat([best_i, torch.arange(start, start + s.shape[1]).expand_as(s)], dim=1)
        best_s, order = best_s.topk(min(k, best_s.shape[1]), dim=1)
        best_i = best_i.gather(1, order)
    return best_s.numpy(), best_i.numpy()


# ----------------------------------------------------------------------------------- FAISS


def build_faiss(spec: IndexSpec, store: EmbeddingStore, a: float):
    """A FAISS index of `spec.kind` over every image of `store` (rows in store order)."""
    faiss = import_faiss()
    dim = _fused_dim(store)
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        sample = _training_sample(store, a)
        pca_dim = min(spec.pca_dim, *sample.shape)  # (a PCA has at most as many axes as points)
        index = faiss.IndexHNSWFlat(pca_dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        if pca_dim < dim:
            index = faiss.IndexPreTransform(fit_pca(sample, pca_dim), index)
    add_to_faiss(index, store.blocks(), a)
    return index


def fit_pca(sample: np.ndarray, dim: int):
    """A FAISS PCAMatrix to `dim` axes, fitted by randomized SVD (torch.pca_lowrank): at 4,608 input
    dimensions FAISS's own training (a full eigendecomposition) takes minutes, this seconds."""
    faiss = import_faiss()
    x = torch.from_numpy(sample)
    _, s, v = torch.pca_lowrank(x, q=min(dim + 10, *x.shape), center=True, niter=4)
    pca = faiss.PCAMatrix(x.shape[1], dim)
    faiss.copy_array_to_vector(x.mean(0).numpy(), pca.mean)
    faiss.copy_array_to_vector(np.ascontiguousarray(v[:, :dim].T.numpy()).ravel(), pca.PCAMat)
    faiss.copy_array_to_vector((s[:dim] ** 2 / max(1, len(x) - 1)).numpy(), pca.eigenvalues)
    pca.prepare_Ab()
    pca.is_trained = True
    return pca


ADD_ROWS = 16_384  # fused vectors made at a time while adding (bounds the build's extra memory)


def add_to_faiss(index, blocks, a: float) -> None:
    """Append the images of `blocks` ((start, global, GRAB) as EmbeddingStore.blocks gives them)."""
    for _, glob, grab in blocks:
        for i in range(0, len(glob), ADD_ROWS):
            index.add(fuse(glob[i:i + ADD_ROWS], None if grab is None else grab[i:i + ADD_ROWS], a))


def _fused_dim(store: EmbeddingStore) -> int:
    glob, grab = store.parts[0].arrays
    return glob.shape[1] + (grab.shape[1] if grab is not None else 0)


def _training_sample(store: EmbeddingStore, a: float) -> np.ndarray:
    """Fused vectors of up to PCA_TRAIN_IMAGES images drawn evenly over the gallery (not its first
    images: galleries are often ordered by camera or day)."""
    rows = np.random.default_rng(0).choice(len(store), min(len(store), PCA_TRAIN_IMAGES), replace=False)
    return fuse(*store.rows(np.sort(rows)), a)


def write_faiss(index, path) -> None:
    """Write to a new temporary name (unique, created by us: never a planted link), then rename: a
    crash leaves the old file or the new one."""
    faiss = import_faiss()
    tmp = temp_beside(path)
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_faiss(path: Path, store: EmbeddingStore, spec: IndexSpec):
    """The FAISS index at `path`, which must be the one this index wrote for `store` with `spec`:
    a regular file (not a link) of a size that fits the images and dimensions, read with a bound on
    the memory FAISS may take (a header claiming a huge array fails at once instead of filling
    memory), and then checked: type, dimensions, image count, and for hnsw every link of the graph
    (a search follows them without bounds checks)."""
    faiss = import_faiss()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise RetrieveError(f"{path} is missing; {DAMAGED}") from None
    if not os.path.isfile(path) or os.path.islink(path):
        raise RetrieveError(f"{path}: not a regular file; {DAMAGED}")
    n, dim = len(store), _fused_dim(store)
    bound = _size_bound(n, dim, spec)
    if st.st_size > bound:
        raise RetrieveError(f"{path}: {st.st_size} bytes, more than an index of {n} images of {dim} dimensions takes "
                            f"({bound}); {DAMAGED}")
    try:
        with _memory_headroom(2 * st.st_size + (256 << 20)):
            index = faiss.read_index(str(path))
        check_faiss(index, n, dim, spec.kind)
    except (RuntimeError, MemoryError, AssertionError) as e:
        raise RetrieveError(f"{path}: unreadable ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); "
                            f"{DAMAGED}") from None
    return index


def _size_bound(n: int, dim: int, spec: IndexSpec) -> int:
    """The most bytes a FAISS file of `spec` over n images of `dim` fused dimensions takes (generous)."""
    if spec.kind == "flat":
        return 4 * n * dim + (64 << 10)
    return 2 * n * (4 * dim + 16 * spec.hnsw_m + 16) + 8 * dim * dim + (1 << 20)


@contextlib.contextmanager
def _memory_headroom(extra: int):
    """Let this process's address space grow by at most `extra` bytes inside the block (RLIMIT_AS,
    restored after): an allocation beyond fails with an error instead of exhausting the machine."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):  # (not Linux: no bound)
        yield
        return
    limit = used + extra if hard == resource.RLIM_INFINITY else min(used + extra, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check_faiss(index, n: int, dim: int, kind: str) -> None:
    """AssertionError unless `index` is what this module builds: a flat inner-product index, or an
    HNSW graph (behind a PCA) whose every link points at one of its n images."""
    faiss = import_faiss()
    index = faiss.downcast_index(index)
    assert index.ntotal == n and index.d == dim, f"{index.ntotal} images of {index.d} dimensions, expected {n} of {dim}"
    if kind == "flat":
        assert type(index) is faiss.IndexFlatIP, f"a {type(index).__name__}, expected a flat index"
        assert index.code_size == 4 * dim and index.codes.size() == n * 4 * dim, "its vectors do not fit its size"
        return
    graph = index
    if isinstance(index, faiss.IndexPreTransform):
        assert index.chain.size() == 1, "more than one transform"
        pca = faiss.downcast_VectorTransform(index.chain.at(0))
        graph = faiss.downcast_index(index.index)
        assert type(pca) is faiss.PCAMatrix and pca.is_trained and pca.d_in == dim and pca.d_out == graph.d, "bad PCA"
        assert pca.A.size() == pca.d_in * pca.d_out and pca.b.size() == pca.d_out, "bad PCA matrix"
    assert type(graph) is faiss.IndexHNSWFlat and graph.ntotal == n, f"a {type(graph).__name__}, expected HNSW"
    storage = faiss.downcast_index(graph.storage)
    assert type(storage) is faiss.IndexFlatIP and storage.ntotal == n and storage.d == graph.d, "bad HNSW storage"
    assert storage.codes.size() == n * 4 * graph.d, "bad HNSW storage"
    h = graph.hnsw
    levels, offsets = faiss.vector_to_array(h.levels), faiss.vector_to_array(h.offsets).astype(np.int64)
    cum, links = faiss.vector_to_array(h.cum_nneighbor_per_level), faiss.vector_to_array(h.neighbors)
    assert len(levels) == n and len(offsets) == n + 1 and len(cum) >= 2 and cum[0] == 0, "bad HNSW tables"
    assert (np.diff(cum) >= 0).all() and (levels >= 1).all() and (levels < len(cum)).all(), "bad HNSW levels"
    assert offsets[0] == 0 and (np.diff(offsets) == cum[levels]).all() and offsets[-1] == len(links), "bad HNSW offsets"
    assert ((links >= -1) & (links < n)).all(), "an HNSW link to no image"
    if n:
        assert 0 <= h.entry_point < n and h.max_level == levels[h.entry_point] - 1 == levels.max() - 1, "bad HNSW entry"


class VectorSearch:
    """Ranks a store's images for query embeddings: candidates from the FAISS index, then exact
    fused scores from the stored embeddings."""

    def __init__(self, index, store: EmbeddingStore, a: float):
        if index.ntotal != len(store):
            raise RetrieveError(f"the vector index holds {index.ntotal} images, the stored embeddings {len(store)}: "
                                "the index folder is damaged; build it again")
        faiss = import_faiss()
        self.index, self.store, self.a = index, store, a
        self.approximate = not isinstance(index, faiss.IndexFlat)
        # A query is projected here, not by FAISS: its per-call matrix product costs ~5 ms for one
        # vector, a torch matmul a fraction of that.
        self.graph, self.projection = index, None
        if isinstance(index, faiss.IndexPreTransform):
            pca = faiss.downcast_VectorTransform(index.chain.at(0))
            a_mat = faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in)
            self.projection = (torch.from_numpy(a_mat.T.copy()), torch.from_numpy(faiss.vector_to_array(pca.b)))
            self.graph = faiss.downcast_index(index.index)

    def search(self, q_glob: np.ndarray, q_grab: np.ndarray | None, k: int, ef_search: int = DEFAULT_EF_SEARCH,
               candidates: int = DEFAULT_CANDIDATES) -> list[list[tuple[int, float]]]:
        """Per query, the best k (row, exact fused score), best first."""
        q = self.to_graph(fuse(q_glob, q_grab, self.a))
        wanted = max(k, candidates) if self.approximate else k
        _, found = self.graph.search(q, min(wanted, len(self.store)), params=self.search_params(ef_search))
        results = []
        for i, rows in enumerate(found):
            rows = rows[rows >= 0]
            glob, grab = self.store.rows(rows)
            scores = fused_scores(q_glob[i:i + 1], None if q_grab is None else q_grab[i:i + 1], glob, grab, self.a)[0]
            top = scores.topk(min(k, len(rows)))
            results.append([(int(rows[j]), float(s)) for s, j in zip(top.values, top.indices)])
        return results

    def to_graph(self, fused: np.ndarray) -> np.ndarray:
        """Fused vectors in the space the FAISS index searches (PCA-projected for hnsw with a PCA)."""
        if self.projection is None:
            return fused
        return (torch.from_numpy(fused) @ self.projection[0] + self.projection[1]).numpy()

    def search_params(self, ef_search: int):
        """FAISS search parameters (None for the flat index)."""
        if not self.approximate:
            return None
        return import_faiss().SearchParametersHNSW(efSearch=ef_search)

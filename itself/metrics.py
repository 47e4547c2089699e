"""Text-to-image retrieval metrics (R@1/5/10, mAP, mINP), ranked in blocks of queries.

No Q x G argsort (nor Q x G match matrix) is ever formed, and the work does not depend on how
good the model is. A match's rank only needs the count of gallery scores above it, so each row of
scores is put once into equal-width bins of ~4 gallery items (one histogram per chunk of rows):
every item in a higher bin than a match outranks it, every item in a lower bin does not, and only
the few items sharing a bin with one of the query's matches are compared exactly. That is a fixed
~10 vectorised passes per score (no sort of a row, no pass per match), in cache-sized chunks of
rows on one CPU thread; memory is one block of queries at a time (`block_bytes`).

Definitions (standard TBPS / ReID): the rank of a match is 1 + the number of gallery items with
a strictly higher score (a tie does not outrank). R@k: share of queries whose best match ranks
<= k. AP: mean over the query's matches of (j / rank of its j-th match). INP: (number of matches)
/ (rank of the last match). All in percent.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .fusion import fused_key

KS = (1, 5, 10)
BLOCK_BYTES = 256 << 20
"""Default working memory of the blocked ranking (eval.block_mb sets it for training runs)."""

# Scores ranked per pass on a CPU: 1M (4 MB of float32) keeps a chunk's working set (~10 MB) in
# cache (measured: x1.1 faster than 2M, x1.3 than 4M). A GPU takes bigger chunks: fewer launches.
CHUNK_SCORES = {"cpu": 1 << 20, "cuda": 1 << 24}
# Gallery items per histogram bin: more bins mean fewer items to compare exactly (about this many
# per match) but a longer histogram to sum; 4 balances the two.
ITEMS_PER_BIN = 4


def _one_thread(fn: Callable) -> Callable:
    """Runs `fn` on one CPU thread (a GPU's work is unaffected). Ranking is many short memory-bound
    passes: a second thread gains ~20% on the idle 2-core development machine, but on a
    shared or busy CPU every OpenMP region waits for whichever thread was descheduled, and there
    the same passes measured x17 slower with 2 threads than with 1."""

    @functools.wraps(fn)
    def one_thread(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return one_thread


class Ranking:
    """Ranks the matches of blocks of queries. Where each query's matches are in the gallery is
    found once by sorting the gallery ids (so a block never builds a Q x G match matrix); the
    scratch tensors of a chunk are allocated once and reused, since fresh multi-MB tensors for
    every chunk cost more (page faults) than the passes that fill them."""

    def __init__(self, query_pids: torch.Tensor, gallery_pids: torch.Tensor):
        query_pids, gallery_pids = query_pids.cpu(), gallery_pids.cpu()  # index work; ranks() moves it
        order = gallery_pids.argsort(stable=True)
        sorted_ids = gallery_pids[order]
        start = torch.searchsorted(sorted_ids, query_pids)
        self.npos = torch.searchsorted(sorted_ids, query_pids, right=True) - start
        if bool((self.npos == 0).any()):
            raise ValueError(f"{int((self.npos == 0).sum())} queries have no matching gallery item (person id)")
        p = int(self.npos.max())
        offsets = torch.arange(p)[None]
        self.valid = offsets < self.npos[:, None]
        self.index = order[(start[:, None] + offsets).clamp(max=len(order) - 1)]
        self.scratch: dict = {}

    @_one_thread
    def ranks(self, sim: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranks [b, P] of the matches of the queries `rows` (scores `sim` [b, G]), ascending per
        query, and which are real (a prefix of each row; P is the block's most matches)."""
        keep = int(self.npos[rows].max())
        cols, valid = self.index[rows, :keep].to(sim.device), self.valid[rows, :keep].to(sim.device)
        sim = sim.float()
        step = max(1, CHUNK_SCORES.get(sim.device.type, CHUNK_SCORES["cpu"]) // max(1, sim.shape[1]))
        ranks = torch.cat([_chunk_ranks(sim[i:i + step], cols[i:i + step], valid[i:i + step], self.scratch)
                           for i in range(0, len(sim), step)])
        return ranks.masked_fill(~valid, sim.shape[1] + 1).sort(dim=1).values, valid  # padding last


def _chunk_ranks(sim: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor, scratch: dict) -> torch.Tensor:
    """1 + the number of scores in each row of `sim` [b, G] strictly above each of the row's
    matches (at `cols`, real where `valid`)."""
    b, g = sim.shape
    bins = max(1, g // ITEMS_PER_BIN)
    keys = _bin_keys(sim, bins, scratch)
    match_keys = keys.gather(1, cols)
    # items in a match's bin may score either side of it: picked out and compared exactly
    shared = _in_bins(keys, match_keys[valid], b * (bins + 1), scratch)
    same_bin = _higher_in_own_bin(keys.view(-1).index_select(0, shared), sim.reshape(-1).index_select(0, shared),
                                  match_keys, sim.gather(1, cols))
    return _in_higher_bins(keys, match_keys, b * (bins + 1)) + same_bin + 1


def _in_higher_bins(keys: torch.Tensor, match_keys: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Items of each row in a higher bin than each match (all outrank it). Bins are numbered row
    after row, so the running count of items up to a match's bin is the r rows before (G items
    each) + the row's items up to that bin; the rest of row r, (r + 1) G minus it, are above."""
    b, g = keys.shape
    up_to = torch.bincount(keys.view(-1), minlength=num_bins).cumsum(0)
    return torch.arange(1, b + 1, device=keys.device)[:, None] * g - up_to[match_keys.long()]


def _in_bins(keys: torch.Tensor, bins: torch.Tensor, num_bins: int, scratch: dict) -> torch.Tensor:
    """Flat positions of the items of `keys` whose bin is one of `bins`: a table lookup per item."""
    wanted = torch.zeros(num_bins, dtype=torch.bool, device=keys.device)
    wanted[bins.long()] = True
    n = keys.numel()
    hit = _buffer(scratch, "hit", -(-n // 8) * 8, torch.bool, keys.device)  # whole 8-byte words
    torch.index_select(wanted, 0, keys.view(-1), out=hit[:n])
    hit[n:] = False
    return _sparse_nonzero(hit)


def _bin_keys(sim: torch.Tensor, bins: int, scratch: dict) -> torch.Tensor:
    """Bin of each score, int32: `bins` equal-width bins from the row's lowest to highest score, +
    the row's offset (row r has bins r * (bins + 1) + 0..bins, so one bincount serves all rows).
    The map only needs to be monotone in the score (subtraction, multiplication and truncation all
    round monotonically), not exact: ties and near-ties share a bin and are compared exactly."""
    b, g = sim.shape
    lo, hi = sim.amin(1, keepdim=True), sim.amax(1, keepdim=True)
    if bool(hi.isnan().any()):
        raise ValueError("the similarity scores contain NaN")
    width = hi - lo
    scale = bins / width
    # a constant row, or one with an infinite score (or a width past float32), has no usable
    # width: all in one bin, compared exactly
    usable = width.isfinite() & scale.isfinite()
    x = torch.sub(sim, lo.where(usable, 0.0), out=_buffer(scratch, "x", b * g, torch.float32, sim.device).view(b, g))
    x.mul_(scale.where(usable, 0.0))  # in [0, bins] where usable
    if not bool(usable.all()):
        x.nan_to_num_(0.0, 0.0, 0.0)  # inf * 0 in the unusable rows
    keys = _buffer(scratch, "keys", b * g, torch.int32, sim.device).view(b, g).copy_(x)  # truncates
    return keys.add_(torch.arange(b, device=sim.device, dtype=torch.int32)[:, None] * (bins + 1))


def _buffer(scratch: dict, name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """`numel` elements of a flat scratch tensor kept in `scratch`, grown when too small."""
    buf = scratch.get((name, device))
    if buf is None or buf.numel() < numel:
        buf = scratch[(name, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _sparse_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Positions of the True entries of a flat bool tensor (length a multiple of 8) with few of
    them: the 8-byte words holding any first (an eighth of the elements), then their bytes."""
    words = mask.view(torch.int64).nonzero().squeeze(1)
    candidates = (words[:, None] * 8 + torch.arange(8, device=mask.device)).view(-1)
    return candidates[mask.index_select(0, candidates)]


def _higher_in_own_bin(keys: torch.Tensor, scores: torch.Tensor, match_keys: torch.Tensor,
                       match_scores: torch.Tensor) -> torch.Tensor:
    """For each match, the items (`keys`, `scores`) in its bin scoring strictly higher: the items
    ordered by (bin, score) as one int64, then two binary searches per match."""
    order = _bin_and_score(keys, scores).sort().values
    first = torch.searchsorted(order, _bin_and_score(match_keys, match_scores), right=True)
    end = torch.searchsorted(order, (match_keys.long() + 1) << 32)
    return end - first


def _bin_and_score(keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """int64 ordered like (bin, score): the float32 bits made monotone (negative floats count
    down; -0.0 and 0.0 both give 0, a tie as in float), shifted to [0, 2^32), under the bin."""
    bits = scores.contiguous().view(torch.int32).long()
    ordinal = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits) + (1 << 31)
    return (keys.long() << 32) + ordinal


class _Accumulator:
    def __init__(self):
        self.n = 0
        self.hits = {k: 0.0 for k in KS}
        self.ap = self.inp = 0.0

    @_one_thread
    def add(self, ranks: torch.Tensor, valid: torch.Tensor) -> None:
        npos = valid.sum(1)
        first = ranks[:, 0]
        for k in KS:
            self.hits[k] += float((first <= k).sum())
        j = torch.arange(1, ranks.shape[1] + 1, device=ranks.device)[None]
        self.ap += float(((j / ranks) * valid).sum(1).div(npos).sum())
        last = ranks.gather(1, (npos - 1)[:, None])[:, 0]
        self.inp += float((npos / last).sum())
        self.n += ranks.shape[0]

    def result(self) -> dict:
        out = {f"R{k}": 100.0 * self.hits[k] / self.n for k in KS}
        out.update(mAP=100.0 * self.ap / self.n, mINP=100.0 * self.inp / self.n)
        return out


def rows_per_block(gallery_size: int, block_bytes: int) -> int:
    """Queries per block so that a block's working set (~12 bytes per entry) fits block_bytes."""
    return max(1, block_bytes // (12 * max(1, gallery_size)))


def retrieval_metrics(sim: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                      block_bytes: int = BLOCK_BYTES) -> dict:
    """R1, R5, R10, mAP, mINP (percent) of a query x gallery similarity matrix."""
    return blocked_metrics(lambda rows: sim[rows], len(query_pids), query_pids, gallery_pids, block_bytes)


def blocked_metrics(sim_rows: Callable[[slice], torch.Tensor], num_queries: int, query_pids: torch.Tensor,
                    gallery_pids: torch.Tensor, block_bytes: int = BLOCK_BYTES) -> dict:
    """Metrics of a similarity matrix produced block by block by `sim_rows(rows)`."""
    acc, ranking = _Accumulator(), Ranking(query_pids, gallery_pids)
    step = rows_per_block(len(gallery_pids), block_bytes)
    for start in range(0, num_queries, step):
        rows = slice(start, min(start + step, num_queries))
        sim = sim_rows(rows)
        acc.add(*ranking.ranks(sim, rows))
    return acc.result()


def fused_scores(query: dict, gallery: dict, a: float) -> torch.Tensor:
    """[q, g] similarities a * S_global + (1 - a) * S_grab of cosine similarities (S_global alone
    without GRAB); `query` / `gallery` as in `fused_metrics`."""
    def cos(q, g):
        return F.normalize(q.float(), dim=-1) @ F.normalize(g.float(), dim=-1).T

    sim = cos(query["global"], gallery["global"])
    if query.get("grab") is None:
        return sim
    return a * sim + (1 - a) * cos(query["grab"], gallery["grab"])


def fused_metrics(query: dict, gallery: dict, weights: Iterable[float], block_bytes: int = BLOCK_BYTES) -> dict:
    """Metrics of the global, GRAB and fused similarities a * S_global + (1 - a) * S_grab.

    `query` / `gallery`: {"global": [n, E], "grab": [n, G] or None, "pids": [n]}. Returns
    {"global": {...}, "grab": {...}, "fused@a": {...} for each a} (only global without GRAB).
    Each block of queries computes its two similarity blocks once and ranks every weight on them;
    a = 1 and a = 0 reuse the global and GRAB results.
    """
    qg, gg = F.normalize(query["global"].float(), dim=-1), F.normalize(gallery["global"].float(), dim=-1)
    qp, gp, n = query["pids"], gallery["pids"], len(query["pids"])
    has_grab = query.get("grab") is not None
    if has_grab:
        ql, gl = F.normalize(query["grab"].float(), dim=-1), F.normalize(gallery["grab"].float(), dim=-1)
    weights = sorted({float(a) for a in weights}) if has_grab else []
    mixed = [a for a in weights if a not in (0.0, 1.0)]
    acc = {"global": _Accumulator(), **({"grab": _Accumulator()} if has_grab else {}),
           **{fused_key(a): _Accumulator() for a in mixed}}
    step, ranking = rows_per_block(len(gp), block_bytes), Ranking(qp, gp)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        sg = qg[rows] @ gg.T
        acc["global"].add(*ranking.ranks(sg, rows))
        if has_grab:
            sl = ql[rows] @ gl.T
            acc["grab"].add(*ranking.ranks(sl, rows))
            fused, scaled = torch.empty_like(sg), torch.empty_like(sl)  # reused across weights
            for a in mixed:
                torch.mul(sg, a, out=fused).add_(torch.mul(sl, 1 - a, out=scaled))  # a * sg + (1 - a) * sl
                acc[fused_key(a)].add(*ranking.ranks(fused, rows))
    out = {k: v.result() for k, v in acc.items()}
    for a, same in ((0.0, "grab"), (1.0, "global")):
        if a in weights:
            out[fused_key(a)] = out[same]
    return out

"""Text-to-image retrieval metrics (R@1/5/10, mAP, mINP), ranked in blocks of queries.

No Q x G argsort (nor Q x G match matrix) is ever formed. Each query's matches are located once
from the sorted gallery ids; per block of queries their scores are gathered and sorted (a
handful per query); the gallery scores above a query's lowest match (the only ones that can
outrank a match) are placed among them by one `searchsorted`, and a histogram gives, for each
match, how many gallery items score higher. Memory is one block of queries at a time
(`block_bytes`); time is one pass over the scores plus O(K log P) for the K scores that matter.

Definitions (standard TBPS / ReID): the rank of a match is 1 + the number of gallery items with
a strictly higher score. R@k: share of queries whose best match ranks <= k. AP: mean over the
query's matches of (j / rank of its j-th match). INP: (number of matches) / (rank of the last
match). All in percent.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

KS = (1, 5, 10)
BLOCK_BYTES = 256 << 20
"""Default working memory of the blocked ranking (eval.block_mb sets it for training runs)."""


def ranks_of(sim: torch.Tensor, pos: torch.Tensor, npos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of the match scores `pos` [b, P] (sorted descending, -inf padded) within each row of `sim`.

    Only gallery scores above a query's lowest match can outrank any of its matches; for a useful
    model they are a small share of the row, so they are picked out first and placed among the
    match scores of their row with one searchsorted over all rows at once (each row's values and
    thresholds shifted into a range of their own, in float64 so nothing is lost)."""
    b, p = pos.shape
    sim = sim.float()
    lowest = pos.gather(1, (npos - 1).clamp(min=0)[:, None])
    rows, cols = (sim > lowest).nonzero(as_tuple=True)
    values = sim[rows, cols].double()
    lo = float(lowest.min())  # every value and real threshold is >= lo
    span = max(float(values.max()) if len(values) else lo, float(pos.max())) - lo + 1.0
    shift = span * torch.arange(b, device=sim.device, dtype=torch.float64)[:, None] - lo  # row r -> [span r, span r + span - 1]
    # ascending per row; the -inf pads go just below the row's range (they count as below, as before)
    thresholds = pos.flip(1).double().clamp(min=lo - 0.5) + shift
    values = values + shift[rows, 0]
    below = torch.searchsorted(thresholds.reshape(-1), values) - rows * p  # own-row thresholds under each value
    hist = torch.bincount(rows * (p + 1) + below, minlength=b * (p + 1)).view(b, p + 1)
    at_least = hist.flip(1).cumsum(1).flip(1)  # at_least[:, i] = items above >= i thresholds
    ranks = at_least[:, 1:].flip(1) + 1  # match j: items above threshold j, plus one
    valid = torch.arange(p, device=sim.device)[None] < npos[:, None]
    return ranks, valid


class Positives:
    """Where each query's matches are in the gallery, found once by sorting the gallery ids (so a
    block never builds a Q x G match matrix): `scores(sim_block, rows)` gathers them."""

    def __init__(self, query_pids: torch.Tensor, gallery_pids: torch.Tensor):
        query_pids, gallery_pids = query_pids.cpu(), gallery_pids.cpu()  # index work; scores() moves it
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

    def scores(self, sim: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        valid, npos = self.valid[rows].to(sim.device), self.npos[rows].to(sim.device)
        keep = int(npos.max())
        pos = sim.float().gather(1, self.index[rows, :keep].to(sim.device)).masked_fill(~valid[:, :keep], float("-inf"))
        return pos.sort(dim=1, descending=True).values, npos


class _Accumulator:
    def __init__(self):
        self.n = 0
        self.hits = {k: 0.0 for k in KS}
        self.ap = self.inp = 0.0

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
    acc, positives = _Accumulator(), Positives(query_pids, gallery_pids)
    step = rows_per_block(len(gallery_pids), block_bytes)
    for start in range(0, num_queries, step):
        rows = slice(start, min(start + step, num_queries))
        sim = sim_rows(rows)
        acc.add(*ranks_of(sim, *positives.scores(sim, rows)))
    return acc.result()


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
    step, positives = rows_per_block(len(gp), block_bytes), Positives(qp, gp)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        sg = qg[rows] @ gg.T
        acc["global"].add(*ranks_of(sg, *positives.scores(sg, rows)))
        if has_grab:
            sl = ql[rows] @ gl.T
            acc["grab"].add(*ranks_of(sl, *positives.scores(sl, rows)))
            for a in mixed:
                fused = a * sg + (1 - a) * sl
                acc[fused_key(a)].add(*ranks_of(fused, *positives.scores(fused, rows)))
    out = {k: v.result() for k, v in acc.items()}
    for a, same in ((0.0, "grab"), (1.0, "global")):
        if a in weights:
            out[fused_key(a)] = out[same]
    return out


# The results of `fused_metrics` name the fused rows `fused@<a>`: these are the only places that
# build or read that name.


def fused_key(a: float) -> str:
    """The results key of the fused similarity with weight a."""
    return f"fused@{float(a):g}"


def fused_rows(results: dict) -> dict[float, dict]:
    """{a: metrics} of every fused row of `fused_metrics` results."""
    return {float(k.split("@", 1)[1]): v for k, v in results.items() if k.startswith("fused@")}


def fused_at(results: dict, a: float) -> dict:
    """The metrics of the fused similarity with weight a (the global ones when there is no GRAB branch)."""
    return results.get(fused_key(a), results["global"])


def best_fusion(results: dict, metric: str = "R1") -> tuple[float, dict]:
    """(a, metrics) of the fused weight with the highest `metric` (ties: higher mAP, then larger a);
    (1.0, global) without a GRAB branch."""
    fused = fused_rows(results)
    if not fused:
        return 1.0, results["global"]
    a = max(fused, key=lambda w: (fused[w][metric], fused[w]["mAP"], w))
    return a, fused[a]

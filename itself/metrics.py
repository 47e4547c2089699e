"""Text-to-image retrieval metrics (R@1/5/10, mAP, mINP), ranked in blocks of queries.

No Q x G argsort is ever formed. For each query, the ranks of its matches are counted directly:
with the match scores sorted (a handful per query), one `searchsorted` places every gallery
score among them, and a histogram gives, for each match, how many gallery items score higher.
Memory is one block of queries at a time (`block_bytes`); time is O(Q G log P) for P matches.

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


def match_ranks(sim: torch.Tensor, match: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks [b, P], valid [b, P]): 1-based ranks of each query's matches, best first."""
    npos = match.sum(1)
    if bool((npos == 0).any()):
        raise ValueError(f"{int((npos == 0).sum())} queries have no matching gallery item (person id)")
    p = int(npos.max())
    sim = sim.float()
    pos = sim.masked_fill(~match, float("-inf")).topk(p, dim=1).values  # descending, -inf padded
    thresholds = pos.flip(1).contiguous()  # ascending
    bucket = torch.searchsorted(thresholds, sim.contiguous())  # thresholds strictly below each score
    hist = torch.zeros(sim.shape[0], p + 1, dtype=torch.long, device=sim.device)
    hist.scatter_add_(1, bucket, torch.ones_like(bucket))
    at_least = hist.flip(1).cumsum(1).flip(1)  # at_least[:, i] = items above >= i thresholds
    ranks = at_least[:, 1:].flip(1) + 1  # match j: items above threshold j, plus one
    valid = torch.arange(p, device=sim.device)[None] < npos[:, None]
    return ranks, valid


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
    """Queries per block so that a block's working set (~16 bytes per entry) fits block_bytes."""
    return max(1, block_bytes // (16 * max(1, gallery_size)))


def retrieval_metrics(sim: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                      block_bytes: int = 256 << 20) -> dict:
    """R1, R5, R10, mAP, mINP (percent) of a query x gallery similarity matrix."""
    return blocked_metrics(lambda rows: sim[rows], len(query_pids), query_pids, gallery_pids, block_bytes)


def blocked_metrics(sim_rows: Callable[[slice], torch.Tensor], num_queries: int, query_pids: torch.Tensor,
                    gallery_pids: torch.Tensor, block_bytes: int = 256 << 20) -> dict:
    """Metrics of a similarity matrix produced block by block by `sim_rows(rows)`."""
    acc = _Accumulator()
    step = rows_per_block(len(gallery_pids), block_bytes)
    for start in range(0, num_queries, step):
        rows = slice(start, min(start + step, num_queries))
        sim = sim_rows(rows)
        acc.add(*match_ranks(sim, query_pids[rows, None].to(sim.device) == gallery_pids[None].to(sim.device)))
    return acc.result()


def fused_metrics(query: dict, gallery: dict, weights: Iterable[float], block_bytes: int = 256 << 20) -> dict:
    """Metrics of the global, GRAB and fused similarities a * S_global + (1 - a) * S_grab.

    `query` / `gallery`: {"global": [n, E], "grab": [n, G] or None, "pids": [n]}. Returns
    {"global": {...}, "grab": {...}, "fused@a": {...} for each a} (only global without GRAB).
    """
    qg, gg = F.normalize(query["global"].float(), dim=-1), F.normalize(gallery["global"].float(), dim=-1)
    qp, gp, n = query["pids"], gallery["pids"], len(query["pids"])
    out = {"global": blocked_metrics(lambda r: qg[r] @ gg.T, n, qp, gp, block_bytes)}
    if query.get("grab") is None:
        return out
    ql, gl = F.normalize(query["grab"].float(), dim=-1), F.normalize(gallery["grab"].float(), dim=-1)
    out["grab"] = blocked_metrics(lambda r: ql[r] @ gl.T, n, qp, gp, block_bytes)
    for a in weights:
        out[f"fused@{a:g}"] = blocked_metrics(lambda r, a=a: a * (qg[r] @ gg.T) + (1 - a) * (ql[r] @ gl.T),
                                              n, qp, gp, block_bytes)
    return out

"""Retrieval metrics against hand-computed rankings, a naive full-argsort reference and the
definitions read literally (ties, uniform random scores, many matches, edge cases)."""

from __future__ import annotations

import pytest
import torch

import itself.metrics
from itself.metrics import fused_metrics, retrieval_metrics


def naive_metrics(sim, qp, gp):
    """The textbook definition: sort every row of the full matrix."""
    order = sim.argsort(dim=1, descending=True, stable=True)
    match = qp[:, None] == gp[order]
    first = match.float().argmax(1) + 1
    out = {f"R{k}": 100 * float((first <= k).float().mean()) for k in (1, 5, 10)}
    hits = match.cumsum(1)
    positions = torch.arange(1, sim.shape[1] + 1)
    out["mAP"] = 100 * float((((hits / positions) * match).sum(1) / match.sum(1)).mean())
    last = sim.shape[1] - match.flip(1).float().argmax(1)
    out["mINP"] = 100 * float((match.sum(1) / last).mean())
    return out


def literal_metrics(sim, qp, gp):
    """The definitions, one query at a time: a match ranks 1 + the gallery items scoring strictly
    higher (a tie does not outrank), its matches taken best first."""
    hits, ap, inp = {k: 0 for k in (1, 5, 10)}, 0.0, 0.0
    for row, pid in zip(sim, qp.tolist()):
        matches = row[gp == pid].sort(descending=True).values
        ranks = [1 + int((row > s).sum()) for s in matches]
        for k in hits:
            hits[k] += ranks[0] <= k
        ap += sum(j / r for j, r in enumerate(ranks, 1)) / len(ranks)
        inp += len(ranks) / ranks[-1]
    n = len(qp)
    return {**{f"R{k}": 100 * h / n for k, h in hits.items()}, "mAP": 100 * ap / n, "mINP": 100 * inp / n}


def assert_same(ours, reference):
    for key in reference:
        assert ours[key] == pytest.approx(reference[key], abs=1e-4), key


def random_case(scores: str, queries=40, gallery=300, ids=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    gp = torch.cat([torch.arange(ids), torch.randint(0, ids, (gallery - ids,), generator=g)])
    qp = gp[torch.randint(0, gallery, (queries,), generator=g)]
    match = (qp[:, None] == gp[None]).float()
    sim = {"uniform": lambda: torch.rand(queries, gallery, generator=g),
           "model": lambda: torch.randn(queries, gallery, generator=g) + 1.5 * match,
           # 5 values only: most items tie with some match, matches tie with each other
           "ties": lambda: torch.randint(0, 5, (queries, gallery), generator=g).float() / 4,
           # zeros of both signs, +-inf and the float32 extremes (a range past float32), among ties
           "extreme values": lambda: torch.tensor([0.0, -0.0, 1.0, -1.0, 3e38, -3e38, float("inf"), float("-inf")])[
               torch.randint(0, 8, (queries, gallery), generator=g)],
           "constant rows": lambda: torch.ones(queries, gallery)}[scores]()
    return sim, qp, gp


CASES = ["uniform", "model", "ties", "extreme values", "constant rows"]


@pytest.mark.parametrize("scores", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_definitions(scores, seed):
    sim, qp, gp = random_case(scores, seed=seed)
    assert_same(retrieval_metrics(sim, qp, gp), literal_metrics(sim, qp, gp))


@pytest.mark.parametrize("scores", CASES)
def test_many_matches_per_query(scores):
    sim, qp, gp = random_case(scores, queries=30, gallery=400, ids=4)  # ~100 matches per query
    assert_same(retrieval_metrics(sim, qp, gp), literal_metrics(sim, qp, gp))


@pytest.mark.parametrize("scores", CASES)
def test_chunks_and_bins_do_not_change_the_result(scores, monkeypatch):
    """A chunk of a few rows, and bins from one item each to one bin for the whole row."""
    sim, qp, gp = random_case(scores, queries=50, gallery=120, ids=12, seed=3)
    reference = literal_metrics(sim, qp, gp)
    for chunk, items_per_bin in ((120 * 3, 1), (120 * 7, 4), (1, 1000)):
        monkeypatch.setitem(itself.metrics.CHUNK_SCORES, "cpu", chunk)
        monkeypatch.setattr(itself.metrics, "ITEMS_PER_BIN", items_per_bin)
        assert_same(retrieval_metrics(sim, qp, gp, block_bytes=120 * 12 * 20), reference)


def test_single_item_gallery():
    sim = torch.tensor([[0.3], [-2.0], [0.0]])
    m = retrieval_metrics(sim, torch.tensor([7, 7, 7]), torch.tensor([7]))
    assert m == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100.0, "mINP": 100.0}


def test_ties_do_not_outrank():
    # query 0: its match ties with two others -> rank 1; query 1: one item strictly above -> rank 2
    sim = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.2, 0.9, 0.2, 0.2]])
    m = retrieval_metrics(sim, torch.tensor([0, 0]), torch.tensor([0, 1, 2, 3]))
    assert m["R1"] == 50.0 and m["mAP"] == pytest.approx(100 * (1 + 1 / 2) / 2)


def test_nan_scores_are_an_error():
    sim = torch.tensor([[0.1, float("nan")]])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(sim, torch.tensor([0]), torch.tensor([0, 1]))


def test_hand_computed_rankings():
    gallery = torch.tensor([0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # 12 images
    sim = torch.tensor([
        # query 0 (pid 1): matches (gallery 1, 2) ranked 1st and 3rd
        [0.5, 0.9, 0.7, 0.8, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6],
        # query 1 (pid 0): its only match ranked 6th
        [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0, -0.1, -0.2, -0.3, -0.4, -0.5],
        # query 2 (pid 1): both matches ranked last (11th and 12th)
        [0.9, -0.9, -0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
    ])
    m = retrieval_metrics(sim, torch.tensor([1, 0, 1]), gallery)
    assert m["R1"] == pytest.approx(100 / 3)
    assert m["R5"] == pytest.approx(100 / 3)
    assert m["R10"] == pytest.approx(200 / 3)
    ap = [(1 / 1 + 2 / 3) / 2, 1 / 6, (1 / 11 + 2 / 12) / 2]
    assert m["mAP"] == pytest.approx(100 * sum(ap) / 3)
    inp = [2 / 3, 1 / 6, 2 / 12]
    assert m["mINP"] == pytest.approx(100 * sum(inp) / 3)


@pytest.mark.parametrize("block_bytes", [1, 4096, 256 << 20])
def test_blocked_ranking_equals_the_unblocked_reference(block_bytes):
    g = torch.Generator().manual_seed(0)
    qp = torch.randint(0, 50, (300,), generator=g)
    gp = torch.cat([torch.arange(50), torch.randint(0, 50, (150,), generator=g)])
    sim = torch.randn(300, 200, generator=g) + 1.5 * (qp[:, None] == gp[None]).float()
    ours, reference = retrieval_metrics(sim, qp, gp, block_bytes=block_bytes), naive_metrics(sim, qp, gp)
    for key in reference:
        assert ours[key] == pytest.approx(reference[key], abs=1e-4), key


def test_query_without_any_match_is_an_error():
    with pytest.raises(ValueError, match="1 queries have no matching gallery item"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 9]), torch.tensor([0, 1, 2]))


def test_fused_metrics_cover_global_grab_and_every_weight():
    g = torch.Generator().manual_seed(1)
    pids = torch.arange(20)
    q = {"global": torch.randn(20, 8, generator=g), "grab": torch.randn(20, 16, generator=g), "pids": pids}
    gal = {"global": q["global"] + 0.1 * torch.randn(20, 8, generator=g), "grab": torch.randn(20, 16, generator=g),
           "pids": pids}
    out = fused_metrics(q, gal, (0.0, 0.5, 1.0))
    assert set(out) == {"global", "grab", "fused@0", "fused@0.5", "fused@1"}
    assert out["fused@1"] == out["global"] and out["fused@0"] == out["grab"]
    assert out["global"]["R1"] == 100.0

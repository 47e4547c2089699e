"""Retrieval metrics against hand-computed rankings and a naive full-argsort reference."""

from __future__ import annotations

import pytest
import torch

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

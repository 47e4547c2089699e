"""Retrieval metrics: our blocked ranking against a naive full-argsort implementation, in one
process, on the same random similarities. Prints whether the outputs are identical, the time
ratio and the extra peak memory of each.

    python bench/eval_bench.py            # CUHK-PEDES scale (6,156 x 3,074) and ICFG-PEDES (19,848 x 19,848)
    python bench/eval_bench.py --quick    # small sizes (the test runs this)
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import PeakRSS, gib  # noqa: E402
from itself.metrics import fused_metrics, retrieval_metrics  # noqa: E402

# (queries, gallery, identities, embedding noise). Noise 1.3 gives the metric levels published for
# ICFG-PEDES (mAP ~42, mINP ~5); 1.5 is a weaker model (mAP ~21), where more of each row can
# outrank a match and our ranking has more to do.
SCALES = {"CUHK-PEDES": (6156, 3074, 1000, 1.3), "ICFG-PEDES": (19848, 19848, 1000, 1.3),
          "ICFG-PEDES, weaker model": (19848, 19848, 1000, 1.5)}
QUICK = {"quick": (600, 300, 100, 1.3)}


def naive_metrics(sim: torch.Tensor, qp: torch.Tensor, gp: torch.Tensor) -> dict:
    """What research code does: argsort the full Q x G matrix, then read the ranks off it."""
    order = sim.argsort(dim=1, descending=True, stable=True)
    match = qp[:, None] == gp[order]
    first = match.float().argmax(1) + 1
    out = {f"R{k}": 100 * float((first <= k).float().mean()) for k in (1, 5, 10)}
    hits = match.cumsum(1)
    positions = torch.arange(1, sim.shape[1] + 1, device=sim.device)
    out["mAP"] = 100 * float((((hits / positions) * match).sum(1) / match.sum(1)).mean())
    last = sim.shape[1] - match.flip(1).float().argmax(1)
    out["mINP"] = 100 * float((match.sum(1) / last).mean())
    return out


def problem(q: int, g: int, ids: int, noise: float = 1.3, dim: int = 64, seed: int = 0):
    """Random embeddings with identity structure (each query near its identity), as float32."""
    gen = torch.Generator().manual_seed(seed)
    gp = torch.cat([torch.arange(ids), torch.randint(0, ids, (g - ids,), generator=gen)])
    qp = gp[torch.randint(0, g, (q,), generator=gen)]
    centres = torch.randn(ids, dim, generator=gen)
    emb = lambda p: centres[p] + noise * torch.randn(len(p), dim, generator=gen)  # noqa: E731
    return emb(qp), emb(gp), qp, gp


def compare(name: str, q: int, g: int, ids: int, noise: float, device: str = "cpu") -> bool:
    qe, ge, qp, gp = (t.to(device) for t in problem(q, g, ids, noise))
    sim = torch.nn.functional.normalize(qe, dim=-1) @ torch.nn.functional.normalize(ge, dim=-1).T
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gc.collect()
    with PeakRSS() as ours_m:
        ours = retrieval_metrics(sim, qp, gp)
        sync()
    gc.collect()
    with PeakRSS() as naive_m:
        naive = naive_metrics(sim, qp, gp)
        sync()
    same = all(abs(ours[k] - naive[k]) < 1e-3 for k in naive)
    print(f"{name}: {q} queries x {g} gallery ({ids} identities, noise {noise})")
    print(f"  outputs identical: {same}   ours {ours}")
    print(f"  ours  {ours_m.seconds:8.2f} s  extra peak {gib(ours_m.extra)}")
    print(f"  naive {naive_m.seconds:8.2f} s  extra peak {gib(naive_m.extra)}")
    print(f"  speed-up x{naive_m.seconds / ours_m.seconds:.1f}, memory {naive_m.extra / max(ours_m.extra, 1):.1f}x less")
    return same


def compare_fusion(name: str, q: int, g: int, ids: int, noise: float, weights=tuple(i / 10 for i in range(11))) -> bool:
    """All fusion weights: similarity blocks computed once per query block vs a full ranking per weight."""
    qe, ge, qp, gp = problem(q, g, ids, noise)
    ql, gl = problem(q, g, ids, noise, seed=1)[:2]
    with PeakRSS() as ours_m:
        ours = fused_metrics({"global": qe, "grab": ql, "pids": qp}, {"global": ge, "grab": gl, "pids": gp}, weights)
    n = torch.nn.functional.normalize
    with PeakRSS() as naive_m:
        sg, sl = n(qe, dim=-1) @ n(ge, dim=-1).T, n(ql, dim=-1) @ n(gl, dim=-1).T
        naive = {f"fused@{a:g}": naive_metrics(a * sg + (1 - a) * sl, qp, gp) for a in weights}
    same = all(abs(ours[k][m] - naive[k][m]) < 1e-3 for k in naive for m in naive[k])
    print(f"{name}, {len(weights)} fusion weights: identical {same}; ours {ours_m.seconds:.2f} s "
          f"({gib(ours_m.extra)}), naive {naive_m.seconds:.2f} s ({gib(naive_m.extra)}): "
          f"x{naive_m.seconds / ours_m.seconds:.1f}")
    return same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the ranking comparison; fusion runs on CPU)")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    scales = QUICK if args.quick else SCALES
    ok = all(compare(name, *size, device=args.device) for name, size in scales.items())
    first = next(iter(scales.items()))
    ok &= compare_fusion(*first[:1], *first[1])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

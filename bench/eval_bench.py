"""Retrieval metrics: our ranking against a naive full-argsort implementation, in one process, on
the same similarities. Prints whether the outputs are identical, the time ratio and the extra
peak memory of each, at the published difficulty and with uniform random scores.

    python bench/eval_bench.py            # CUHK-PEDES scale (6,156 x 3,074) and ICFG-PEDES (19,848 x 19,848)
    python bench/eval_bench.py --quick    # small sizes (the test runs this)
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import PeakRSS, gib  # noqa: E402
from itself.metrics import fused_metrics, retrieval_metrics  # noqa: E402

# (queries, gallery, identities, scores). Scores are either the cosine similarities of noisy
# embeddings, the number being the noise: 1.3 gives the metric levels published for ICFG-PEDES
# (mAP ~42, mINP ~5), 1.5 a weaker model (mAP ~21); or "uniform": drawn uniformly at random, a
# model that has learnt nothing (early training), where nearly all of each row lies above a
# query's worst match.
SCALES = {"CUHK-PEDES": (6156, 3074, 1000, 1.3),
          "ICFG-PEDES, published difficulty": (19848, 19848, 1000, 1.3),
          "ICFG-PEDES, weaker model": (19848, 19848, 1000, 1.5),
          "ICFG-PEDES, uniform random scores": (19848, 19848, 1000, "uniform")}
QUICK = {"quick": (600, 300, 100, 1.3), "quick, uniform random scores": (600, 300, 100, "uniform")}
# The targets at ICFG-PEDES scale: speed-up over the naive ranking, extra memory.
TARGETS = {"ICFG-PEDES, published difficulty": 20.0, "ICFG-PEDES, uniform random scores": 5.0}
MEMORY_TARGET = 2 << 30


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


def similarities(q: int, g: int, ids: int, scores, device: str = "cpu"):
    """Query x gallery scores (float32) and the identities of both sides."""
    qe, ge, qp, gp = problem(q, g, ids, 1.3 if scores == "uniform" else scores)
    if scores == "uniform":
        sim = torch.rand(q, g, generator=torch.Generator().manual_seed(2))
    else:
        sim = torch.nn.functional.normalize(qe, dim=-1) @ torch.nn.functional.normalize(ge, dim=-1).T
    return sim.to(device), qp.to(device), gp.to(device)


class OtherLoad:
    """`with OtherLoad() as o: ...` -> o.share: the share of the machine's CPU time that other
    processes used meanwhile (on a shared machine, what tells a disturbed timing)."""

    def __enter__(self):
        self._own, self._all = psutil.Process().cpu_times(), psutil.cpu_times()
        return self

    def __exit__(self, *exc):
        own, all_ = psutil.Process().cpu_times(), psutil.cpu_times()
        busy = lambda t: sum(t) - t.idle - getattr(t, "iowait", 0.0)  # noqa: E731
        own_used = (own.user + own.system) - (self._own.user + self._own.system)
        total = sum(all_) - sum(self._all)
        self.share = max(0.0, busy(all_) - busy(self._all) - own_used) / max(total, 1e-9)


def compare(name: str, q: int, g: int, ids: int, scores, device: str = "cpu") -> dict:
    sim, qp, gp = similarities(q, g, ids, scores, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gc.collect()
    with PeakRSS() as ours_m, OtherLoad() as ours_o:
        ours = retrieval_metrics(sim, qp, gp)
        sync()
    gc.collect()
    with PeakRSS() as naive_m, OtherLoad() as naive_o:
        naive = naive_metrics(sim, qp, gp)
        sync()
    same = all(abs(ours[k] - naive[k]) < 1e-3 for k in naive)
    speedup = naive_m.seconds / ours_m.seconds
    print(f"{name}: {q} queries x {g} gallery ({ids} identities, scores: "
          f"{'uniform random' if scores == 'uniform' else f'embedding noise {scores}'})")
    print(f"  outputs identical: {same}   ours {ours}")
    for label, m, o in (("ours ", ours_m, ours_o), ("naive", naive_m, naive_o)):
        print(f"  {label} {m.seconds:8.2f} s  extra peak {gib(m.extra)}  (other processes: {o.share:.0%} of the CPU)")
    print(f"  speed-up x{speedup:.1f}", flush=True)  # no memory ratio: ours reads ~0 when it reuses freed memory
    return {"name": name, "same": same, "speedup": speedup, "extra": ours_m.extra}


def summary(rows: list[dict]) -> None:
    """The target rows, met or not."""
    for row in rows:
        if row["name"] in TARGETS:
            target = TARGETS[row["name"]]
            met = row["speedup"] >= target and row["extra"] <= MEMORY_TARGET and row["same"]
            print(f"target {row['name']}: >= x{target:g} and <= {gib(MEMORY_TARGET)} extra: "
                  f"x{row['speedup']:.1f}, {gib(row['extra'])} -> {'met' if met else 'NOT met'}")


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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (our ranking passes: 1), device {args.device}")
    scales = QUICK if args.quick else SCALES
    rows = [compare(name, *size, device=args.device) for name, size in scales.items()]
    summary(rows)
    ok = all(row["same"] for row in rows)
    name, (q, g, ids, noise) = next(iter(scales.items()))
    ok &= compare_fusion(name, q, g, ids, noise)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

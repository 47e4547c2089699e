"""Reading evaluation results without torch (a run folder's readers, Tune's driver and workers,
the launchers): `itself.metrics.fused_metrics` writes one row per fusion weight a as `fused@<a>`,
and these are the only places that build or read that name; and the chance level of R@1."""

from __future__ import annotations


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


def chance_r1(info: dict, split: str) -> float:
    """R@1 of a random ranking: the share of the gallery that matches a query, about 1 / identities."""
    return 100.0 / info["splits"][split]["identities"]

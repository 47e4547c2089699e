"""The search's results: one row per configuration, mean and spread over its seeds, ranked by the
mean; the confirmation runs merged in; the metric against each parameter with error bars."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pandas as pd

from tune.failures import failures_of
from tune.trial import seed_column, trial_params

RANKED = ("val_R1", "val_mAP")
"""The metrics a search can rank by (--metric R1 / mAP)."""


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN with one value: no spread is known)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def seed_bests(history: pd.DataFrame, seeds: list[int], metric: str) -> dict[int, dict]:
    """Per seed, its best evaluation by `metric` (as each run keeps its best checkpoint): the
    value of every searched metric there."""
    bests = {}
    for seed in seeds:
        column = seed_column(seed, metric)
        if column not in history or history[column].isna().all():
            continue
        best = history.loc[history[column].idxmax()]
        bests[seed] = {m: float(best[seed_column(seed, m)]) for m in RANKED} | {"epoch": int(best["epoch"])}
    return bests


def _nodes(history: pd.DataFrame) -> str:
    """Where the trial ran, in order: `name(node id prefix)` per node, `->` where it moved."""
    if "node" not in history:
        return ""
    places = [f"{n}({i[:8]})" for n, i in zip(history["node"], history["node_id"])]
    return " -> ".join(p for k, p in enumerate(places) if k == 0 or p != places[k - 1])


def trial_rows(results, seeds: list[int], metric: str, searched: list[str], max_evaluations: int,
               exp_dir: Path) -> pd.DataFrame:
    """One row per trial: its parameters, each seed's best `metric` and the mean and spread of the
    seeds' bests (R1 and mAP at each seed's best evaluation by `metric`), evaluations reached (fewer
    than `max_evaluations`: stopped early), where it ran, its failed attempts."""
    failures = failures_of(exp_dir)
    rows = []
    for r in results:
        history = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        if "epoch" in history:  # (an evaluation Tune had logged but not saved is reported again on resume)
            history = history.drop_duplicates(subset="epoch", keep="last")
        trial_id = history["trial_id"].iloc[-1] if not history.empty else (r.metrics or {}).get("trial_id")
        params = trial_params(r.config)
        bests = seed_bests(history, list(params.get("seeds", seeds)), metric) if not history.empty else {}
        row = {"trial_id": trial_id, **{k: params.get(k) for k in searched}, "seeds": len(bests),
               "seed_list": list(bests)}
        for m in RANKED:
            row[f"{m}_per_seed"] = [b[m] for b in bests.values()]
            row[f"{m}_mean"], row[f"{m}_std"] = mean_and_spread(row[f"{m}_per_seed"])
        row["best_epochs"] = [b["epoch"] for b in bests.values()]
        evaluations = int(history["training_iteration"].max()) if bests else 0
        row["evaluations"] = evaluations
        row["stopped_early"] = bool(bests) and r.error is None and evaluations < max_evaluations
        row["confirmed"] = False
        row["nodes"] = _nodes(history) if bests else ""
        failed = failures.get(trial_id, [])
        row["failures"] = len(failed)
        row["failure"] = "; ".join(f"{f['node']}: {f['error']}" + (" (retried)" if f["retried"] else "")
                                   for f in failed)
        row["error"] = "" if r.error is None else str(r.error).splitlines()[0][:200]
        rows.append(row)
    return pd.DataFrame(rows)


def merge_confirmation(table: pd.DataFrame, confirmed: pd.DataFrame) -> pd.DataFrame:
    """Add the confirmation seeds to the configurations they re-ran. A search trial's own seeds count
    when it ran every evaluation (the same protocol); one stopped early contributes none."""
    rows = {row["trial_id"]: row for row in table.to_dict("records")}
    for extra in confirmed.to_dict("records"):
        row = rows[extra["source_trial"]]
        own = not row["stopped_early"] and not row["error"]
        for column in ("seed_list", "best_epochs", *(f"{m}_per_seed" for m in RANKED)):
            row[column] = (list(row[column]) if own else []) + list(extra[column])
        for m in RANKED:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_and_spread(row[f"{m}_per_seed"])
        row["seeds"], row["confirmed"] = len(row["seed_list"]), True
        row["failures"] += extra["failures"]
        row["failure"] = "; ".join(filter(None, [row["failure"], extra["failure"]]))
    return pd.DataFrame(list(rows.values()))


def ranked(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Confirmed configurations first, then by the mean over seeds, best first."""
    return table.sort_values(["confirmed", f"{metric}_mean"], ascending=False, na_position="last").reset_index(drop=True)


def plot(table: pd.DataFrame, metric: str, searched: list[str], paper: dict, path: Path, title: str) -> None:
    """`metric` (mean over seeds, error bar one standard deviation) against each searched parameter,
    coloured by the evaluations each trial reached; the paper's values marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(searched), figsize=(4 * len(searched) + 1, 3.4), squeeze=False,
                             constrained_layout=True)
    mean, spread = table[f"{metric}_mean"], table[f"{metric}_std"].fillna(0.0)
    for ax, name in zip(axes[0], searched):
        x = table[name].astype(str) if name == "mars_layers" else table[name]
        ax.errorbar(x, mean, yerr=spread, fmt="none", ecolor="grey", elinewidth=1, capsize=3)
        points = ax.scatter(x, mean, c=table["evaluations"], cmap="viridis", zorder=3,
                            edgecolors=["red" if c else "none" for c in table["confirmed"]])
        if name in paper:
            ax.axvline(paper[name], color="grey", ls="--", lw=1)
        ax.set_xlabel(name)
        ax.set_ylabel(f"{metric} (%), mean ± sd over seeds")
    fig.colorbar(points, ax=axes[0].tolist(), label="evaluations reached (ASHA)")
    fig.suptitle(f"{title}  (red edge: confirmed with extra seeds)" if table["confirmed"].any() else title)
    fig.savefig(path, dpi=100)
    plt.close(fig)

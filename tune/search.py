"""Hyper-parameter search with Ray Tune over ITSELF training: `python tune/search.py`.

Searches the ATS keep ratios p_start and p_end (always p_end <= p_start) and the MARS discard
ratio (and, with --search-layers, the MARS layers), centred on the paper's 0.65 / 0.5 / 0.25 (the
paper's point is the first trial). Every trial trains its configuration with --seeds seeds
(itself/train.py processes, under torchrun with --gpus-per-trial > 1) and reports each val
evaluation's mean over them to Tune, with their checkpoints.

Decisions wait for signal (tune/rungs.py): ASHA's first rung is the first evaluation after warm-up
and the ATS horizon (derived from the config; --grace-period overrides), and a rung whose trials
are all within noise of chance stops nobody. --confirm-top K re-trains the K best configurations
with --confirm-seeds more seeds; results rank by the mean over seeds and show the spread.

A failed trial, or one whose node died, is retried from its last checkpoint (--max-failures) on any
node; an interrupted or killed search continues with --resume. --address joins a Ray cluster
(cluster_configs/ray/ starts one inside a SLURM allocation).

With the synthetic preset and no train.epochs override, trials train 8 epochs (a small search:
with --seeds 2, about 16 minutes on 2 CPU cores; docs/TUNING.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tune/search.py`: this checkout's packages, not tune/'s files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import copy
import json
import os
import tempfile

import yaml

from itself.config import Config, ConfigError, ModelConfig, config_yaml, from_dict, to_dict
from itself.rundir import timestamped
from itself.errors import UserError
from itself.presets import PRESETS, resolve_config
from tune import rungs, table
from tune.trial import apply_params, node_name, run_trial, trial_params, worker_env

PAPER = {k: getattr(ModelConfig(), k) for k in ("p_start", "p_end", "discard_ratio")}  # the defaults
RANGES = {"p_start": (0.5, 0.8), "p_end": (0.35, None), "discard_ratio": (0.1, 0.4)}  # p_end's top is p_start
SMALL_SEARCH = ["train.epochs=8", "train.warmup_epochs=1", "model.t_small=3"]
SETTINGS = "search.json"
BASE_CONFIG = "base_config.yaml"
DECISIONS = "asha.jsonl"
CONFIRM = "confirm"


# ----------------------------------------------------------------------------------- space


def layer_choices(arch: str) -> list[str]:
    """MARS layer pairs to try: each middle layer with the last one ("4,11" for ViT-B)."""
    from itself.archs import arch_spec

    last = arch_spec(arch).layers - 1
    return [f"{m},{last}" for m in range(1, last)]


class OptunaSpace:
    """Define-by-run space for Optuna: p_end's upper bound is the sampled p_start. (A class, not a
    closure: Tune pickles the searcher with its space to resume.)"""

    def __init__(self, layers: list[str] | None):
        self.layers = layers

    def __call__(self, trial) -> None:
        p_start = trial.suggest_float("p_start", *RANGES["p_start"])
        trial.suggest_float("p_end", RANGES["p_end"][0], p_start)
        trial.suggest_float("discard_ratio", *RANGES["discard_ratio"])
        if self.layers:
            trial.suggest_categorical("mars_layers", self.layers)


# ----------------------------------------------------------------------------------- settings


def derive_settings(args, base: Config) -> dict:
    """Everything the search decides before its first trial, written to search.json: a resumed
    search reads it back, so it continues with the same seeds, rungs and noise floor."""
    from itself.data import ensure_dataset
    from itself.evaluate import chance_r1

    world = max(1, args.gpus_per_trial)
    info = ensure_dataset(base.data.root)
    spe = rungs.steps_per_epoch(base, world)
    max_evaluations = rungs.evaluations(base)
    derived = rungs.grace_evaluations(base, spe)
    grace = min(args.grace_period, max_evaluations) if args.grace_period else derived
    seeds = [base.seed + i for i in range(args.seeds)]
    chance, queries = chance_r1(info, "val"), info["splits"]["val"]["captions"]
    return {
        "metric": f"val_{args.metric}", "searcher": args.searcher, "num_samples": args.num_samples,
        "searcher_seed": args.seed, "searched": ["p_start", "p_end", "discard_ratio"] + (
            ["mars_layers"] if args.search_layers else []),
        "seeds": seeds, "confirm_top": args.confirm_top,
        "confirm_seeds": [seeds[-1] + 1 + i for i in range(args.confirm_seeds)],
        "gpus_per_trial": args.gpus_per_trial, "cpus_per_trial": args.cpus_per_trial,
        "max_failures": args.max_failures, "reduction_factor": args.reduction_factor,
        "max_evaluations": max_evaluations, "grace_period": grace, "derived_grace_period": derived,
        "steps_per_epoch": spe, "signal_onset_epochs": rungs.signal_onset_epochs(base, spe),
        "val_chance_R1": chance, "val_queries": queries,
        "signal_floor_R1": rungs.chance_floor(chance, queries, len(seeds)),
    }


def describe_rungs(s: dict, base: Config) -> str:
    how = ("--grace-period" if s["grace_period"] != s["derived_grace_period"] else
           f"derived: warm-up {base.train.warmup_epochs:g} epochs, ATS keep ratio at p_end after "
           f"{s['signal_onset_epochs']:.3g} epochs ({base.model.ats}, t_small {base.model.t_small}, "
           f"{s['steps_per_epoch']} steps/epoch), val every {base.eval.every} epoch(s)")
    return (f"ASHA: first decision at evaluation {s['grace_period']} of {s['max_evaluations']} ({how}); "
            f"no trial is stopped at a rung whose val R@1 are all <= {s['signal_floor_R1']:.2f}% "
            f"(chance {s['val_chance_R1']:.2f}% + {rungs.SIGNAL_Z:g} standard errors over "
            f"{s['val_queries']} queries x {len(s['seeds'])} seed(s))")


# ----------------------------------------------------------------------------------- phases


def _trainable(base: Config, exp_dir: Path, s: dict):
    from ray import tune

    def resources(config: dict) -> dict:
        demand = seeds_demand(s, len(trial_params(config).get("seeds", s["seeds"])))
        return {"cpu": demand["CPU"], "gpu": demand["GPU"]}

    return tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(base), exp_dir=str(exp_dir), seeds=s["seeds"],
                             gpus_per_trial=s["gpus_per_trial"], cpus_per_trial=s["cpus_per_trial"]), resources)


def _run_config(name: str, storage: Path, s: dict):
    from ray import tune

    from tune.failures import FailureLog

    return tune.RunConfig(name=name, storage_path=str(storage), verbose=1,
                          failure_config=tune.FailureConfig(max_failures=s["max_failures"]),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                          callbacks=[FailureLog(storage / name)])


def _fit(exp_dir: Path, trainable, new_tuner):
    """Continue the experiment in `exp_dir` if it was started (finished trials are kept), else start
    it with `new_tuner()`; returns its results."""
    from ray import tune

    if (exp_dir / "tuner.pkl").exists():
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = new_tuner()
    return tuner.fit()


def search_phase(exp_dir: Path, base: Config, s: dict):
    from ray import tune

    trainable = _trainable(base, exp_dir, s)

    def new_tuner():
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        layers = layer_choices(base.model.arch) if "mars_layers" in s["searched"] else None
        first = dict(PAPER, **({"mars_layers": layers[min(len(layers) - 1, 3)]} if layers else {}))
        sampler = (optuna.samplers.TPESampler(seed=s["searcher_seed"]) if s["searcher"] == "optuna"
                   else optuna.samplers.RandomSampler(seed=s["searcher_seed"]))
        searcher = OptunaSearch(space=OptunaSpace(layers), metric=s["metric"], mode="max", points_to_evaluate=[first],
                                sampler=sampler)
        scheduler = rungs.SignalASHA(
            floor=s["signal_floor_R1"], decisions=exp_dir / DECISIONS, time_attr="training_iteration",
            max_t=s["max_evaluations"], grace_period=s["grace_period"], reduction_factor=s["reduction_factor"])
        return tune.Tuner(trainable, run_config=_run_config(exp_dir.name, exp_dir.parent, s),
                          tune_config=tune.TuneConfig(metric=s["metric"], mode="max", num_samples=s["num_samples"],
                                                      search_alg=searcher, scheduler=scheduler))

    return _fit(exp_dir, trainable, new_tuner)


def confirm_phase(exp_dir: Path, base: Config, s: dict, ranking):
    """Re-train the top `confirm_top` configurations of the `ranking` table with the confirmation
    seeds, every evaluation (no early stopping), as the experiment `<exp_dir>/confirm`."""
    from ray import tune

    top = ranking.dropna(subset=[f"{s['metric']}_mean"]).head(s["confirm_top"])
    points = [{**{k: row[k] for k in s["searched"]}, "seeds": s["confirm_seeds"], "source_trial": row["trial_id"]}
              for row in top.to_dict("records")]
    confirm_dir = exp_dir / CONFIRM
    trainable = _trainable(base, confirm_dir, s)
    print(f"confirming the top {len(points)} configuration(s) with seeds {s['confirm_seeds']}")

    def new_tuner():
        return tune.Tuner(trainable, param_space={"point": tune.grid_search(points)},
                          run_config=_run_config(CONFIRM, exp_dir, s),
                          tune_config=tune.TuneConfig(metric=s["metric"], mode="max"))

    return _fit(confirm_dir, trainable, new_tuner)


# ----------------------------------------------------------------------------------- outputs


def write_outputs(search_results, confirm_results, base: Config, s: dict, exp_dir: Path):
    """results.parquet / .csv, best_config.yaml (runs as is with --config), and the metric against
    each searched parameter with error bars as a PNG. Returns the ranked table."""
    metric, searched = s["metric"], s["searched"]
    ranking = table.trial_rows(search_results, s["seeds"], metric, searched, s["max_evaluations"], exp_dir)
    if confirm_results is not None:
        extra = table.trial_rows(confirm_results, s["confirm_seeds"], metric, [*searched, "source_trial"],
                                 s["max_evaluations"], exp_dir / CONFIRM)
        ranking = table.merge_confirmation(ranking, extra)
    ranking = table.ranked(ranking, metric)
    ranking.to_parquet(exp_dir / "results.parquet", index=False)
    ranking.to_csv(exp_dir / "results.csv", index=False)
    best_cfg = apply_params(copy.deepcopy(base), ranking.iloc[0].to_dict())
    best_cfg.name, best_cfg.run_dir, best_cfg.train.resume = f"{base.name}-best", "", ""
    (exp_dir / "best_config.yaml").write_text(config_yaml(best_cfg))
    table.plot(ranking, metric, searched, PAPER, exp_dir / f"{metric}_vs_params.png", exp_dir.name)
    return ranking


def print_summary(ranking, s: dict, exp_dir: Path) -> None:
    metric, searched = s["metric"], s["searched"]
    shown = ranking.assign(**{metric: [f"{m:.2f}" + (f" ± {d:.2f}" if d == d else "")
                                       for m, d in zip(ranking[f"{metric}_mean"], ranking[f"{metric}_std"])]})
    cols = ["trial_id", *searched, metric, "seeds", "evaluations", "confirmed", "nodes", "failures"]
    print(shown[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    best = ranking.iloc[0]
    print(f"best {metric}: {shown[metric].iloc[0]} over {best['seeds']} seed(s) ("
          + ", ".join(f"{k}={best[k]}" for k in searched) + ")")
    if max(ranking["seeds"]) < 2:
        print("one seed per configuration: differences smaller than the seed spread are noise (docs/TUNING.md); "
              "use --seeds N or --confirm-top K to measure it")
    for row in ranking[ranking["failures"] > 0].to_dict("records"):
        print(f"trial {row['trial_id']}: {row['failures']} failed attempt(s): {row['failure']}")
    print(f"written: {exp_dir}/results.parquet, results.csv, best_config.yaml, {metric}_vs_params.png, "
          f"{SETTINGS}, {DECISIONS}")
    print(f"train the best: deepspeed itself/train.py --config {exp_dir}/best_config.yaml")


# ----------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune/search.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Presets: " + ", ".join(PRESETS))
    p.add_argument("--preset", default="synthetic")
    p.add_argument("--config", help="YAML file of config sections for the base training config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="base training config overrides")
    p.add_argument("--num-samples", type=int, default=8, help="configurations to try (default 8)")
    p.add_argument("--metric", choices=("R1", "mAP"), default="R1", help="val metric to maximise (default R1)")
    p.add_argument("--searcher", choices=("optuna", "random"), default="optuna",
                   help="Optuna TPE (default) or uniform random sampling (Optuna's RandomSampler)")
    p.add_argument("--search-layers", action="store_true", help="also search the MARS layers")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds per configuration, trained at once; reports and ranking use their mean (default 1)")
    p.add_argument("--confirm-top", type=int, default=0, metavar="K",
                   help="after the search, re-train the K best configurations with --confirm-seeds new seeds")
    p.add_argument("--confirm-seeds", type=int, default=2, help="seeds per confirmed configuration (default 2)")
    p.add_argument("--grace-period", type=int, default=0,
                   help="ASHA: evaluations before the first stop (default: derived from warm-up and the ATS horizon)")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor (default 2)")
    p.add_argument("--gpus-per-trial", type=int, default=0,
                   help="GPUs per seed; >1 runs each seed under torchrun with DeepSpeed")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs per seed (default 1)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial, from its checkpoint")
    p.add_argument("--storage-path", default="runs/tune",
                   help="where experiments go (default runs/tune; on a cluster, a folder every node sees)")
    p.add_argument("--name", help="experiment name (default search-<preset>-<timestamp>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment --name (default: the newest) with the settings it started with")
    p.add_argument("--address", help="join an existing Ray cluster (HOST:PORT, or auto on one of its nodes)")
    p.add_argument("--seed", type=int, default=0, help="searcher seed")
    return p


def check_storage(storage: Path) -> None:
    """A ConfigError unless experiments can be written under `storage`, found before Ray starts and
    creating nothing: the folder, or the nearest existing folder it would be created in, must be a
    folder this process can create folders in."""
    existing = storage
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == storage else f"cannot be created: {existing} is a file"
        raise ConfigError(f"--storage-path: {storage} {where}, not a folder; choose a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".itself-tune-write-test-"))
    except OSError as e:
        made = "" if existing == storage else f" (where {storage} would be created)"
        raise ConfigError(f"--storage-path: cannot create folders in {existing}{made}: {e.strerror or e}; choose a "
                          "writable folder (on a cluster, one every node sees)") from None


def _check_name(name: str | None) -> None:
    if name is not None and (not name or name in (".", "..") or "/" in name or os.sep in name):
        raise ConfigError(f"--name: must be one folder name (no '/', not '.' or '..'), got {name!r}")


def _experiment_dir(args) -> Path:
    if not args.storage_path:
        raise ConfigError("--storage-path: must be a folder, got ''")
    _check_name(args.name)
    storage = Path(args.storage_path).resolve()
    check_storage(storage)
    if args.name:
        return storage / args.name
    if args.resume:
        runs = sorted((p for p in storage.glob("*") if (p / SETTINGS).exists()), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise ConfigError(f"--resume: no experiment to resume in {storage}")
        return runs[-1]
    return storage / timestamped(f"search-{args.preset}")


def _check_args(args) -> None:
    for flag, value, least in (("--num-samples", args.num_samples, 1), ("--seeds", args.seeds, 1),
                               ("--confirm-top", args.confirm_top, 0), ("--confirm-seeds", args.confirm_seeds, 1),
                               ("--grace-period", args.grace_period, 0), ("--reduction-factor", args.reduction_factor, 2),
                               ("--cpus-per-trial", args.cpus_per_trial, 1), ("--gpus-per-trial", args.gpus_per_trial, 0),
                               ("--max-failures", args.max_failures, 0)):
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")


def prepare(args) -> tuple[Path, Config, dict]:
    """The experiment folder, base config and settings: new ones from the arguments (saved once the
    cluster is known to hold a trial), or those the experiment was started with (--resume).
    UserError for anything the user can fix."""
    exp_dir = _experiment_dir(args)
    if args.resume:
        if not (exp_dir / SETTINGS).exists():
            raise ConfigError(f"--resume: {exp_dir} is not a search started by tune/search.py (no {SETTINGS})")
        if args.overrides or args.config:
            print(f"note: --resume continues with the settings and base config of {exp_dir} ({SETTINGS}, "
                  f"{BASE_CONFIG}); the config given here is not used")
        base = from_dict(yaml.safe_load((exp_dir / BASE_CONFIG).read_text()))
        return exp_dir, base, json.loads((exp_dir / SETTINGS).read_text())
    _check_args(args)
    if os.path.lexists(exp_dir) and not exp_dir.is_dir():
        raise ConfigError(f"--name: {exp_dir} is a file, not an experiment folder; choose another --name")
    if exp_dir.exists() and any(exp_dir.iterdir()):
        raise ConfigError(f"--name: {exp_dir} already holds an experiment; pass --resume to continue it")
    overrides = list(args.overrides)
    if args.preset == "synthetic" and not any(o.startswith("train.epochs=") for o in overrides):
        overrides = SMALL_SEARCH + overrides
    base = resolve_config(args.preset, args.config, overrides)
    base.validate(world_size=max(1, args.gpus_per_trial))
    base.data.root = str(Path(base.data.root).resolve())  # trials run in their own folders
    from itself.data import ensure_dataset

    ensure_dataset(base.data.root, base.data.build_synthetic)  # once here, not in every trial
    return exp_dir, base, derive_settings(args, base)


def seeds_demand(s: dict, seeds: int) -> dict:
    """What a trial of `seeds` seeds asks of one node: they all train at once."""
    return {"CPU": s["cpus_per_trial"] * seeds, "GPU": s["gpus_per_trial"] * seeds}


def trial_demand(s: dict) -> dict:
    """What the largest trial asks of one node."""
    return seeds_demand(s, max(len(s["seeds"]), len(s["confirm_seeds"]) if s["confirm_top"] else 0))


def local_cpus(s: dict) -> int:
    """CPUs of a Ray started here: this machine's, or as many as one trial asks for (its seeds then
    share the cores) so that a trial can always start."""
    return max(os.cpu_count() or 1, trial_demand(s)["CPU"])


def check_fits(s: dict) -> None:
    """A ConfigError unless some node of the Ray cluster can hold a trial (Tune would wait forever)."""
    import ray

    demand = trial_demand(s)
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if not any(all(node.get(k, 0) >= v for k, v in demand.items()) for node in nodes):
        have = ", ".join(f"{node.get('CPU', 0):g} CPU / {node.get('GPU', 0):g} GPU" for node in nodes)
        raise ConfigError(f"a trial needs {demand['CPU']} CPU(s) and {demand['GPU']} GPU(s) on one node (seeds x "
                          f"--cpus-per-trial / --gpus-per-trial), but the Ray cluster's nodes have {have}")


def save_settings(exp_dir: Path, base: Config, s: dict) -> None:
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / BASE_CONFIG).write_text(config_yaml(base))
    (exp_dir / SETTINGS).write_text(json.dumps(s, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        exp_dir, base, s = prepare(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Every checkpointed report saves the experiment's state (what lets a killed driver resume with
    # its trials' last evaluations); Tune warns about it as if it were a mistake.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray

    ray.init(address=args.address, num_cpus=None if args.address else local_cpus(s), include_dashboard=False,
             log_to_driver=False, configure_logging=False, runtime_env={"env_vars": worker_env()})
    try:
        check_fits(s)
    except UserError as e:
        ray.shutdown()
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.resume:
        save_settings(exp_dir, base, s)
    print(f"{'resuming' if args.resume else 'experiment'}: {exp_dir}  ({s['num_samples']} configurations x "
          f"{len(s['seeds'])} seed(s), metric {s['metric']}, searcher {s['searcher']}; driver on {node_name()})")
    print(describe_rungs(s, base))
    try:
        search_results = search_phase(exp_dir, base, s)
        confirm_results = None
        if s["confirm_top"]:
            first = table.ranked(table.trial_rows(search_results, s["seeds"], s["metric"], s["searched"],
                                                  s["max_evaluations"], exp_dir), s["metric"])
            confirm_results = confirm_phase(exp_dir, base, s, first)
        ranking = write_outputs(search_results, confirm_results, base, s, exp_dir)
    finally:
        ray.shutdown()
    print_summary(ranking, s, exp_dir)
    errors = [r for r in search_results if r.error]
    return 1 if errors and len(errors) == len(search_results) else 0


def cli() -> None:
    """`itself-tune` and `python tune/search.py`."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()

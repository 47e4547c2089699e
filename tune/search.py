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
with --seeds 2, about 16 minutes on 2 CPU cores; docs/TUNING.md); best_config.yaml is the best
configuration at the preset's full schedule, best_config_search.yaml as it was searched.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tune/search.py`: this checkout's packages, not tune/'s files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import copy
import os

from itself import logs
from itself.config import Config, ConfigError, ModelConfig, apply_overrides, config_yaml, deepspeed_file, to_dict
from itself.errors import exit_code
from itself.paths import check_can_create
from itself.presets import PRESETS, resolve_config
from itself.rundir import timestamped
from tune import rungs, table
from tune.cluster import RayUnavailable, check_address, check_fits, connect
from tune.folders import ExperimentDir
from tune.settings import SearchSettings, derive, short_schedule
from tune.trial import apply_params, node_name, run_trial, trial_params

PAPER = {k: getattr(ModelConfig(), k) for k in ("p_start", "p_end", "discard_ratio")}  # the defaults
RANGES = {"p_start": (0.5, 0.8), "p_end": (0.35, None), "discard_ratio": (0.1, 0.4)}  # p_end's top is p_start


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


def searched_config(base: Config, s: SearchSettings) -> Config:
    """The config the trials train: the base config with the search's schedule (if any) applied."""
    cfg = copy.deepcopy(base)
    apply_overrides(cfg, list(s.schedule))
    return cfg


def describe_rungs(s: SearchSettings, searched: Config) -> str:
    how = ("--grace-period" if s.grace_period != s.derived_grace_period else
           f"derived: warm-up {searched.train.warmup_epochs:g} epochs, ATS keep ratio at p_end after "
           f"{s.signal_onset_epochs:.3g} epochs ({searched.model.ats}, t_small {searched.model.t_small}, "
           f"{s.steps_per_epoch} steps/epoch), val every {searched.eval.every} epoch(s)")
    return (f"ASHA: first decision at evaluation {s.grace_period} of {s.max_evaluations} ({how}); "
            f"no trial is stopped at a rung whose val R@1 are all <= {s.signal_floor_R1:.2f}% "
            f"(chance {s.val_chance_R1:.2f}% + {rungs.SIGNAL_Z:g} standard errors over "
            f"{s.val_queries} queries x {len(s.seeds)} seed(s))")


# ----------------------------------------------------------------------------------- phases


def _trainable(searched: Config, exp: ExperimentDir, s: SearchSettings):
    from ray import tune

    def resources(config: dict) -> dict:
        demand = s.demand(len(trial_params(config).get("seeds", s.seeds)))
        return {"cpu": demand["CPU"], "gpu": demand["GPU"]}

    return tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(searched), exp_dir=str(exp.path), seeds=s.seeds,
                             gpus_per_trial=s.gpus_per_trial, cpus_per_trial=s.cpus_per_trial), resources)


def _run_config(exp: ExperimentDir, s: SearchSettings):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from tune.failures import FailureLog
    from tune.progress import Progress

    # verbose=0: Ray's own trial table would show an ASHA-stopped trial as completed with its last
    # value; Progress prints what happened to each trial, and the results table its best. Each
    # trial folder keeps Ray's result.json and progress.csv; not its TensorBoard events (see _fit).
    return tune.RunConfig(name=exp.name, storage_path=str(exp.path.parent), verbose=0,
                          failure_config=tune.FailureConfig(max_failures=s.max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                          callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), FailureLog(exp.path),
                                     Progress(s.metric, s.max_evaluations)])


def _fit(exp: ExperimentDir, trainable, new_tuner):
    """Continue the experiment in `exp` if it was started (finished trials are kept), else start it
    with `new_tuner()`; returns its results."""
    from ray import tune

    # Ray adds its default loggers to the callbacks (kept with the experiment, restored with it);
    # its TensorBoard one imports tensorboardX, which imports torch: seconds of CPU in a driver that
    # trains nothing, for events of the seed means that each seed's own tensorboard/ already holds.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    if exp.started():
        tuner = tune.Tuner.restore(str(exp.path), trainable=trainable, resume_errored=True)
    else:
        tuner = new_tuner()
    return tuner.fit()


def search_phase(exp: ExperimentDir, searched: Config, s: SearchSettings):
    from ray import tune

    trainable = _trainable(searched, exp, s)

    def new_tuner():
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # (its INFO line of a new study)

        layers = layer_choices(searched.model.arch) if "mars_layers" in s.searched else None
        first = dict(PAPER, **({"mars_layers": layers[min(len(layers) - 1, 3)]} if layers else {}))
        sampler = (optuna.samplers.TPESampler(seed=s.searcher_seed) if s.searcher == "optuna"
                   else optuna.samplers.RandomSampler(seed=s.searcher_seed))
        searcher = OptunaSearch(space=OptunaSpace(layers), metric=s.metric, mode="max", points_to_evaluate=[first],
                                sampler=sampler)
        scheduler = rungs.SignalASHA(
            floor=s.signal_floor_R1, decisions=exp.file(ExperimentDir.DECISIONS), time_attr="training_iteration",
            max_t=s.max_evaluations, grace_period=s.grace_period, reduction_factor=s.reduction_factor)
        return tune.Tuner(trainable, run_config=_run_config(exp, s),
                          tune_config=tune.TuneConfig(metric=s.metric, mode="max", num_samples=s.num_samples,
                                                      search_alg=searcher, scheduler=scheduler))

    return _fit(exp, trainable, new_tuner)


def confirm_phase(exp: ExperimentDir, searched: Config, s: SearchSettings, ranking):
    """Re-train the top `confirm_top` configurations of the `ranking` table with the confirmation
    seeds, every evaluation (no early stopping), as the experiment `<exp>/confirm`."""
    from ray import tune

    top = ranking.dropna(subset=[f"{s.metric}_mean"]).head(s.confirm_top)
    points = [{**{k: row[k] for k in s.searched}, "seeds": s.confirm_seeds, "source_trial": row["trial_id"]}
              for row in top.to_dict("records")]
    confirm = exp.confirm
    trainable = _trainable(searched, confirm, s)
    print(f"confirming the top {len(points)} configuration(s) with seeds {s.confirm_seeds}")

    def new_tuner():
        return tune.Tuner(trainable, param_space={"point": tune.grid_search(points)},
                          run_config=_run_config(confirm, s), tune_config=tune.TuneConfig(metric=s.metric, mode="max"))

    return _fit(confirm, trainable, new_tuner)


# ----------------------------------------------------------------------------------- outputs


def best_configs(base: Config, s: SearchSettings, best: dict) -> tuple[Config, Config]:
    """The best configuration's training configs: at the base config's full schedule (what to
    train), and as the search trained it (its schedule applied)."""
    full = apply_params(copy.deepcopy(base), best)
    full.name, full.run_dir, full.train.resume = f"{base.name}-best", "", ""
    return full, searched_config(full, s)


def write_outputs(search_results, confirm_results, base: Config, s: SearchSettings, exp: ExperimentDir):
    """results.parquet / .csv, best_config.yaml (the full schedule) and best_config_search.yaml (as
    searched), and the metric against each searched parameter with error bars as a PNG. Returns
    the ranked table."""
    ranking = table.trial_rows(search_results, s.seeds, s.metric, s.searched, s.max_evaluations, exp.path)
    if confirm_results is not None:
        extra = table.trial_rows(confirm_results, s.confirm_seeds, s.metric, [*s.searched, "source_trial"],
                                 s.max_evaluations, exp.confirm.path)
        ranking = table.merge_confirmation(ranking, extra)
    ranking = table.ranked(ranking, s.metric)
    ranking.to_parquet(exp.file(ExperimentDir.RESULTS), index=False)
    ranking.to_csv(exp.file(ExperimentDir.RESULTS_CSV), index=False)
    full, as_searched = best_configs(base, s, ranking.iloc[0].to_dict())
    exp.file(ExperimentDir.BEST_CONFIG).write_text(config_yaml(full))
    exp.file(ExperimentDir.BEST_SEARCHED).write_text(config_yaml(as_searched))
    table.plot(ranking, s.metric, s.searched, PAPER, exp.plot(s.metric), exp.name)
    return ranking


def print_summary(ranking, s: SearchSettings, base: Config, exp: ExperimentDir) -> None:
    metric, searched = s.metric, s.searched
    shown = ranking.assign(**{metric: [f"{m:.2f}" + (f" ± {d:.2f}" if d == d else "")
                                       for m, d in zip(ranking[f"{metric}_mean"], ranking[f"{metric}_std"])]})
    cols = ["trial_id", *searched, metric, "seeds", "evaluations", "stopped_early", "confirmed", "nodes", "failures"]
    print(shown[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    best = ranking.iloc[0]
    print(f"best {metric}: {shown[metric].iloc[0]} over {best['seeds']} seed(s) ("
          + ", ".join(f"{k}={best[k]}" for k in searched) + ")")
    if max(ranking["seeds"]) < 2:
        print("one seed per configuration: differences smaller than the seed spread are noise (docs/TUNING.md); "
              "use --seeds N or --confirm-top K to measure it")
    for row in ranking[ranking["failures"] > 0].to_dict("records"):
        print(f"trial {row['trial_id']}: {row['failures']} failed attempt(s): {row['failure']}")
    written = [ExperimentDir.RESULTS, ExperimentDir.RESULTS_CSV, ExperimentDir.BEST_CONFIG, ExperimentDir.BEST_SEARCHED,
               exp.plot(metric).name, ExperimentDir.SETTINGS, ExperimentDir.DECISIONS, ExperimentDir.FAILURES]
    print(f"written: {exp}/ ({', '.join(name for name in written if exp.file(name).exists())})")
    train = f"deepspeed itself/train.py --config {exp.file(ExperimentDir.BEST_CONFIG)}"
    if not s.schedule:
        print(f"train the best ({base.train.epochs} epochs, as searched): {train}")
        return
    print(f"train the best at full length ({base.train.epochs} epochs, the base config's schedule): {train}")
    print(f"  (the search trained {searched_config(base, s).train.epochs} epochs: {' '.join(s.schedule)}; "
          f"{ExperimentDir.BEST_SEARCHED} is that config)")


# ----------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    command = "itself-tune" if Path(sys.argv[0]).name == "itself-tune" else "tune/search.py"  # (as typed)
    p = argparse.ArgumentParser(prog=command, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Presets: " + ", ".join(PRESETS))
    p.add_argument("--preset", default="synthetic")
    p.add_argument("--config", help="YAML file of config sections for the base training config")
    logs.add_arguments(p)
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


def _check_name(name: str | None) -> None:
    if name is not None and (not name or name in (".", "..") or "/" in name or os.sep in name):
        raise ConfigError(f"--name: must be one folder name (no '/', not '.' or '..'), got {name!r}")


def _experiment(args) -> ExperimentDir:
    if not args.storage_path:
        raise ConfigError("--storage-path: must be a folder, got ''")
    _check_name(args.name)
    storage = Path(args.storage_path).resolve()
    check_can_create(storage, "--storage-path")
    if args.name:
        return ExperimentDir(storage / args.name)
    if args.resume:
        runs = sorted((p for p in storage.glob("*") if ExperimentDir(p).is_search()), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise ConfigError(f"--resume: no experiment to resume in {storage}")
        return ExperimentDir(runs[-1])
    return ExperimentDir(storage / timestamped(f"search-{args.preset}"))


def _check_args(args) -> None:
    for flag, value, least in (("--num-samples", args.num_samples, 1), ("--seeds", args.seeds, 1),
                               ("--confirm-top", args.confirm_top, 0), ("--confirm-seeds", args.confirm_seeds, 1),
                               ("--grace-period", args.grace_period, 0), ("--reduction-factor", args.reduction_factor, 2),
                               ("--cpus-per-trial", args.cpus_per_trial, 1), ("--gpus-per-trial", args.gpus_per_trial, 0),
                               ("--max-failures", args.max_failures, 0)):
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")


def _check_new(exp: ExperimentDir) -> None:
    if os.path.lexists(exp.path) and not exp.path.is_dir():
        raise ConfigError(f"--name: {exp} is a file, not an experiment folder; choose another --name")
    if exp.holds_anything():
        raise ConfigError(f"--name: {exp} already holds an experiment; pass --resume to continue it")
    if os.path.lexists(exp.path):  # (an empty folder, made beforehand: by you, or by someone else)
        exp.check_owned(resuming=False)


def prepare(args) -> tuple[ExperimentDir, Config, SearchSettings]:
    """The experiment folder, base config (at its full schedule) and settings: new ones from the
    arguments (saved once the cluster is known to hold a trial), or those the experiment was
    started with (--resume, the experiment then locked). UserError for anything the user can fix."""
    check_address(args.address)
    exp = _experiment(args)
    if args.resume:
        if not exp.is_search():
            raise ConfigError(f"--resume: {exp} is not a search started by tune/search.py (no {ExperimentDir.SETTINGS})")
        exp.lock()  # (first: a search still running there is named as such, its files not walked while it writes)
        exp.check_owned()
        if args.overrides or args.config:
            print(f"note: --resume continues with the settings and base config of {exp} ({ExperimentDir.SETTINGS}, "
                  f"{ExperimentDir.BASE_CONFIG}); the config given here is not used")
        return exp, exp.base_config(), exp.settings()
    _check_args(args)
    _check_new(exp)
    overrides = list(args.overrides)
    base = resolve_config(args.preset, args.config, overrides)
    base.data.root = str(Path(base.data.root).resolve())  # trials run in their own folders
    base.validate(world_size=max(1, args.gpus_per_trial))
    schedule = short_schedule(args.preset, overrides)
    searched = copy.deepcopy(base)
    apply_overrides(searched, schedule)
    searched.validate(world_size=max(1, args.gpus_per_trial))
    from itself.data.sources import ensure_dataset
    deepspeed_file(base.train.deepspeed)  # (every trial reads it: a bad one is said once, here)

    info = ensure_dataset(base.data.root, base.data.build_synthetic)  # once here, not in every trial
    return exp, base, derive(args, searched, info, schedule)


def start(exp: ExperimentDir, base: Config, s: SearchSettings) -> None:
    """Claim the new experiment's folder (locked: a second search into it is refused) and write
    its settings and base config."""
    exp.lock()
    _check_new(exp)  # (again, holding the lock: another search may have begun there meanwhile)
    exp.save(base, s)


def run(args, exp: ExperimentDir, base: Config, s: SearchSettings) -> int:
    """Both phases on the Ray cluster ray.init joined, the outputs, the summary."""
    searched = searched_config(base, s)
    print(f"{'resuming' if args.resume else 'experiment'}: {exp}  ({s.num_samples} configurations x "
          f"{len(s.seeds)} seed(s), metric {s.metric}, searcher {s.searcher}; driver on {node_name()})")
    print(describe_rungs(s, searched))
    search_results = search_phase(exp, searched, s)
    confirm_results = None
    if s.confirm_top:
        first = table.ranked(table.trial_rows(search_results, s.seeds, s.metric, s.searched, s.max_evaluations,
                                              exp.path), s.metric)
        confirm_results = confirm_phase(exp, searched, s, first)
    ranking = write_outputs(search_results, confirm_results, base, s, exp)
    print_summary(ranking, s, base, exp)
    errors = [r for r in search_results if r.error]
    return 1 if errors and len(errors) == len(search_results) else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup_from(args)
    return exit_code(lambda: _search(args), failures=(RayUnavailable,))


def _search(args) -> int:
    exp, base, s = prepare(args)
    connect(args.address, s)
    import ray

    try:
        check_fits(s)
        if not args.resume:
            start(exp, base, s)
        return run(args, exp, base, s)
    finally:
        ray.shutdown()
        exp.unlock()


def cli() -> None:
    """`itself-tune` and `python tune/search.py`."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()

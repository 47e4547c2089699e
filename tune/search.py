"""Hyper-parameter search with Ray Tune over ITSELF training: `python tune/search.py`.

Searches the ATS keep ratios p_start and p_end (always p_end <= p_start) and the MARS discard
ratio (and, with --search-layers, the MARS layers), centred on the paper's 0.65 / 0.5 / 0.25 (the
paper's point is the first trial). Every trial runs itself/train.py as a subprocess (under
torchrun with --gpus-per-trial > 1: DeepSpeed inside the trial), reports each val evaluation to
Tune with its checkpoint, and is pruned by ASHA on the per-epoch val metric. A failed or paused
trial resumes from its last reported checkpoint; an interrupted search continues with --resume.

With the synthetic preset and no train.epochs override, trials train 8 epochs (a small search:
about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from itself.checkpoint import COMPLETE, tag_for
from itself.config import Config, ConfigError, ModelConfig, from_dict, to_dict
from itself.presets import PRESETS, resolve_config
from itself.rundir import EvalRecord, RunDir

PAPER = {k: getattr(ModelConfig(), k) for k in ("p_start", "p_end", "discard_ratio")}  # the defaults
RANGES = {"p_start": (0.5, 0.8), "p_end": (0.35, None), "discard_ratio": (0.1, 0.4)}  # p_end's top is p_start
SMALL_SEARCH = ["train.epochs=8", "train.warmup_epochs=1", "model.t_small=3"]


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


def apply_params(cfg: Config, params: dict) -> Config:
    cfg.model.p_start, cfg.model.p_end = float(params["p_start"]), float(params["p_end"])
    cfg.model.discard_ratio = float(params["discard_ratio"])
    if "mars_layers" in params:
        cfg.model.mars_layers = tuple(int(v) for v in str(params["mars_layers"]).split(","))
    return cfg


# ----------------------------------------------------------------------------------- trial


def _die_with_parent() -> None:
    """Runs in the trial's child: killed with its Ray worker (ASHA stops kill the worker)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def val_metrics(record: EvalRecord) -> dict:
    """Tune's view of one val evaluation: the fused metrics at the weight chosen that epoch."""
    return {"val_R1": record.fused["R1"], "val_mAP": record.fused["mAP"], "fusion_weight": record.fusion_weight,
            "selection": record.selection, "epoch": record.epoch + 1, "global_R1": record.metrics["global"]["R1"],
            "grab_R1": record.metrics.get("grab", {}).get("R1", float("nan"))}


def run_trial(config: dict, base: dict, gpus_per_trial: int = 0, cpus_per_trial: int = 1) -> None:
    """The Tune trainable: one training run of itself/train.py with this trial's parameters."""
    from ray import tune

    trial_dir = Path(tune.get_context().get_trial_dir())
    cfg = apply_params(from_dict(base), config)
    run = RunDir(trial_dir / "run")
    run_dir = run.path
    cfg.run_dir, cfg.train.keep_last, cfg.train.resume = str(run_dir), 3, ""
    restored = tune.get_checkpoint()
    if restored is not None:  # a retried or resumed trial continues from its last report
        with restored.as_directory() as d:
            dest = run.checkpoints / Path(d).name
            if not dest.exists():
                shutil.copytree(d, dest)
        cfg.train.resume = str(dest)
    cfg_file = trial_dir / "trial_config.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus_per_trial}"]
                if gpus_per_trial > 1 else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS=str(cpus_per_trial))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # the trial is its own job
    with open(trial_dir / "train_stdout.log", "a") as out:
        proc = subprocess.Popen([*launcher, "-m", "itself.train", "--config", str(cfg_file)],
                                cwd=trial_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
    offset, pending = 0, []
    while True:
        done = proc.poll() is not None
        records, offset = run.read_records(offset)
        pending += [EvalRecord.from_record(r) for r in records if r["type"] == "eval"]
        while pending:  # report each evaluation once its epoch's checkpoint is complete
            tag_dir = run.checkpoints / tag_for(pending[0].step)
            if not (tag_dir / COMPLETE).exists() and not done:
                break
            record = pending.pop(0)
            checkpoint = tune.Checkpoint.from_directory(str(tag_dir)) if (tag_dir / COMPLETE).exists() else None
            tune.report(val_metrics(record), checkpoint=checkpoint)
        if done:
            break
        time.sleep(0.5)
    if proc.returncode != 0:
        tail = (trial_dir / "train_stdout.log").read_text()[-2000:]
        raise RuntimeError(f"training failed (exit {proc.returncode}); {trial_dir}/train_stdout.log ends:\n{tail}")


# ----------------------------------------------------------------------------------- outputs


def trial_table(results, metric: str, searched: list[str]):
    """One row per trial: its best evaluation by `metric`, how many evaluations it reached (fewer
    than the epochs: stopped early by ASHA), and its parameters; best first."""
    import pandas as pd

    rows = []
    for r in results:
        history = r.metrics_dataframe
        if history is None or history.empty or metric not in history:
            rows.append({"trial_id": r.metrics.get("trial_id"), "evaluations": 0, "error": str(r.error)[:200],
                         **{k: r.config.get(k) for k in searched}})
            continue
        best = history.loc[history[metric].idxmax()]
        rows.append({"trial_id": best["trial_id"], "evaluations": int(history["training_iteration"].max()),
                     "best_epoch": int(best["epoch"]), "val_R1": best["val_R1"], "val_mAP": best["val_mAP"],
                     "fusion_weight": best["fusion_weight"], "error": "" if r.error is None else str(r.error)[:200],
                     **{k: r.config[k] for k in searched}})
    return pd.DataFrame(rows).sort_values(metric, ascending=False, na_position="last").reset_index(drop=True)


def write_outputs(results, base: Config, metric: str, searched: list[str], exp_dir: Path):
    """results.parquet / .csv, best_config.yaml (runs as is with --config), and the metric against
    each searched parameter as a PNG. Returns the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = trial_table(results, metric, searched)
    table.to_parquet(exp_dir / "results.parquet", index=False)
    table.to_csv(exp_dir / "results.csv", index=False)

    best_cfg = apply_params(copy.deepcopy(base), table.iloc[0].to_dict())
    best_cfg.name, best_cfg.run_dir, best_cfg.train.resume = f"{base.name}-best", "", ""
    (exp_dir / "best_config.yaml").write_text(yaml.safe_dump(to_dict(best_cfg), sort_keys=False))

    fig, axes = plt.subplots(1, len(searched), figsize=(4 * len(searched) + 1, 3.4), squeeze=False,
                             constrained_layout=True)
    for ax, name in zip(axes[0], searched):
        x = table[name].astype(str) if name == "mars_layers" else table[name]
        points = ax.scatter(x, table[metric], c=table["evaluations"], cmap="viridis")
        if name in PAPER:
            ax.axvline(PAPER[name], color="grey", ls="--", lw=1)
        ax.set_xlabel(name)
        ax.set_ylabel(f"best {metric} (%)")
    fig.colorbar(points, ax=axes[0].tolist(), label="evaluations reached (ASHA)")
    fig.suptitle(exp_dir.name)
    fig.savefig(exp_dir / f"{metric}_vs_params.png", dpi=100)
    plt.close(fig)
    return table


# ----------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune/search.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Presets: " + ", ".join(PRESETS))
    p.add_argument("--preset", default="synthetic")
    p.add_argument("--config", help="YAML file of config sections for the base training config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="base training config overrides")
    p.add_argument("--num-samples", type=int, default=8, help="trials (default 8)")
    p.add_argument("--metric", choices=("R1", "mAP"), default="R1", help="val metric to maximise (default R1)")
    p.add_argument("--searcher", choices=("optuna", "random"), default="optuna",
                   help="Optuna TPE (default) or uniform random sampling (Optuna's RandomSampler)")
    p.add_argument("--search-layers", action="store_true", help="also search the MARS layers")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: evaluations before a trial may be stopped")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor (default 2)")
    p.add_argument("--gpus-per-trial", type=int, default=0, help=">1 runs each trial under torchrun with DeepSpeed")
    p.add_argument("--cpus-per-trial", type=int, default=1)
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial, from its checkpoint")
    p.add_argument("--storage-path", default="runs/tune", help="where experiments go (default runs/tune)")
    p.add_argument("--name", help="experiment name (default search-<preset>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment --name (default: the newest)")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. auto, or ray://host:10001)")
    p.add_argument("--seed", type=int, default=0, help="searcher seed")
    return p


def _experiment_dir(args) -> Path:
    storage = Path(args.storage_path).resolve()
    if args.name:
        return storage / args.name
    if args.resume:
        runs = sorted((p for p in storage.glob("*") if (p / "tuner.pkl").exists()), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise ConfigError(f"--resume: no experiment to resume in {storage}")
        return runs[-1]
    return storage / f"search-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.preset == "synthetic" and not any(o.startswith("train.epochs=") for o in overrides):
        overrides = SMALL_SEARCH + overrides
    try:
        base = resolve_config(args.preset, args.config, overrides)
        base.validate(world_size=max(1, args.gpus_per_trial))
        if args.num_samples < 1:
            raise ConfigError("--num-samples must be >= 1")
        exp_dir = _experiment_dir(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from itself.data import ensure_dataset

    base.data.root = str(Path(base.data.root).resolve())  # trials run in their own folders
    ensure_dataset(base.data.root, base.data.build_synthetic)  # once here, not in every trial
    metric = f"val_{args.metric}"
    layers = layer_choices(base.model.arch) if args.search_layers else None
    searched = ["p_start", "p_end", "discard_ratio"] + (["mars_layers"] if layers else [])

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    ray.init(address=args.address, num_cpus=None if args.address else os.cpu_count(), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(base), gpus_per_trial=args.gpus_per_trial,
                             cpus_per_trial=args.cpus_per_trial),
        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    if args.resume:
        if not (exp_dir / "tuner.pkl").exists():
            print(f"error: --resume: {exp_dir} is not a Tune experiment", file=sys.stderr)
            return 2
        print(f"resuming {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        first = dict(PAPER, **({"mars_layers": layers[min(len(layers) - 1, 3)]} if layers else {}))
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = (optuna.samplers.TPESampler(seed=args.seed) if args.searcher == "optuna"
                   else optuna.samplers.RandomSampler(seed=args.seed))
        searcher = OptunaSearch(space=OptunaSpace(layers), metric=metric, mode="max", points_to_evaluate=[first],
                                sampler=sampler)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", num_samples=args.num_samples, search_alg=searcher,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=base.train.epochs,
                                        grace_period=args.grace_period, reduction_factor=args.reduction_factor)),
            run_config=tune.RunConfig(
                name=exp_dir.name, storage_path=str(exp_dir.parent), verbose=1,
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    print(f"experiment: {exp_dir}  ({args.num_samples} trials, metric {metric}, searcher {args.searcher}, ASHA)")
    results = tuner.fit()
    table = write_outputs(results, base, metric, searched, exp_dir)
    ray.shutdown()
    cols = ["trial_id", "evaluations", "best_epoch", "val_R1", "val_mAP", *searched]
    print(table[[c for c in cols if c in table]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    best = table.iloc[0]
    print(f"best {metric}: {best[metric]:.2f} (" + ", ".join(f"{k}={best[k]}" for k in searched) + ")")
    print(f"written: {exp_dir}/results.parquet, results.csv, best_config.yaml, {metric}_vs_params.png")
    print(f"train the best: deepspeed itself/train.py --config {exp_dir}/best_config.yaml")
    errors = [r for r in results if r.error]
    return 1 if errors and len(errors) == len(results) else 0


def cli() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    cli()

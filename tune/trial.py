"""One Tune trial: a configuration trained with one or more seeds, reported as their mean.

Each seed is an `itself/train.py` process (under torchrun with more than one GPU per seed) with
its own run directory. After every val evaluation that all seeds have reached, the trial reports
to Tune the mean val metrics, each seed's values (`per_seed/<seed>/<metric>`), the node it ran on
and its attempt number, with the seeds' checkpoints of that evaluation: a trial that fails, or
whose node dies, is retried from them (on any node), and a resumed search continues from them.
A trial whose seeds had all finished before Tune recorded it (a driver killed at the wrong moment)
trains nothing again: it reports the evaluations Tune is missing from the finished runs.

Its folders (`attempt<n>/seed<s>/` ...) are named by tune.folders.TrialDir and AttemptDir.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from itself.filenames import COMPLETE, tag_for
from itself.config import Config, config_yaml, from_dict
from itself.rundir import EvalRecord, RunDir
from tune.folders import AttemptDir, TrialDir

REPO = Path(__file__).resolve().parents[1]
MEAN_METRICS = ("val_R1", "val_mAP", "global_R1")
"""The per-seed metrics whose mean a report carries (the ranking uses val_R1 or val_mAP)."""
POLL_S = 0.5


def worker_env() -> dict:
    """Variables every Ray worker of a search gets: this checkout first on the import path, so
    trials on any node train with the code the driver runs."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def node_name() -> str:
    """The SLURM node name when Ray runs inside an allocation (several may share a host), else the
    host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def apply_params(cfg: Config, params: dict) -> Config:
    """The training config of a trial: the searched parameters set on the base config."""
    cfg.model.p_start, cfg.model.p_end = float(params["p_start"]), float(params["p_end"])
    cfg.model.discard_ratio = float(params["discard_ratio"])
    if "mars_layers" in params:
        cfg.model.mars_layers = tuple(int(v) for v in str(params["mars_layers"]).split(","))
    return cfg


def trial_params(config: dict) -> dict:
    """A trial's parameters: the searcher's config, or the `point` a confirmation trial re-runs."""
    return config.get("point", config)


def seed_column(seed: int, metric: str) -> str:
    """The column of one seed's metric in Tune's results (Tune flattens nested reports with '/')."""
    return f"per_seed/{seed}/{metric}"


def val_metrics(record: EvalRecord) -> dict:
    """One seed's view of one val evaluation: the fused metrics at the weight chosen that epoch."""
    return {"val_R1": record.fused["R1"], "val_mAP": record.fused["mAP"], "global_R1": record.metrics["global"]["R1"],
            "fusion_weight": record.fusion_weight, "selection": record.selection}


def _die_with_parent() -> None:
    """Runs in the seed's process: killed with the trial's thread (an ASHA stop, a dead node)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class SeedRun:
    """One seed's training process in one attempt, and its evaluations staged for reporting."""

    def __init__(self, attempt: AttemptDir, seed: int, run: RunDir | None = None, reported_epochs: int = 0):
        """`run`: an earlier attempt's finished run to report from instead of training (see
        `finished_runs`); evaluations of the first `reported_epochs` epochs are Tune's already."""
        self.seed, self.attempt, self.reported_epochs = seed, attempt, reported_epochs
        self.run = run or attempt.seed_run(seed)
        self.log = attempt.seed_log(seed)
        self.offset = 0
        self.waiting: list[EvalRecord] = []  # evaluated, checkpoint not complete yet
        self.staged: dict[int, tuple[EvalRecord, Path | None]] = {}  # epoch -> record, staged checkpoint
        self.proc: subprocess.Popen | None = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, cfg: Config, launcher: list[str], env: dict) -> None:
        """Train this seed; from the newest complete checkpoint in its run directory when there is
        one (`train.resume=auto`: the checkpoint a retried trial was restored into, see `_restore`)."""
        cfg.seed, cfg.run_dir, cfg.train.keep_last, cfg.train.resume = self.seed, str(self.run.path), 2, "auto"
        cfg_file = self.attempt.seed_config(self.seed)
        cfg_file.write_text(config_yaml(cfg))
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([*launcher, "-m", "itself.train", "--config", str(cfg_file)],
                                         cwd=self.attempt.path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)

    def collect(self) -> None:
        """Read new evaluations; stage each one's checkpoint once complete (hard links, so that the
        trainer pruning it does not take it from under the report)."""
        done = not self.running()
        records, self.offset = self.run.read_records(self.offset)
        self.waiting += [r for r in map(EvalRecord.from_record, (r for r in records if r["type"] == "eval"))
                         if r.split == "val" and r.epoch >= self.reported_epochs]
        while self.waiting:
            record = self.waiting[0]
            checkpoint = self.run.checkpoints / tag_for(record.step)
            if not (checkpoint / COMPLETE).exists() and not done:
                return
            self.waiting.pop(0)
            self.staged[record.epoch] = (record, self._stage(record.epoch, checkpoint))

    def _stage(self, epoch: int, checkpoint: Path) -> Path | None:
        dest = self.attempt.report(epoch) / self.run.path.name / checkpoint.name
        try:
            shutil.copytree(checkpoint, dest, copy_function=os.link)
        except (FileNotFoundError, shutil.Error):  # pruned before it could be staged (the trainer ran ahead)
            shutil.rmtree(dest, ignore_errors=True)
            return None
        return dest if (dest / COMPLETE).exists() else None

    def failure(self) -> str | None:
        code = self.proc.poll() if self.proc is not None else None
        if code in (None, 0):
            return None
        return f"seed {self.seed}: training failed (exit {code}); {self.log} ends:\n{self.log.read_text()[-2000:]}"

    def stop(self) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait()


def _launcher(gpus_per_seed: int) -> list[str]:
    if gpus_per_seed > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus_per_seed}"]
    return [sys.executable]


def _seed_env(index: int, cpus: int, gpus: int) -> dict:
    """The seed's process environment: its share of the trial's CPU threads and GPUs, no launcher
    variables (each seed is its own job)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cpus))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if gpus and len(visible) >= gpus * (index + 1):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[gpus * index: gpus * (index + 1)])
    return env


def _reported_epochs(checkpoint) -> int:
    """Epochs Tune has evaluations of: those up to the one its checkpoint belongs to (0 without one,
    or for a checkpoint that does not say: every evaluation is reported again, and the table keeps
    one row per epoch)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        return AttemptDir.reported_epoch(Path(d))


def _restore(checkpoint, attempt: AttemptDir) -> None:
    """Copy each seed's checkpoint out of the one Tune restores the trial from into the seed's run
    directory of this attempt (the trainer then owns it, and resumes from it)."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as d:
        for seed_dir in Path(d).glob("seed*"):
            seed = int(seed_dir.name.removeprefix("seed"))
            (tag,) = [p for p in seed_dir.iterdir() if p.is_dir()]
            shutil.copytree(tag, attempt.seed_run(seed).checkpoints / tag.name)


def finished_runs(trial: TrialDir, attempt_no: int, seeds: list[int]) -> dict[int, RunDir] | None:
    """seed -> its run in the latest earlier attempt that trained it, when every seed's run there
    finished (results.json written): the trial is done, whatever Tune recorded of it."""
    runs = {}
    for seed in seeds:
        earlier = [trial.attempt(n).seed_run(seed) for n in range(attempt_no - 1, 0, -1)]
        trained = [run for run in earlier if run.file(RunDir.METRICS).exists()]
        if not trained or not trained[0].file(RunDir.RESULTS).exists():
            return None
        runs[seed] = trained[0]
    return runs


def report_of(records: dict[int, EvalRecord]) -> dict:
    """Tune's result for one evaluation reached by every seed: the means, and each seed's values."""
    per_seed = {str(seed): val_metrics(r) for seed, r in records.items()}
    means = {k: statistics.fmean(m[k] for m in per_seed.values()) for k in MEAN_METRICS}
    return {**means, "epoch": next(iter(records.values())).epoch + 1, "seeds": len(records), "per_seed": per_seed}


def run_trial(config: dict, base: dict, exp_dir: str, seeds: list[int], gpus_per_trial: int = 0,
              cpus_per_trial: int = 1) -> None:
    """The Tune trainable. `seeds` from the search; a confirmation trial brings its own in its point."""
    import ray
    from ray import tune

    params = trial_params(config)
    seeds = list(params.get("seeds", seeds))
    trial = TrialDir(Path(exp_dir) / Path(tune.get_context().get_trial_dir()).name)
    attempt = trial.new_attempt()
    where = {"node": node_name(), "node_id": ray.get_runtime_context().get_node_id(), "attempt": attempt.number}
    checkpoint = tune.get_checkpoint()
    finished = finished_runs(trial, attempt.number, seeds)
    if finished:  # trained to the end before Tune recorded it all: report only what Tune is missing
        runs = [SeedRun(attempt, seed, finished[seed], _reported_epochs(checkpoint)) for seed in seeds]
    else:
        runs = [SeedRun(attempt, seed) for seed in seeds]
    try:
        if not finished:
            _restore(checkpoint, attempt)
            for i, run in enumerate(runs):
                run.start(apply_params(from_dict(base), params), _launcher(gpus_per_trial),
                          _seed_env(i, cpus_per_trial, gpus_per_trial))
        _report_until_done(runs, attempt, where)
    finally:
        for run in runs:
            run.stop()


def _report_until_done(runs: list[SeedRun], attempt: AttemptDir, where: dict) -> None:
    from ray import tune

    while True:
        finished = not any(run.running() for run in runs)
        for run in runs:
            run.collect()
        failures = [f for f in map(SeedRun.failure, runs) if f]
        if failures:
            raise RuntimeError("\n".join(failures))
        for epoch in sorted(set.intersection(*(set(run.staged) for run in runs))):
            staged = {run.seed: run.staged.pop(epoch) for run in runs}
            folder = attempt.report(epoch)
            folder.mkdir(parents=True, exist_ok=True)
            attempt.mark_report(epoch)
            complete = all(path is not None for _, path in staged.values())
            checkpoint = tune.Checkpoint.from_directory(str(folder)) if complete else None
            tune.report({**report_of({seed: rec for seed, (rec, _) in staged.items()}), **where}, checkpoint=checkpoint)
            shutil.rmtree(folder, ignore_errors=True)  # Tune has its own copy now
        if finished:
            return
        time.sleep(POLL_S)

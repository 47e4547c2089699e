"""The search's folders: the one place that names their files.

An experiment, `<storage-path>/<name>/`:

    search.json                 the settings (tune.settings.SearchSettings), fixed when it starts
    base_config.yaml            the base training config, at its full schedule
    .search.lock                held by the search running in it (shards.locking.FolderLock)
    results.parquet, .csv       one row per configuration, best first
    best_config.yaml            the best configuration at the base config's full schedule
    best_config_search.yaml     the best configuration as the search trained it
    val_<metric>_vs_params.png  the metric against each searched parameter
    asha.jsonl                  every ASHA stop, and every stop held back at chance
    failures.jsonl              every failed trial attempt
    <trial>/                    a trial's folder (named by Tune): see `TrialDir`
    confirm/                    the confirmation phase: an experiment folder of its own (no
                                settings: the parent's hold)
    tuner.pkl, ...              Tune's own state (what --resume restores)

A trial's folder holds one `attempt<n>/` per run of the trial (a retried trial gets a new one):

    attempt<n>/seed<s>/         the run directory of seed s (itself.rundir.RunDir)
    attempt<n>/seed<s>.log      its output;  attempt<n>/seed<s>.yaml  its config
    attempt<n>/reports/epoch<e>/  checkpoints staged (hard links) until Tune has taken them, with
                                evaluation.json: which evaluation they are
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from itself.config import Config, ConfigError, config_yaml, from_dict, load_yaml
from itself.paths import Folder
from itself.rundir import RunDir
from shards.locking import FolderLock, LockBusy, LockUnavailable
from shards.ownership import first_foreign
from tune.settings import SearchSettings


class ExperimentDir(Folder):
    """The files of one search experiment (see the module docstring)."""

    SETTINGS = "search.json"
    BASE_CONFIG = "base_config.yaml"
    LOCK = ".search.lock"
    RESULTS = "results.parquet"
    RESULTS_CSV = "results.csv"
    BEST_CONFIG = "best_config.yaml"
    BEST_SEARCHED = "best_config_search.yaml"
    DECISIONS = "asha.jsonl"
    FAILURES = "failures.jsonl"
    CONFIRM = "confirm"
    TUNER_STATE = "tuner.pkl"  # (Tune's name: there once the experiment has started)

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._lock = FolderLock(self.file(self.LOCK))

    @property
    def name(self) -> str:
        return self.path.name

    def plot(self, metric: str) -> Path:
        return self.file(f"{metric}_vs_params.png")

    @property
    def confirm(self) -> "ExperimentDir":
        return ExperimentDir(self.file(self.CONFIRM))

    # -- state -----------------------------------------------------------------------------------

    def is_search(self) -> bool:
        """Whether a search was started here (its settings were written)."""
        return self.file(self.SETTINGS).exists()

    def started(self) -> bool:
        """Whether Tune has run here: a search to continue rather than to begin."""
        return self.file(self.TUNER_STATE).exists()

    def holds_anything(self) -> bool:
        return self.path.is_dir() and any(p.name != self.LOCK for p in self.path.iterdir())

    def check_owned(self, resuming: bool = True) -> None:
        """ConfigError unless every file and folder of the experiment is this user's and writable by
        no one else (no link planted at a name either, nor at the experiment's own name): --resume
        has Ray unpickle its state (tuner.pkl and the rest), which runs whatever code the pickles
        hold, and trains the base config kept here; a new search (not `resuming`) writes its files
        into it. An experiment someone else wrote or could change is never used."""
        foreign = first_foreign(self.path)
        if foreign:
            path, why = foreign
            if resuming:
                raise ConfigError(f"--resume: {path} {why}: resuming unpickles the experiment's state, which runs "
                                  "code; only an experiment you wrote and no one else can change resumes (start a "
                                  f"new search, or `chmod -R o-w {self.path}` if it is yours)")
            raise ConfigError(f"--name: {path} {why}: a new search writes its settings, configs and trials into its "
                              "folder, which must be yours alone; choose another --name or --storage-path")

    def settings(self) -> SearchSettings:
        return SearchSettings.from_json(self._read(self.SETTINGS))

    def base_config(self) -> Config:
        try:
            return from_dict(load_yaml(self._read(self.BASE_CONFIG), str(self.file(self.BASE_CONFIG))))
        except (ConfigError, TypeError, AttributeError) as e:
            raise ConfigError(f"{self.file(self.BASE_CONFIG)}: not the base config this search wrote ({e}); the "
                              "experiment folder is damaged: start a new search") from None

    def _read(self, name: str) -> str:
        try:
            return self.file(name).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{self.file(name)}: cannot read it ({getattr(e, 'strerror', None) or e}); the "
                              "experiment folder is damaged: start a new search") from None

    def save(self, base: Config, settings: SearchSettings) -> None:
        self.file(self.BASE_CONFIG).write_text(config_yaml(base))
        self.file(self.SETTINGS).write_text(settings.to_json())

    def lock(self) -> None:
        """Hold the experiment for this process until it ends (the kernel drops the lock with it): a
        second search into it, or a second --resume, is refused at once, naming this one."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(f"the search experiment {self.path}",
                               "wait for it to finish, or stop it, then run --resume")
        except (LockBusy, LockUnavailable) as e:
            raise ConfigError(str(e)) from None

    def unlock(self) -> None:
        self._lock.release()


class TrialDir(Folder):
    """A trial's folder in its experiment: one `AttemptDir` per run of the trial."""

    def attempt(self, number: int) -> "AttemptDir":
        return AttemptDir(self.file(f"attempt{number}"), number)

    def attempts_started(self) -> int:
        return sum(1 for _ in self.path.glob("attempt*"))

    def new_attempt(self) -> "AttemptDir":
        attempt = self.attempt(self.attempts_started() + 1)
        attempt.path.mkdir(parents=True)
        return attempt


class AttemptDir(Folder):
    """One run of a trial: a run directory, log and config per seed, and the reports staged for Tune."""

    EVALUATION = "evaluation.json"
    """In each staged report: {"epoch": e}, the 1-based epoch of the evaluation it belongs to."""

    def __init__(self, path: str | os.PathLike, number: int):
        super().__init__(path)
        self.number = number

    def seed_run(self, seed: int) -> RunDir:
        return RunDir(self.file(f"seed{seed}"))

    def seed_log(self, seed: int) -> Path:
        return self.file(f"seed{seed}.log")

    def seed_config(self, seed: int) -> Path:
        return self.file(f"seed{seed}.yaml")

    def report(self, epoch: int) -> Path:
        """Where the seeds' checkpoints of 0-based `epoch` wait for Tune: one `seed<s>/<tag>` each."""
        return self.file("reports") / f"epoch{epoch + 1:04d}"

    def mark_report(self, epoch: int) -> None:
        (self.report(epoch) / self.EVALUATION).write_text(json.dumps({"epoch": epoch + 1}))

    @classmethod
    def reported_epoch(cls, report: Path) -> int:
        """The 1-based epoch a report (as Tune hands it back) belongs to; 0 when it does not say."""
        marker = Path(report) / cls.EVALUATION
        return json.loads(marker.read_text())["epoch"] if marker.exists() else 0

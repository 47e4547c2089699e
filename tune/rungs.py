"""When the search may stop a trial: only once its val metric carries signal.

Two rules, both derived from the training config:

- **The first rung comes after the signal can exist.** Before warm-up ends, and before ATS has
  brought the keep ratio down to `p_end` (the ratio every evaluation uses), a trial's val metric
  says little about its parameters: on the synthetic set every trial sits at the chance level
  after its first epoch. ASHA's grace period is therefore the first evaluation at or after
  max(warm-up, ATS horizon), counted in evaluations (`eval.every` epochs apart).
- **Chance-level trials are not ranked.** A rung at which every trial so far is within noise of a
  random ranking (val R@1 at most `chance + SIGNAL_Z` binomial standard errors over the val
  queries) cannot order them: `SignalASHA` stops no trial there, and counts the decision it held.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from itself.config import Config
from itself.data.sources import micro_batches_per_epoch
from itself.model.ats import KeepSchedule

SIGNAL_Z = 3.0
"""Standard errors above the chance level before a val R@1 counts as signal (3: a chance-level
trial exceeds it about once in 700 evaluations)."""


def steps_per_epoch(cfg: Config, world_size: int) -> int:
    """Optimizer steps per epoch, counted as the trainer counts them: the epoch plan of rank 0
    (counted without torch: the driver never trains)."""
    layout = cfg.layout(world_size)
    micro = micro_batches_per_epoch(cfg.data, world_size=world_size, micro_batch=layout.micro_batch, seed=cfg.seed)
    return micro // cfg.train.grad_accum


def signal_onset_epochs(cfg: Config, steps_per_epoch: int) -> float:
    """Epochs after which a trial trains as its parameters say: warm-up over and the ATS keep
    ratio at p_end (the ratio evaluation uses). A fixed keep ratio has no horizon."""
    schedule = KeepSchedule.from_config(cfg.model, steps_per_epoch)
    if schedule.mode == "fixed":
        ats_epochs = 0.0
    elif schedule.mode == "step":
        ats_epochs = schedule.horizon() / max(1, steps_per_epoch)
    else:  # epoch level: the horizon is in epochs
        ats_epochs = float(schedule.horizon())
    return max(cfg.train.warmup_epochs, ats_epochs)


def evaluations(cfg: Config) -> int:
    """Val evaluations of a full run: every `eval.every` epochs, and after the last."""
    return math.ceil(cfg.train.epochs / cfg.eval.every)


def grace_evaluations(cfg: Config, steps_per_epoch: int) -> int:
    """ASHA's first rung in evaluations: the first evaluation at or after the signal onset, at
    most the run's last evaluation (then ASHA stops nothing early)."""
    onset_epoch = max(1, math.ceil(signal_onset_epochs(cfg, steps_per_epoch) - 1e-9))
    return min(math.ceil(onset_epoch / cfg.eval.every), evaluations(cfg))


def chance_floor(chance_r1: float, queries: int, seeds: int = 1) -> float:
    """The val R@1 (%) a random ranking stays below: chance + SIGNAL_Z standard errors of a mean
    R@1 over `queries` queries, averaged over `seeds` runs (each query a hit with p = chance)."""
    p = chance_r1 / 100
    return chance_r1 + SIGNAL_Z * 100 * math.sqrt(p * (1 - p) / (queries * seeds))


class SignalASHA(AsyncHyperBandScheduler):
    """ASHA that decides on signal: where ASHA would stop a trial at a rung whose trials are all at
    most `floor` val R@1 (within noise of chance), the trial continues. Each stop and each stop held
    back is appended to `decisions` (JSON lines) when given.

    The rung a result lands in is the one ASHA records it in (the same bookkeeping, read before
    ASHA's own call): the highest milestone the trial reached and has not been recorded at."""

    def __init__(self, *, floor: float, signal_metric: str = "val_R1", decisions: Path | None = None, **asha):
        # A trial at its last evaluation is never stopped: its run ends by itself, with the test
        # evaluation and the exported model.
        super().__init__(stop_last_trials=False, **asha)
        self.floor, self.signal_metric, self.decisions = floor, signal_metric, decisions
        self.held = 0
        self._rung_signal: dict[float, dict[str, float]] = {}  # milestone -> trial id -> val R@1

    def _rung_of(self, trial, progress) -> float | None:
        bracket = self._trial_info.get(trial.trial_id)
        if bracket is None:
            return None
        for milestone, recorded in bracket._rungs:  # (Ray's rung list, highest milestone first)
            if progress >= milestone and trial.trial_id not in recorded:
                return milestone
        return None

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        progress = result.get(self._time_attr)
        rung = None
        if progress is not None and self.signal_metric in result and progress < self._max_t:
            rung = self._rung_of(trial, progress)
            if rung is not None:
                self._rung_signal.setdefault(rung, {})[trial.trial_id] = result[self.signal_metric]
        action = super().on_trial_result(tune_controller, trial, result)
        if action != TrialScheduler.STOP:
            return action
        if rung is None:  # (its last evaluation: ASHA's bracket may still rank it there)
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        at_chance = max(self._rung_signal[rung].values()) <= self.floor
        self._log(trial, result, rung, "held: the rung is within noise of chance" if at_chance else "stop")
        if at_chance:
            self._num_stopped -= 1
            self.held += 1
            return TrialScheduler.CONTINUE
        return action

    def _log(self, trial, result: dict, rung: float, decision: str) -> None:
        if self.decisions is None:
            return
        event = {"trial_id": trial.trial_id, "evaluation": result[self._time_attr], "rung": rung,
                 self._metric: result[self._metric], self.signal_metric: result[self.signal_metric],
                 "rung_best": max(self._rung_signal[rung].values()), "floor": self.floor, "decision": decision}
        with open(self.decisions, "a") as f:
            f.write(json.dumps(event) + "\n")

    def debug_string(self) -> str:
        return (f"{super().debug_string()}\nSignalASHA: {self.held} stop(s) held at rungs within noise of chance "
                f"(val R@1 <= {self.floor:.2f})")

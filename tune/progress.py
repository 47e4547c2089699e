"""What the search prints while it runs, in place of Ray's trial table (which shows a trial ASHA
stopped as completed, with its last value rather than its best): one line when a trial starts,
one per evaluation it reports, and one when it ends, saying whether ASHA stopped it."""

from __future__ import annotations

import time

from ray.tune import Callback


class Progress(Callback):
    """Prints each trial's parameters, evaluations (the metric and the trial's best so far) and end."""

    def __init__(self, metric: str, max_evaluations: int):
        self.metric, self.max_evaluations = metric, max_evaluations
        self.best: dict[str, float] = {}
        self.reached: dict[str, int] = {}

    def _say(self, trial, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] trial {trial.trial_id}: {text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        params = trial.config.get("point", trial.config)
        shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
                          if k not in ("seeds", "source_trial"))
        self._say(trial, f"started ({shown})")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric not in result:
            return
        value, evaluation = result[self.metric], int(result.get("training_iteration", 0))
        self.best[trial.trial_id] = max(value, self.best.get(trial.trial_id, value))
        self.reached[trial.trial_id] = evaluation
        self._say(trial, f"evaluation {evaluation}/{self.max_evaluations}: {self.metric} {value:.2f} "
                         f"(its best {self.best[trial.trial_id]:.2f})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        reached = self.reached.get(trial.trial_id, 0)
        best = self.best.get(trial.trial_id)
        how = (f"ran all {reached} evaluations" if reached >= self.max_evaluations else
               f"stopped by ASHA after evaluation {reached}/{self.max_evaluations}")
        self._say(trial, how + (f"; its best {self.metric} {best:.2f}" if best is not None else ""))

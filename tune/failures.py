"""Failed trial attempts: said when they happen, kept in the experiment's failures.jsonl, and shown
in the results table. A trial whose process failed or whose node died is retried from its last
checkpoint (--max-failures); this log is how the table knows it failed at all."""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune import Callback

from tune.folders import ExperimentDir


class FailureLog(Callback):
    """Prints every failed attempt and appends it to `<experiment>/failures.jsonl`: the node it ran
    on, after which evaluation, the error, and whether it is retried."""

    def __init__(self, exp_dir: Path):
        self.path = ExperimentDir(exp_dir).file(ExperimentDir.FAILURES)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._record(trial, retried=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, retried=False)

    def _record(self, trial, retried: bool) -> None:
        last = trial.last_result or {}  # (the attempt's last report, or an earlier attempt's)
        event = {"trial_id": trial.trial_id, "failure": trial.run_metadata.num_failures,
                 "after_evaluation": last.get("training_iteration", 0),
                 "node": f"{last.get('node', '?')}({str(last.get('node_id', ''))[:8]})",
                 "error": last_error(trial.error_file), "retried": retried}
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
        print(f"trial {event['trial_id']} failed on {event['node']} after evaluation {event['after_evaluation']}: "
              f"{event['error']} -- " + ("retrying from its last checkpoint" if retried else "no retries left"),
              flush=True)


def last_error(error_file: str | None) -> str:
    """The first line of the newest failure Tune wrote for a trial."""
    if not error_file or not Path(error_file).exists():
        return "unknown error"
    newest = Path(error_file).read_text().split("Failure # ")[-1]
    lines = [line.strip() for line in newest.splitlines()[1:] if line.strip()]
    return lines[0][:300] if lines else "unknown error"


def failures_of(exp_dir: Path) -> dict[str, list[dict]]:
    """trial id -> its failed attempts, as the log recorded them."""
    path = ExperimentDir(exp_dir).file(ExperimentDir.FAILURES)
    found: dict[str, list[dict]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            event = json.loads(line)
            found.setdefault(event["trial_id"], []).append(event)
    return found

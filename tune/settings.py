"""The search's settings: everything it decides before its first trial, kept in search.json so that
a resumed search continues with the same seeds, rungs and noise floor, whatever its command line."""

from __future__ import annotations

import dataclasses
import json

from itself.config import Config, ConfigError
from itself.fusion import chance_r1
from tune import rungs

SHORT_SCHEDULE = ("train.epochs=8", "train.warmup_epochs=1", "model.t_small=3")
"""What the search trains on the synthetic preset when no train.epochs is given: a small search."""


@dataclasses.dataclass
class SearchSettings:
    metric: str
    """The val metric ASHA, the searcher and the ranking maximise: `val_R1` or `val_mAP`."""
    searcher: str
    """`optuna` (TPE) or `random` (Optuna's RandomSampler)."""
    num_samples: int
    """Configurations to try."""
    searcher_seed: int
    """The searcher's random seed."""
    searched: list[str]
    """The searched parameters: p_start, p_end, discard_ratio, and mars_layers with --search-layers."""
    seeds: list[int]
    """The training seeds every configuration runs with (the same for all: compared on the same draws)."""
    confirm_top: int
    """How many of the best configurations are trained again with `confirm_seeds` (0: none)."""
    confirm_seeds: list[int]
    """The seeds of the confirmation runs, none of them in `seeds`."""
    gpus_per_trial: int
    """GPUs per seed (> 1: each seed under torchrun with DeepSpeed)."""
    cpus_per_trial: int
    """CPUs per seed."""
    max_failures: int
    """Retries of a failed trial, from its last checkpoint."""
    reduction_factor: int
    """ASHA's reduction factor (rungs at grace x factor^k evaluations; it keeps the top 1/factor)."""
    max_evaluations: int
    """Val evaluations of a full trial (the training config's epochs / eval.every)."""
    grace_period: int
    """ASHA's first rung, in evaluations: `derived_grace_period`, or --grace-period."""
    derived_grace_period: int
    """The first evaluation after warm-up and the ATS horizon (tune.rungs.grace_evaluations)."""
    steps_per_epoch: int
    """Optimizer steps per epoch of a trial, counted as the trainer counts them."""
    signal_onset_epochs: float
    """Epochs after which a trial trains as its parameters say (warm-up over, ATS at p_end)."""
    val_chance_R1: float
    """Val R@1 (%) of a random ranking."""
    val_queries: int
    """Val caption queries (the chance level's standard error depends on them)."""
    signal_floor_R1: float
    """Val R@1 (%) at or below which a rung is within noise of chance: ASHA stops nobody there."""
    schedule: list[str] = dataclasses.field(default_factory=list)
    """Overrides the trials train with on top of the base config (the synthetic preset's short
    schedule, `SHORT_SCHEDULE`); best_config.yaml leaves them out. Empty: the base config's own."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "SearchSettings":
        try:
            values = json.loads(text)
            return cls(**values)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"search.json: not the settings of a search ({e}); the experiment folder is damaged: "
                              "start a new search") from None

    def demand(self, seeds: int) -> dict:
        """What a trial of `seeds` seeds asks of one node: they all train at once."""
        return {"CPU": self.cpus_per_trial * seeds, "GPU": self.gpus_per_trial * seeds}

    def largest_demand(self) -> dict:
        """What the largest trial (a search or a confirmation trial) asks of one node."""
        return self.demand(max(len(self.seeds), len(self.confirm_seeds) if self.confirm_top else 0))


def short_schedule(preset: str, overrides: list[str]) -> list[str]:
    """The overrides a search trains with on top of the base config: on the synthetic preset with
    no train.epochs given, the short schedule (less what the user set), else none."""
    given = {o.partition("=")[0].strip() for o in overrides}
    if preset != "synthetic" or "train.epochs" in given:
        return []
    return [o for o in SHORT_SCHEDULE if o.partition("=")[0] not in given]


def derive(args, searched: Config, info: dict, schedule: list[str]) -> SearchSettings:
    """The settings of a new search from its arguments, the config its trials train (`searched`:
    the base config with `schedule` applied) and its dataset's dataset.json (`info`)."""
    world = max(1, args.gpus_per_trial)
    spe = rungs.steps_per_epoch(searched, world)
    max_evaluations = rungs.evaluations(searched)
    derived = rungs.grace_evaluations(searched, spe)
    seeds = [searched.seed + i for i in range(args.seeds)]
    chance, queries = chance_r1(info, "val"), info["splits"]["val"]["captions"]
    return SearchSettings(
        metric=f"val_{args.metric}", searcher=args.searcher, num_samples=args.num_samples, searcher_seed=args.seed,
        searched=["p_start", "p_end", "discard_ratio"] + (["mars_layers"] if args.search_layers else []),
        seeds=seeds, confirm_top=args.confirm_top,
        confirm_seeds=[seeds[-1] + 1 + i for i in range(args.confirm_seeds)],
        gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial, max_failures=args.max_failures,
        reduction_factor=args.reduction_factor, max_evaluations=max_evaluations,
        grace_period=min(args.grace_period, max_evaluations) if args.grace_period else derived,
        derived_grace_period=derived, steps_per_epoch=spe,
        signal_onset_epochs=rungs.signal_onset_epochs(searched, spe), val_chance_R1=chance, val_queries=queries,
        signal_floor_R1=rungs.chance_floor(chance, queries, len(seeds)), schedule=list(schedule))

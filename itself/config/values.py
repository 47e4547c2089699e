"""Names and limits the config sections share: the values a field accepts, bounded messages."""

from __future__ import annotations

import re

import cluster_configs

from ..archs import arch_spec, known_archs
from ..errors import ConfigError

NONFINITE_POLICIES = ("skip", "stop")
SCHEDULES = ("epochs", "steps")
"""Learning-rate and evaluation schedules: per epoch (the paper), or per step (pre-training)."""
ATS_MODES = ("step", "epoch", "fixed")
"""Token schedulers: ATS per step (the paper's best), ATS per epoch, or a fixed keep ratio."""
SELECTION_STRATEGIES = ("mars", "mean_max", "mean_min", "std_max", "std_min")
"""Saliency strategies for GRAB's top-k, besides `layer:<i>` (one layer's attention)."""
REPORT_TO = ("tensorboard", "wandb", "none")
"""Where a run's metrics and retrieval images go besides train.log and metrics.jsonl."""
EVAL_SELECTIONS = ("both", "train", "last_layer")
"""GRAB selections at evaluation (see EvalConfig.selection)."""
MAX_ITEMS = 1000
"""Most values a list field takes (bounded work for any input)."""
T_SMALL = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(steps?|epochs?)?\s*")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""Run and job names: they name folders and SLURM jobs, so no path separators or shell syntax."""
DEEPSPEED_CONFIGS = cluster_configs.DEEPSPEED


def short_repr(value) -> str:
    """A bounded repr for messages: a hostile value (a deep or huge structure) never floods them."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxstring, r.maxother = 3, 8, 8, 8, 80, 80
    return r.repr(value)


def spec_or_error(arch: str):
    """The architecture's spec, or a ConfigError listing what the backbone can build."""
    spec = arch_spec(arch)
    if spec is None:
        raise ConfigError(f"model.arch: must be one of {', '.join(known_archs())}, got {short_repr(arch)}")
    return spec

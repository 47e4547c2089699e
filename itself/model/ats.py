"""ATS, the adaptive token scheduler: how many tokens GRAB keeps at a given point of training.

The keep ratio decays exponentially from `p_start` to `p_end` over the first `T` = t_small
units (steps at step level, the paper's best; epochs at epoch level), then stays at `p_end`:

    k = floor(n * p_start * (p_end / p_start) ** (t / T)),  t clamped to [1, T]

t counts from 1: the first optimizer step (or epoch) is t = 1, as in the reference code. Without
ATS (`fixed`), a constant ratio is used. Inference uses the final ratio.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import ATS_MODES, ModelConfig


def num_keep(num_tokens: int, step: int, total_steps: int, p_start: float, p_end: float) -> int:
    """Tokens to keep out of `num_tokens` at `step` of a `total_steps` = T schedule (at least 1)."""
    if total_steps < 1:
        raise ValueError(f"total_steps (T) must be >= 1, got {total_steps}")
    t = min(max(step, 1), total_steps)
    # The epsilon keeps exact products (192 * 0.5 at t = T) from flooring one below.
    return max(1, math.floor(num_tokens * p_start * (p_end / p_start) ** (t / total_steps) + 1e-9))


@dataclasses.dataclass
class KeepSchedule:
    """The keep schedule of one model: ATS at step or epoch level, or a fixed ratio."""

    mode: str
    """step, epoch or fixed (the values come from ModelConfig: ats, p_start, p_end, t_small, fixed_ratio)."""
    p_start: float
    p_end: float
    t_small: float
    """T, in `t_small_unit`."""
    t_small_unit: str
    """`steps` or `epochs`."""
    fixed_ratio: float
    steps_per_epoch: int = 1
    """Optimizer steps per epoch (of the data plan): converts T between steps and epochs."""

    def __post_init__(self):
        if self.mode not in ATS_MODES:
            raise ValueError(f"ATS mode must be one of {ATS_MODES}, got {self.mode!r}")

    @classmethod
    def from_config(cls, cfg: ModelConfig, steps_per_epoch: int = 1) -> "KeepSchedule":
        value, unit = cfg.t_small_parsed()
        return cls(cfg.ats, cfg.p_start, cfg.p_end, value, unit, cfg.fixed_ratio, steps_per_epoch)

    def horizon(self) -> int:
        """T in this schedule's units: steps at step level, epochs at epoch level (at least 1)."""
        spe = max(1, self.steps_per_epoch)
        if self.mode == "step":
            steps = self.t_small if self.t_small_unit == "steps" else self.t_small * spe
        else:
            steps = self.t_small / spe if self.t_small_unit == "steps" else self.t_small
        return max(1, round(steps))

    def num_keep(self, num_tokens: int, step: int | None) -> int:
        """Tokens to keep at optimizer step `step` (1-based: the first step is 1), or the final count
        when `step` is None (inference)."""
        if self.mode == "fixed":
            return max(1, math.floor(num_tokens * self.fixed_ratio + 1e-9))
        total = self.horizon()
        if step is None:
            t = total
        elif self.mode == "step":
            t = step
        else:  # epoch level: the current epoch, counted from 1
            t = (max(step, 1) - 1) // max(1, self.steps_per_epoch) + 1
        return num_keep(num_tokens, t, total, self.p_start, self.p_end)

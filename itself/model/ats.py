"""ATS, the adaptive token scheduler: how many tokens GRAB keeps at a given point of training.

The keep ratio decays exponentially from `p_start` to `p_end` over the first `T` = t_small
units (steps at step level, the paper's best; epochs at epoch level), then stays at `p_end`:

    k = floor(n * p_start * (p_end / p_start) ** (t / T)),  t clamped to [1, T]

Without ATS (`fixed`), a constant ratio is used. Inference uses the final ratio.
"""

from __future__ import annotations

import dataclasses
import math

MODES = ("step", "epoch", "fixed")


def num_keep(num_tokens: int, step: int, total_steps: int, p_start: float = 0.65, p_end: float = 0.5) -> int:
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
    t_small_epochs: float
    """T in epochs; converted to steps at step level."""
    fixed_ratio: float
    steps_per_epoch: int = 1
    """Optimizer steps per epoch; the trainer sets it once the data plan is known."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"ATS mode must be one of {MODES}, got {self.mode!r}")

    def num_keep(self, num_tokens: int, step: int | None) -> int:
        """Tokens to keep at global step `step` (0-based), or the final count when `step` is None."""
        if self.mode == "fixed":
            return max(1, math.floor(num_tokens * self.fixed_ratio + 1e-9))
        if self.mode == "step":
            total = max(1, round(self.t_small_epochs * self.steps_per_epoch))
            t = total if step is None else step
        else:  # epoch level: the current epoch, counted from 1
            total = max(1, round(self.t_small_epochs))
            t = total if step is None else step // max(1, self.steps_per_epoch) + 1
        return num_keep(num_tokens, t, total, self.p_start, self.p_end)

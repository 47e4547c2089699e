"""The policy for steps with a non-finite loss or gradient (`train.nonfinite`): such a step is never
applied. DeepSpeed skips it itself under ZeRO >= 1 or bf16; without both, the trainer drops the
gradients (`drop_nonfinite_grads`). A skipped step's BatchNorm statistics are undone
(`BatchNormStats`), the skip is counted and logged, and the run stops (`NonFiniteError`, after a
checkpoint of the last finite state) at the first one (`stop`) or after `max_skipped_steps` in a row.
"""

from __future__ import annotations

import logging
import math

import torch

from .config import TrainConfig

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (train.nonfinite)."""


class BatchNormStats:
    """The running statistics of the model's BatchNorm layers, copied before a step so that a
    skipped step can undo what its batch changed (into preallocated buffers: no allocation per step)."""

    def __init__(self, module: torch.nn.Module):
        self.buffers = [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        for b, s in zip(self.buffers, self.saved):
            s.copy_(b)

    def restore(self) -> None:
        with torch.no_grad():
            for b, s in zip(self.buffers, self.saved):
                b.copy_(s)


def drop_nonfinite_grads(module: torch.nn.Module, proc) -> bool:
    """Without ZeRO and bf16 DeepSpeed steps a plain optimizer that applies whatever gradients it
    gets: drop them all (Adam then leaves every parameter and its moments alone) if any is
    non-finite on any rank; True if dropped. The other setups skip such steps themselves
    (`engine.skipped_steps`)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
    if not proc.any(not finite):
        return False
    for p in module.parameters():
        p.grad = None
    return True


class SkipPolicy:
    """Counts skipped steps and says when the run must stop."""

    def __init__(self, t: TrainConfig):
        self.t, self.in_a_row = t, 0

    def applied(self) -> None:
        self.in_a_row = 0

    def skipped(self, state, losses: list[float]) -> dict:
        """Count a skipped step of `state` (its losses on this rank); returns its metrics record."""
        state.skipped_steps += 1
        self.in_a_row += 1
        what = "non-finite loss" if any(not math.isfinite(v) for v in losses) else "non-finite gradients"
        log.info(f"step {state.global_step} (epoch {state.epoch + 1}): {what} (loss "
                 f"{', '.join(f'{v:.4g}' for v in losses)} on rank 0): update skipped "
                 f"({self.in_a_row} in a row, {state.skipped_steps} in all)")
        return {"epoch": state.epoch, "reason": what, "in_a_row": self.in_a_row, "skipped_steps": state.skipped_steps}

    def must_stop(self) -> bool:
        return self.t.nonfinite == "stop" or bool(self.t.max_skipped_steps and self.in_a_row >= self.t.max_skipped_steps)

    def error(self, state, reason: str, tag: str) -> NonFiniteError:
        why = ("train.nonfinite=stop" if self.t.nonfinite == "stop"
               else f"{self.in_a_row} skipped steps in a row reach train.max_skipped_steps={self.t.max_skipped_steps}")
        return NonFiniteError(
            f"{reason} at step {state.global_step} (epoch {state.epoch + 1}); stopping ({why}). Checkpoint {tag} holds "
            "the last finite weights (the update of this step was not applied). Lower train.lr, set train.grad_clip, "
            "or use train.nonfinite=skip, then continue with train.resume=latest")

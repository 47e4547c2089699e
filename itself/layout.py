"""How a global batch splits over ranks, gradient accumulation, data slots and loader workers.

The one place that derives the per-rank micro-batch and checks that everything divides: the
config's validation, the trainer, the DeepSpeed config and the data pipeline all ask here. A
layout that does not divide is a ConfigError that names the values that would.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

from .errors import ConfigError

AUTO_WORKERS = 8
"""Slot readers per rank of `data.num_workers=-1` (auto) in the layout; the loader processes that
run them are capped by the rank's cores (itself.cpus), which does not change the batches."""


@dataclasses.dataclass(frozen=True)
class DataLayout:
    micro_batch: int
    """(image, caption) pairs per rank per micro-step: batch_size / (world_size x grad_accum)."""
    num_slots: int
    """Data slots of the job (each a disjoint part of the train data, read as one stream)."""
    workers_per_rank: int
    """Slot readers per rank: DataLoader workers (or 1, the rank itself, without workers)."""
    slot_batch: int
    """Pairs each slot adds to every global micro-batch (a multiple of num_instance)."""


def data_layout(batch_size: int, world_size: int, grad_accum: int, num_instance: int, num_workers: int,
                num_slots: int) -> DataLayout:
    """The layout of a job, or a ConfigError naming the fields to change and values that work.

    A worker must add at least one identity (num_instance pairs) to each step, so a rank uses at
    most micro_batch / num_instance workers, and a number that divides its slots. Slots default
    (num_slots = 0) to ranks x workers; a fixed count makes batches independent of the world size.
    """
    num_workers = AUTO_WORKERS if num_workers < 0 else num_workers
    unit = world_size * grad_accum * num_instance
    if batch_size % unit:
        raise ConfigError(
            f"train.batch_size: {batch_size} is not divisible by world_size x train.grad_accum x data.num_instance "
            f"= {world_size} x {grad_accum} x {num_instance} = {unit}; choose a batch size that is a multiple of "
            f"{unit}: " + " or ".join(_fixes(b, world_size, grad_accum, num_instance, num_slots)
                                      for b in _batch_sizes(batch_size, unit)))
    step_pairs = batch_size // grad_accum
    micro = step_pairs // world_size
    cap = max(1, min(num_workers, micro // num_instance))
    if num_slots == 0:
        return DataLayout(micro, world_size * cap, cap, step_pairs // (world_size * cap))
    fits = _slot_counts(step_pairs, world_size, num_instance)
    if num_slots not in fits:
        why = (f"is not a multiple of the world size {world_size}: every rank must own as many data slots"
               if num_slots % world_size else
               f"does not split the {step_pairs} pairs of a step into equal shares of whole identity groups "
               f"(multiples of data.num_instance = {num_instance})")
        raise ConfigError(f"data.num_slots: {num_slots} {why}; use data.num_slots={_nearest(fits, num_slots)} (with "
                          f"{world_size} ranks: {', '.join(map(str, fits))}), or 0 (ranks x workers; batches then "
                          "depend on the world size)")
    per_rank = num_slots // world_size
    workers = max(d for d in range(1, cap + 1) if per_rank % d == 0)
    return DataLayout(micro, num_slots, workers, step_pairs // num_slots)


def loader_processes(layout: DataLayout, world_size: int, cap: int) -> int:
    """DataLoader processes that read a rank's slots with at most `cap` of them: the largest divisor
    of the rank's slots up to the layout's workers and `cap` (0: the rank reads them itself). Each
    process reads consecutive slots and the parts join in slot order, so the batches are the same."""
    per_rank = layout.num_slots // world_size
    fits = [d for d in range(1, min(layout.workers_per_rank, cap) + 1) if per_rank % d == 0]
    return max(fits, default=0)


def _slot_counts(step_pairs: int, world_size: int, num_instance: int) -> list[int]:
    """Slot counts that work: multiples of the world size giving each slot whole identity groups."""
    return [s for s in range(world_size, step_pairs // num_instance + 1, world_size)
            if step_pairs % s == 0 and (step_pairs // s) % num_instance == 0]


def _nearest(counts: list[int], wanted: int) -> int:
    return min(counts, key=lambda s: (abs(s - wanted), s))


def _batch_sizes(batch_size: int, unit: int) -> list[int]:
    """The multiples of `unit` nearest to `batch_size` (one or two)."""
    return [b for b in (batch_size // unit * unit, (batch_size // unit + 1) * unit) if b > 0]


def _fixes(batch_size: int, world_size: int, grad_accum: int, num_instance: int, num_slots: int) -> str:
    """Overrides that make a layout with this batch size work (with a slot count when one is set)."""
    fits = _slot_counts(batch_size // grad_accum, world_size, num_instance)
    slots = f" data.num_slots={_nearest(fits, num_slots)}" if num_slots and num_slots not in fits else ""
    return f"train.batch_size={batch_size}{slots}"


def batched(items: Iterable, n: int, keep_short: bool = True) -> Iterator[list]:
    """Consecutive lists of `n` of `items`; the short last one too, unless `keep_short` is False
    (an optimizer step takes exactly grad_accum micro-batches)."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group and keep_short:
        yield group

"""How a global batch splits over ranks, gradient accumulation, data slots and loader workers.

The one place that derives the per-rank micro-batch and checks that everything divides: the
config's validation, the trainer, the DeepSpeed config and the data pipeline all ask here.
"""

from __future__ import annotations

import dataclasses

from .errors import ConfigError


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

    @property
    def slots_per_rank(self) -> int:
        return self.micro_batch // self.slot_batch


def data_layout(batch_size: int, world_size: int, grad_accum: int, num_instance: int, num_workers: int,
                num_slots: int) -> DataLayout:
    """The layout of a job, or a ConfigError naming the fields to change.

    A worker must add at least one identity (num_instance pairs) to each step, so a rank uses at
    most micro_batch / num_instance workers, and a number that divides its slots. Slots default
    (num_slots = 0) to ranks x workers; a fixed count makes batches independent of the world size.
    """
    step_pairs, rem = divmod(batch_size, grad_accum)
    micro, rem2 = divmod(step_pairs, world_size)
    if rem or rem2 or micro < num_instance or micro % num_instance:
        unit = world_size * grad_accum * num_instance
        raise ConfigError(
            f"train.batch_size: {batch_size} is not divisible by world_size x train.grad_accum x data.num_instance "
            f"= {world_size} x {grad_accum} x {num_instance} = {unit}; choose a batch size that is a multiple of "
            f"{unit}")
    cap = max(1, min(num_workers, micro // num_instance))
    if num_slots == 0:
        num_slots, workers = world_size * cap, cap
    else:
        if num_slots % world_size:
            raise ConfigError(f"data.num_slots: {num_slots} is not a multiple of the world size {world_size}: every "
                              "rank must own as many data slots (0 = ranks x workers)")
        workers = max(d for d in range(1, cap + 1) if (num_slots // world_size) % d == 0)
    slot_batch, rem = divmod(step_pairs, num_slots)
    if rem or slot_batch % num_instance or slot_batch == 0:
        raise ConfigError(f"data.num_slots: each of the {num_slots} data slots needs an equal share of the "
                          f"{step_pairs} pairs of a step, a multiple of data.num_instance = {num_instance}: change "
                          "train.batch_size or data.num_slots")
    return DataLayout(micro, num_slots, workers, slot_batch)

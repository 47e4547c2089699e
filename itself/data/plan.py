"""The epoch plan: which pairs form which batch on which rank and worker, from metadata alone.

Computed identically on every rank and worker from the shard index (no image bytes, no
communication), so all of them agree on how many batches each yields:

1. Shards go to *slots* (rank x worker), balancing the number of (image, caption) pairs;
   identities never span shards, so slots are identity-disjoint and the identity constraint of
   a micro-batch also holds for the global batch.
2. In each slot, every identity's pairs are shuffled and cut into groups of `num_instance`
   (a remainder too small for a group is dropped); shards are read in windows of
   `window_shards`; from the groups pooled so far, batches of `micro_batch // num_instance`
   groups of *distinct* identities are formed in random rounds; groups that do not fill a
   batch wait for the next window.
3. Every slot keeps the first `min over slots` batches, so every rank runs the same number of
   steps (uneven ranks hang collectives). What is not used is counted as dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

# A pair to load: (shard index in the shard list, sample key, caption index, person id).
Pair = tuple[int, str, int, int]


class DataError(RuntimeError):
    """The data cannot be read as configured; the message names the file, field or flag."""


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """What one train shard holds: its identities in order, each with (key, num captions) per image."""

    url: str
    identities: tuple[tuple[int, tuple[tuple[str, int], ...]], ...]

    @property
    def num_pairs(self) -> int:
        return sum(n for _, images in self.identities for _, n in images)


@dataclasses.dataclass
class EpochPlan:
    slot_shards: list[list[int]]
    """Per slot (rank * workers_per_rank + worker): shard indices in the order they are read."""
    slot_batches: list[list[list[Pair]]]
    """Per slot: its batches, each `micro_batch` pairs, grouped `num_instance` per identity."""
    total_pairs: int
    """All (image, caption) pairs in the shards."""

    @property
    def batches_per_slot(self) -> int:
        return len(self.slot_batches[0]) if self.slot_batches else 0

    @property
    def used_pairs(self) -> int:
        return sum(len(b) for batches in self.slot_batches for b in batches)

    @property
    def dropped_pairs(self) -> int:
        return self.total_pairs - self.used_pairs


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (seed, epoch, slot, ...), stable across processes and runs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_slots(num_shards: int, world_size: int, workers_per_rank: int) -> None:
    """Each rank x worker slot reads whole shards: there must be at least one shard per slot."""
    slots = world_size * workers_per_rank
    if num_shards < slots:
        raise DataError(
            f"{num_shards} train shards are fewer than ranks x workers = {world_size} x {workers_per_rank} "
            f"= {slots}: every rank and worker needs at least one shard. Write more, smaller shards "
            f"(python -m shards build ... --shard-samples N) or use fewer workers (data.num_workers).")


def assign_shards(shards: list[ShardIndex], num_slots: int, rng: random.Random) -> list[list[int]]:
    """Shards to slots, largest first to the least-loaded slot; ties broken at random."""
    order = list(range(len(shards)))
    rng.shuffle(order)
    order.sort(key=lambda i: -shards[i].num_pairs)  # stable: equal sizes stay in random order
    loads = [0] * num_slots
    slots: list[list[int]] = [[] for _ in range(num_slots)]
    for i in order:
        s = min(range(num_slots), key=lambda j: (loads[j], len(slots[j]), j))
        slots[s].append(i)
        loads[s] += shards[i].num_pairs
    return slots


def _identity_groups(shard_idx: int, shard: ShardIndex, k: int, rng: random.Random):
    """(pid, groups of k pairs) per identity of a shard, pairs shuffled; remainders dropped."""
    for pid, images in shard.identities:
        pairs = [(shard_idx, key, c, pid) for key, n in images for c in range(n)]
        rng.shuffle(pairs)
        usable = len(pairs) - len(pairs) % k
        yield pid, [pairs[i:i + k] for i in range(0, usable, k)]


def _rounds(pool: dict[int, list[list[Pair]]], groups_per_batch: int, rng: random.Random) -> list[list[Pair]]:
    """Batches of distinct identities from the pool: each round takes one group per identity."""
    batches = []
    while len(pool) >= groups_per_batch:
        pids = sorted(pool)
        rng.shuffle(pids)
        full = len(pids) - len(pids) % groups_per_batch
        for i in range(0, full, groups_per_batch):
            batch = []
            for pid in pids[i:i + groups_per_batch]:
                batch.extend(pool[pid].pop())
                if not pool[pid]:
                    del pool[pid]
            batches.append(batch)
    return batches


def plan_slot(shards: list[ShardIndex], order: list[int], micro_batch: int, num_instance: int,
              window_shards: int, rng: random.Random) -> list[list[Pair]]:
    """All batches one slot can form from its shards, read in `order`, window by window."""
    groups_per_batch = micro_batch // num_instance
    pool: dict[int, list[list[Pair]]] = {}
    batches: list[list[Pair]] = []
    for start in range(0, len(order), window_shards):
        for i in order[start:start + window_shards]:
            for pid, groups in _identity_groups(i, shards[i], num_instance, rng):
                if groups:
                    pool.setdefault(pid, []).extend(groups)
        batches.extend(_rounds(pool, groups_per_batch, rng))
    return batches


def plan_epoch(shards: list[ShardIndex], *, world_size: int, workers_per_rank: int, micro_batch: int,
               num_instance: int, window_shards: int, seed: int, epoch: int) -> EpochPlan:
    """The plan of one epoch for every slot of the job (see the module docstring)."""
    if micro_batch < num_instance or micro_batch % num_instance:
        raise DataError(f"micro-batch {micro_batch} is not a positive multiple of data.num_instance "
                        f"{num_instance}: choose batch_size so batch / (world x accumulation) is one")
    num_slots = world_size * workers_per_rank
    check_slots(len(shards), world_size, workers_per_rank)
    slot_shards = assign_shards(shards, num_slots, random.Random(derive_seed(seed, epoch, "assign")))
    slot_batches = []
    for s, order in enumerate(slot_shards):
        rng = random.Random(derive_seed(seed, epoch, "slot", s))
        rng.shuffle(order)
        slot_batches.append(plan_slot(shards, order, micro_batch, num_instance, window_shards, rng))
    n = min(len(b) for b in slot_batches)
    if n == 0:
        raise DataError(
            f"some rank/worker can form no batch of {micro_batch} pairs ({micro_batch // num_instance} identities "
            f"x {num_instance}) from its shards: use a smaller batch, fewer ranks or workers, or more data")
    return EpochPlan(slot_shards, [b[:n] for b in slot_batches], sum(s.num_pairs for s in shards))

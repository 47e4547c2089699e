"""The epoch plan: which pairs form which batch of which data slot, from metadata alone.

The train data is split into `num_slots` *slots*, each a disjoint set of whole shards read as one
stream. At every step each slot contributes one sub-batch of `slot_batch` pairs, and the global
micro-batch is the concatenation of all slots' sub-batches in slot order. Ranks and DataLoader
workers own contiguous ranges of slots. The plan depends on the slot count, never on the world
size or the number of workers: with a fixed `data.num_slots`, the global batches (and so the
results) are the same on 1 or 8 ranks. The plan is computed identically on every rank and worker
from the shard index (no image bytes, no communication):

1. Shards go to slots, balancing the number of (image, caption) pairs; identities never span
   shards, so slots are identity-disjoint and the identity constraint of each sub-batch also
   holds for the global batch.
2. In each slot, every identity's pairs are shuffled and cut into groups of `num_instance`
   (a remainder too small for a group is dropped); shards are read in windows of
   `window_shards`; from the groups pooled so far, sub-batches of `slot_batch // num_instance`
   groups of *distinct* identities are formed in random rounds; groups that do not fill a
   sub-batch wait for the next window.
3. Every slot keeps the first `min over slots` sub-batches, so every rank runs the same number
   of steps (uneven ranks hang collectives). What is not used is counted as dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

from ..errors import DataError

# A pair to load: (shard index in the shard list, sample key, caption index, person id).
Pair = tuple[int, str, int, int]


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
    """Per slot: shard indices in the order they are read."""
    slot_batches: list[list[list[Pair]]]
    """Per slot: its sub-batches, each `slot_batch` pairs, grouped `num_instance` per identity."""
    total_pairs: int
    """All (image, caption) pairs in the shards."""

    @property
    def steps(self) -> int:
        return len(self.slot_batches[0]) if self.slot_batches else 0

    @property
    def used_pairs(self) -> int:
        """Distinct pairs in the epoch's batches (a single-pair identity's pair counts once)."""
        return len({p[:3] for batches in self.slot_batches for b in batches for p in b})

    @property
    def dropped_pairs(self) -> int:
        return self.total_pairs - self.used_pairs


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (seed, epoch, slot, ...), stable across processes and runs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_slots(num_shards: int, num_slots: int, world_size: int, workers_per_rank: int) -> None:
    """Slots read whole shards: there must be at least one shard per slot."""
    if num_shards < num_slots:
        raise DataError(
            f"{num_shards} train shards are fewer than the {num_slots} data slots (ranks x workers = "
            f"{world_size} x {workers_per_rank}, data.num_slots = {num_slots}): every slot needs at least one "
            f"shard. Write more, smaller shards (python -m shards build ... --shard-samples N) or use fewer "
            f"workers (data.num_workers) or slots (data.num_slots).")


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
    """(pid, groups of k pairs) per identity of a shard, pairs shuffled; remainders dropped. An
    identity with fewer than k pairs is filled up by drawing its pairs with replacement (as the
    reference code's sampler): it still trains, once per epoch."""
    for pid, images in shard.identities:
        pairs = [(shard_idx, key, c, pid) for key, n in images for c in range(n)]
        if 0 < len(pairs) < k:
            pairs = [rng.choice(pairs) for _ in range(k)]
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


def plan_slot(shards: list[ShardIndex], order: list[int], slot_batch: int, num_instance: int,
              window_shards: int, rng: random.Random) -> list[list[Pair]]:
    """All sub-batches one slot can form from its shards, read in `order`, window by window."""
    groups_per_batch = slot_batch // num_instance
    pool: dict[int, list[list[Pair]]] = {}
    batches: list[list[Pair]] = []
    for start in range(0, len(order), window_shards):
        for i in order[start:start + window_shards]:
            for pid, groups in _identity_groups(i, shards[i], num_instance, rng):
                if groups:
                    pool.setdefault(pid, []).extend(groups)
        batches.extend(_rounds(pool, groups_per_batch, rng))
    return batches


def plan_epoch(shards: list[ShardIndex], *, num_slots: int, slot_batch: int, num_instance: int,
               window_shards: int, seed: int, epoch: int) -> EpochPlan:
    """The plan of one epoch for every slot (see the module docstring)."""
    if len(shards) < num_slots:
        check_slots(len(shards), num_slots, 1, 1)
    slot_shards = assign_shards(shards, num_slots, random.Random(derive_seed(seed, epoch, "assign")))
    slot_batches = []
    for s, order in enumerate(slot_shards):
        rng = random.Random(derive_seed(seed, epoch, "slot", s))
        rng.shuffle(order)
        slot_batches.append(plan_slot(shards, order, slot_batch, num_instance, window_shards, rng))
    n = min(len(b) for b in slot_batches)
    if n == 0:
        raise DataError(
            f"some data slot can form no sub-batch of {slot_batch} pairs ({slot_batch // num_instance} identities "
            f"x {num_instance}) from its shards: use a smaller batch, fewer slots (data.num_slots, ranks, workers) "
            f"or more data")
    return EpochPlan(slot_shards, [b[:n] for b in slot_batches], sum(s.num_pairs for s in shards))

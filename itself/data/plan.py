"""The epoch plan: which pairs form which batch of which data slot, from metadata alone.

The train data is split into `num_slots` *slots*. At every step each slot contributes one
sub-batch of `slot_batch` pairs, and the global micro-batch is the concatenation of all slots'
sub-batches in slot order; ranks and DataLoader workers own contiguous ranges of slots. The plan
depends on the slot count, never on the world size or the number of workers: with a fixed
`data.num_slots` the global batches (and so the results) are the same on 1 or 64 ranks.

Two levels, so that a process plans only what it reads:

1. `epoch_layout` (every process, vectorised over the compact `IdentityTable`, a few bytes per
   identity): the epoch's identity sequence is a seeded permutation, of the shards with their
   identities following in tar order (`identity_order` `slots`) or of the identities themselves
   (`uniform`: every batch's identities drawn from the whole set, as the reference sampler); the
   sequence is cut into `num_slots` contiguous runs of equal pair counts (identities are never
   split, so slots are identity-disjoint; the cuts make the largest run as small as possible);
   each slot's run is cut into windows of `window_shards` shards (`uniform`: of as many
   identities as that many shards hold on average). It also counts, per slot, the sub-batches
   its windows form, and sets the epoch's step count to the largest: every slot runs the same
   number of steps (uneven ranks hang collectives), slots with fewer fill the difference with
   repeated groups of their identities.
2. `plan_slot` (only the slot's reader, over the slot's own rows): every identity's pairs are
   shuffled and cut into groups of `num_instance` (a last short group is completed by drawing
   the identity's pairs again, so every pair is used); each window's groups are dealt round-robin
   in identity order into sub-batches of distinct identities, short sub-batches are completed
   with repeated groups of other identities of the window, and the sub-batches are shuffled.

Every pair of every identity is used every epoch (mixture weights aside); what is repeated is
counted. Everything follows from (seed, epoch, slot): runs are reproducible and resumable exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

import numpy as np

from ..errors import DataError

# A pair to load: (shard index in the shard list, row of the image in its shard, caption index, person id).
Pair = tuple[int, int, int, int]


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (seed, epoch, slot, ...), stable across processes and runs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclasses.dataclass
class IdentityTable:
    """Every train identity, in shard-list order then tar order: a few numbers each, so that every
    process can lay out an epoch of millions of images without holding their rows."""

    shard: np.ndarray
    """int32: index of the identity's shard in the shard list (an identity never spans shards)."""
    pid: np.ndarray
    """int64: the identity's label."""
    first_row: np.ndarray
    """int32: row (tar order) of its first image within its shard."""
    images: np.ndarray
    """int32: its images (consecutive rows)."""
    pairs: np.ndarray
    """int32: its (image, caption) pairs."""
    copies: np.ndarray
    """float32: how many times an epoch uses it on average (a mixture weight; 1 otherwise)."""
    num_shards: int

    @classmethod
    def from_rows(cls, shard: np.ndarray, pid: np.ndarray, captions: np.ndarray, num_shards: int,
                  copies_of_shard: np.ndarray | None = None) -> "IdentityTable":
        """From one entry per image, in tar order within each shard."""
        return cls.from_runs(*row_runs(shard, pid, captions), num_shards, copies_of_shard)

    @classmethod
    def from_runs(cls, shard: np.ndarray, pid: np.ndarray, images: np.ndarray, pairs: np.ndarray, num_shards: int,
                  copies_of_shard: np.ndarray | None = None) -> "IdentityTable":
        """From the runs of equal (shard, pid) in the manifest's row order (see `row_runs`): each is an
        identity; a pid that reappears in its shard after another identity is an error (shards are
        written grouped by identity)."""
        if len(shard) == 0:
            raise DataError("the train split holds no images")
        if np.any(shard[1:] < shard[:-1]):  # shard-list order, tar order within a shard
            order = np.argsort(shard, kind="stable")
            shard, pid, images, pairs = shard[order], pid[order], images[order], pairs[order]
        key = np.sort(shard.astype(np.int64) * (int(pid.max()) - int(pid.min()) + 1) + (pid - pid.min()))
        duplicate = bool(np.any(key[1:] == key[:-1]))
        del key
        if duplicate:
            raise DataError("an identity's images are not consecutive in its shard: rebuild the dataset with "
                            "`python -m shards build` (train shards are written grouped by identity)")
        start = np.cumsum(images, dtype=np.int64) - images
        first_row = start - np.maximum.accumulate(np.where(np.r_[True, shard[1:] != shard[:-1]], start, 0))
        copies = np.ones(len(shard), np.float32) if copies_of_shard is None else \
            np.asarray(copies_of_shard, np.float32)[shard]
        return cls(shard.astype(np.int32), pid.astype(np.int64), first_row.astype(np.int32),
                   images.astype(np.int32), pairs.astype(np.int32), copies, num_shards)

    def __len__(self) -> int:
        return len(self.pid)

    @property
    def num_pairs(self) -> int:
        return int(self.pairs.sum())


def row_runs(shard: np.ndarray, pid: np.ndarray, captions: np.ndarray):
    """(shard, pid, images, pairs) of the runs of equal (shard, pid) in rows given in order."""
    shard, pid = np.asarray(shard), np.asarray(pid)
    if len(shard) == 0:
        return shard, pid, np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, (shard[1:] != shard[:-1]) | (pid[1:] != pid[:-1])])
    return (shard[starts], pid[starts], np.diff(np.r_[starts, len(shard)]),
            np.add.reduceat(np.asarray(captions, np.int64), starts))


def join_runs(batches) -> tuple:
    """`row_runs` over consecutive batches of rows ((shard, pid, captions) arrays each): the run
    cut at a batch boundary is joined, so memory follows the runs, not the rows."""
    done, carry = [], None
    for shard, pid, captions in batches:
        runs = [np.asarray(c, t) for c, t in zip(row_runs(shard, pid, captions), RUN_TYPES)]
        if not len(runs[0]):
            continue
        if carry is not None and (runs[0][0], runs[1][0]) == (carry[0][0], carry[1][0]):
            runs[2][0] += carry[2][0]
            runs[3][0] += carry[3][0]
        elif carry is not None:
            done.append(carry)
        done.append([c[:-1] for c in runs])
        carry = [c[-1:] for c in runs]
    if carry is not None:
        done.append(carry)
    return tuple(np.concatenate([d[i] for d in done]) if done else np.zeros(0, t) for i, t in enumerate(RUN_TYPES))


RUN_TYPES = (np.int32, np.int64, np.int32, np.int32)
"""dtypes of (shard, pid, images, pairs): a few bytes per identity at millions of identities."""


@dataclasses.dataclass
class EpochLayout:
    """Which identities each slot and window holds this epoch, and how many steps the epoch has."""

    order: np.ndarray
    """Identity indices (into the table) in this epoch's order (a mixture may omit some)."""
    copies: np.ndarray
    """Per entry of `order`: how many times its pairs are used this epoch (1 but for mixtures)."""
    slot: np.ndarray
    """Per entry of `order`: its slot (non-decreasing)."""
    window: np.ndarray
    """Per entry of `order`: its window within the slot (non-decreasing within a slot)."""
    slot_batches: np.ndarray
    """Per slot: the sub-batches its windows form before it is padded to `steps`."""
    steps: int
    """Sub-batches every slot yields this epoch."""
    slot_batch: int
    num_instance: int
    stats: dict
    """Pairs in the data, used, repeated and unused this epoch (global: every slot counted)."""

    def entries(self, slot: int) -> np.ndarray:
        """Positions in `order` of the slot's identities."""
        return np.arange(np.searchsorted(self.slot, slot), np.searchsorted(self.slot, slot, side="right"))


IDENTITY_ORDERS = ("slots", "uniform")


def epoch_layout(table: IdentityTable, *, num_slots: int, slot_batch: int, num_instance: int, window_shards: int,
                 seed: int, epoch: int, identity_order: str = "slots") -> EpochLayout:
    """The layout of one epoch (see the module docstring); vectorised, no rows needed.

    `identity_order` `slots`: the shards are permuted, identities follow in tar order, so a slot
    (and each batch) holds identities of a few neighbouring shards. `uniform`: the identities
    themselves are permuted, so every slot, window and batch holds identities drawn uniformly from
    the whole train set, as the reference sampler draws them; a window then holds as many
    identities as `window_shards` average shards (the same memory), spread over every shard."""
    if identity_order not in IDENTITY_ORDERS:
        raise ValueError(f"identity_order: one of {IDENTITY_ORDERS}, got {identity_order!r}")
    rng = np.random.default_rng(derive_seed(seed, epoch, "layout"))
    whole = np.floor(table.copies).astype(np.int64)
    copies = whole + (rng.random(len(table)) < table.copies - whole)  # a weight of 0.5: half, drawn anew
    if identity_order == "uniform":
        order = rng.permutation(len(table)).astype(np.int32)
    else:
        rank_of_shard = np.empty(table.num_shards, np.int64)
        rank_of_shard[rng.permutation(table.num_shards)] = np.arange(table.num_shards)
        order = np.argsort(rank_of_shard[table.shard], kind="stable").astype(np.int32)  # shards permuted, tar order
    order = order[copies[order] > 0]
    copies = copies[order].astype(np.int32)
    groups = copies * -(-table.pairs[order].astype(np.int64) // num_instance)  # a short last group is completed
    slot = _balanced_cuts(groups, num_slots)
    if identity_order == "uniform":
        per_window = max(slot_batch // num_instance, round(len(table) / table.num_shards * window_shards))
        window = _counted_windows(slot, per_window)
    else:
        window = _windows(table.shard[order], slot, window_shards)
    per_slot = _slot_batches(slot, window, groups, slot_batch // num_instance, num_slots)
    steps = int(per_slot.max())
    used = table.pairs[order].astype(np.int64).sum()
    stats = {"pairs_total": table.num_pairs, "pairs_used": int(used), "pairs_unused": table.num_pairs - int(used),
             "pairs_repeated": steps * num_slots * slot_batch - int(used)}
    return EpochLayout(order, copies, slot, window, per_slot, steps, slot_batch, num_instance, stats)


def _balanced_cuts(groups: np.ndarray, parts: int) -> np.ndarray:
    """Per entry, its slot: the sequence cut into `parts` contiguous runs whose largest holds as few
    groups as possible (the epoch's step count follows the largest: the others are padded)."""
    cum, n = np.cumsum(groups), len(groups)
    if n < parts:
        raise DataError(f"this epoch holds {n} identities, fewer than the {parts} data slots: use fewer slots "
                        "(data.num_slots, ranks x data.num_workers) or more data")

    def cuts(capacity: int) -> list[int] | None:
        """Greedy runs of at most `capacity` groups, each leaving an identity for every run after it."""
        ends, start = [], 0
        for part in range(parts):
            end = int(np.searchsorted(cum, (cum[start - 1] if start else 0) + capacity, side="right"))
            end = max(start + 1, min(end, n - (parts - part - 1)))
            ends.append(end)
            start = end
        return ends if ends[-1] == n and all(
            int(cum[e - 1] - (cum[b - 1] if b else 0)) <= capacity for b, e in zip([0, *ends], ends)) else None

    lo = max(-(-int(cum[-1]) // parts), int(groups.max()))  # no run can be smaller than this
    hi = lo + int(groups.max())  # (cutting at the identity nearest each ideal point fits here)
    while lo < hi:  # the smallest capacity that fits
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cuts(mid) is not None else (mid + 1, hi)
    return np.searchsorted(np.array(cuts(lo)), np.arange(n), side="right").astype(np.int32)


def _windows(shard_seq: np.ndarray, slot: np.ndarray, window_shards: int) -> np.ndarray:
    """Per entry: its window in its slot, a window being up to `window_shards` consecutive shards."""
    new_slot = np.r_[True, slot[1:] != slot[:-1]]
    shard_no = np.cumsum(new_slot | np.r_[True, shard_seq[1:] != shard_seq[:-1]], dtype=np.int32)  # running count
    base = np.maximum.accumulate(np.where(new_slot, shard_no, 0))  # ... of the slot's first shard
    return (shard_no - base) // window_shards


def _counted_windows(slot: np.ndarray, per_window: int) -> np.ndarray:
    """Per entry: its window in its slot, a window being `per_window` consecutive entries."""
    first = np.searchsorted(slot, slot)  # (slots are non-decreasing: each entry's slot's first entry)
    return ((np.arange(len(slot)) - first) // per_window).astype(np.int32)


def _slot_batches(slot: np.ndarray, window: np.ndarray, groups: np.ndarray, per_batch: int, num_slots: int):
    """Per slot: sub-batches its windows form: a window of G groups whose largest identity has m
    forms max(ceil(G / per_batch), m) (an identity joins a sub-batch at most once)."""
    starts = np.flatnonzero(np.r_[True, (slot[1:] != slot[:-1]) | (window[1:] != window[:-1])])
    g_sum, g_max = np.add.reduceat(groups, starts), np.maximum.reduceat(groups, starts)
    batches = np.maximum(-(-g_sum // per_batch), g_max)
    return np.bincount(slot[starts], weights=batches, minlength=num_slots).astype(np.int64)


@dataclasses.dataclass
class Window:
    """What a slot reads, then yields: the row ranges of its shards and the sub-batches they form."""

    segments: list[tuple[int, int, int]]
    """(shard index, first row, end row) per shard, in reading order."""
    batches: list[list[Pair]]


def plan_slot(table: IdentityTable, layout: EpochLayout, slot: int, captions_of, *, seed: int,
              epoch: int) -> list[Window]:
    """The windows of one slot. `captions_of(shard, row)` gives the caption count of an image."""
    rng = random.Random(derive_seed(seed, epoch, "slot", slot))
    k, per_batch = layout.num_instance, layout.slot_batch // layout.num_instance
    entries = layout.entries(slot)
    windows, groups = [], {}
    for w in np.unique(layout.window[entries]):
        mine = entries[layout.window[entries] == w]
        ids = {int(i): int(c) for i, c in zip(layout.order[mine], layout.copies[mine])}
        groups = {i: [g for _ in range(c) for g in _identity_groups(_pairs(table, i, captions_of), k, rng)]
                  for i, c in ids.items()}
        windows.append(Window(_segments(table, ids), _deal(groups, per_batch, rng)))
    extra = layout.steps - int(layout.slot_batches[slot])
    if extra:  # pad to the epoch's step count with repeated groups of the last window's identities
        windows[-1].batches += [_fill([], groups, per_batch, rng) for _ in range(extra)]
        rng.shuffle(windows[-1].batches)
    return windows


def _segments(table: IdentityTable, ids) -> list[tuple[int, int, int]]:
    """The row ranges holding these identities, in shard then row order, adjacent ones joined: one
    per shard when the identities are neighbours (slots), one per identity or run of neighbours
    when they are spread over the set (uniform)."""
    spans: list[list[int]] = []
    for s, lo, n in sorted((int(table.shard[i]), int(table.first_row[i]), int(table.images[i])) for i in ids):
        if spans and spans[-1][0] == s and spans[-1][2] == lo:
            spans[-1][2] = lo + n
        else:
            spans.append([s, lo, lo + n])
    return [tuple(span) for span in spans]


def _pairs(table: IdentityTable, i: int, captions_of) -> list[Pair]:
    shard, pid, first = int(table.shard[i]), int(table.pid[i]), int(table.first_row[i])
    return [(shard, row, c, pid) for row in range(first, first + int(table.images[i])) for c in range(captions_of(shard, row))]


def _identity_groups(pairs: list[Pair], k: int, rng: random.Random) -> list[list[Pair]]:
    """The identity's pairs shuffled and cut into groups of k; a short last group is completed by
    drawing the identity's other pairs (with replacement, as the reference sampler fills a
    single-pair identity), so every pair is used."""
    pairs = list(pairs)
    rng.shuffle(pairs)
    groups = [pairs[i:i + k] for i in range(0, len(pairs), k)]
    if len(groups[-1]) < k:
        groups[-1] += [rng.choice(pairs) for _ in range(k - len(groups[-1]))]
    return groups


def _deal(groups: dict[int, list[list[Pair]]], per_batch: int, rng: random.Random) -> list[list[Pair]]:
    """A window's sub-batches: groups dealt round-robin in (shuffled) identity order, so an
    identity's groups land in different sub-batches; short ones completed with repeats."""
    order = list(groups)
    rng.shuffle(order)
    dealt = [g for i in order for g in groups[i]]
    count = max(-(-len(dealt) // per_batch), max(len(g) for g in groups.values()))
    batches = [dealt[b::count] for b in range(count)]
    batches = [_fill(b, groups, per_batch, rng) for b in batches]
    rng.shuffle(batches)
    return batches


def _fill(batch: list[list[Pair]], groups: dict[int, list[list[Pair]]], per_batch: int, rng: random.Random):
    """Complete a sub-batch to `per_batch` groups with repeated groups of identities not in it
    (any identity when the window has too few), then flatten it to pairs."""
    have = {g[0][3] for g in batch}
    spare = [i for i in groups if groups[i][0][0][3] not in have]  # (by person id: copies are one identity)
    while len(batch) < per_batch:
        i = rng.choice(spare) if spare else rng.choice(list(groups))
        if spare:
            spare.remove(i)
        batch = batch + [rng.choice(groups[i])]
    return [p for g in batch for p in g]

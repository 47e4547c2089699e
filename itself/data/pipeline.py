"""Train and eval pipelines over the shard format of `shards.schema`.

Train: every rank and DataLoader worker lays out the epoch (`plan.epoch_layout`, from the compact
identity table) and plans only its own data slots (`plan.plan_slot`); it reads its windows' byte
ranges of the shards, and emits identity-aware batches of decoded, augmented images and
tokenised, augmented captions. Workers persist across epochs; the epoch reaches them through
shared memory. Eval: gallery images and text queries with person ids, each rank taking a
disjoint slice. Datasets may be local folders or URLs (see `catalog`).
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sys
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import schema

from ..config import DataConfig
from ..errors import DataError
from ..cpus import loader_worker_cap
from ..layout import AUTO_WORKERS, DataLayout, loader_processes
from . import transforms as T
from .catalog import TrainData, check_sample, image_member, iter_shard, ranged, split_digests
from .plan import EpochLayout, Pair, Window, derive_seed, plan_slot
from .sources import ensure_dataset, epoch_plan, rank_layout, split_urls, train_sources

# ----------------------------------------------------------------------------------- train


class TrainDataset(IterableDataset):
    """Identity-aware batches for one rank; each DataLoader worker serves a range of data slots.

    Per step, a worker yields the concatenation of its slots' sub-batches; the loader (TrainLoader)
    concatenates its workers' outputs into the rank's micro-batch: dicts with images [B, 3, H, W]
    float, tokens [B, L] long, pids [B], image_ids [B], and `corrupt`, how many samples were newly
    found undecodable (each is replaced by a decodable pair of the same identity group, or of the
    identity's other images when the whole group is undecodable, so shapes and the identity
    constraint hold).
    """

    def __init__(self, data: TrainData, cfg: DataConfig, *, rank: int, world_size: int, micro_batch: int,
                 seed: int = 0):
        cfg.validate()
        self.data, self.cfg = data, cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.layout: DataLayout = rank_layout(cfg, world_size, micro_batch)
        # auto (-1): the layout's slot readers run in as many processes as the rank's cores allow
        auto = cfg.num_workers < 0
        self.loader_workers = (loader_processes(self.layout, world_size, loader_worker_cap()) if auto
                               else self.layout.workers_per_rank if cfg.num_workers else 0)
        # The epoch and start step, shared with persistent workers (set before each epoch's iteration).
        self._epoch = multiprocessing.get_context("fork").Value("q", 0, lock=False)
        self._start = multiprocessing.get_context("fork").Value("q", 0, lock=False)
        self._layout: tuple[int, EpochLayout] | None = None

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @property
    def start_step(self) -> int:
        return self._start.value

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Serve epoch `epoch` from step `start_step` on (a resumed run skips what it has seen)."""
        self._epoch.value, self._start.value = epoch, start_step

    def epoch_layout(self) -> EpochLayout:
        if self._layout is None or self._layout[0] != self.epoch:
            self._layout = (self.epoch, epoch_plan(self.data, self.cfg, self.layout, self.seed, self.epoch))
        return self._layout[1]

    def __len__(self) -> int:
        """Steps in the current epoch (the same on every rank)."""
        return self.epoch_layout().steps

    def my_slots(self, worker: int, workers: int) -> range:
        per_rank = self.layout.num_slots // self.world_size
        first = self.rank * per_rank + worker * (per_rank // workers)
        return range(first, first + per_rank // workers)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != max(1, self.loader_workers):
            raise DataError(f"the DataLoader runs {workers} workers but this dataset planned "
                            f"{self.loader_workers}: build the loader with train_loader()")
        layout, start = self.epoch_layout(), self.start_step
        readers = [iter(_SlotReader(self, layout, slot, start)) for slot in self.my_slots(worker, workers)]
        for _ in range(start, layout.steps):
            parts = [next(r) for r in readers]
            yield {k: sum(p[k] for p in parts) if k == "corrupt" else torch.cat([p[k] for p in parts])
                   for k in parts[0]}


class _SlotReader:
    """Executes one slot's plan: per window, reads its shards' row ranges, then yields its
    sub-batches (windows wholly before a resume's start step are not read at all)."""

    def __init__(self, ds: TrainDataset, layout: EpochLayout, slot: int, start_step: int):
        self.ds, self.slot, self.start_step = ds, slot, start_step
        ds.data.load_rows(ds.data.table.shard[layout.order[layout.entries(slot)]])
        self.windows: list[Window] = plan_slot(ds.data.table, layout, slot, ds.data.captions_of, seed=ds.seed,
                                               epoch=ds.epoch)
        self.seed = derive_seed(ds.seed, ds.epoch, "augment", slot)
        self.tokenizer = T.Tokenizer(ds.cfg.text_length)
        self.store: dict[tuple[int, int], tuple[bytes, list, int]] = {}  # bytes, captions, image_id
        self.corrupt: set[tuple[int, int]] = set()

    def __iter__(self) -> Iterator[dict]:
        step = 0
        for window in self.windows:
            if step + len(window.batches) <= self.start_step:
                step += len(window.batches)
                continue
            self._read(window)
            for batch in window.batches:
                if step >= self.start_step:  # earlier steps were seen before a resume: not decoded
                    yield self._collate(batch, step)
                step += 1
            self.store.clear()

    def _read(self, window: Window) -> None:
        for shard, lo, hi, keep in _reads(self.ds.data, window.segments):
            for row, sample in enumerate(self.ds.data.read_segment(shard, lo, hi), start=lo):
                if keep(row):
                    meta = json.loads(sample[schema.META_EXT])
                    self.store[(shard, row)] = (image_member(sample), meta["captions"], meta["image_id"])

    def _decode(self, k: tuple[int, int]) -> torch.Tensor | None:
        if k in self.corrupt:
            return None
        try:
            return T.decode(self.store[k][0], self.ds.cfg.image_size)
        except Exception:  # noqa: BLE001 - any decoder failure means a corrupt sample
            self.corrupt.add(k)
            return None

    def _collate(self, batch: list[Pair], step: int) -> dict:
        cfg, k = self.ds.cfg, self.ds.cfg.num_instance
        # Augmentation randomness is a function of (seed, epoch, slot, step): resumable exactly.
        gen = torch.Generator().manual_seed(derive_seed(self.seed, step))
        rng = random.Random(derive_seed(self.seed, step))
        corrupt_before = len(self.corrupt)
        decoded = {p[:2]: self._decode(p[:2]) for p in batch}
        groups = [batch[i:i + k] for i in range(0, len(batch), k)]
        good_groups = [g for g in groups if any(decoded[p[:2]] is not None for p in g)]
        if not good_groups:
            shards = sorted({self.ds.data.urls[p[0]] for p in batch})
            raise DataError(f"every image of a batch is undecodable (shards {shards})")
        images, tokens, pids, image_ids = [], [], [], []
        for g in groups:
            good = [p for p in g if decoded[p[:2]] is not None] or self._other_images(g[0]) or good_groups[0]
            for p in g:
                s, row, c, pid = p if decoded[p[:2]] is not None else rng.choice(good)
                if (s, row) not in decoded:  # (another image of the identity, outside the batch)
                    decoded[(s, row)] = self._decode((s, row))
                images.append(T.train_image(decoded[(s, row)], cfg.image_size, gen, cfg.image_aug))
                tokens.append(self.tokenizer(self.store[(s, row)][1][c], rng if cfg.text_aug else None))
                pids.append(pid)
                image_ids.append(self.store[(s, row)][2])
        return {
            "images": torch.stack(images), "tokens": torch.stack(tokens),
            "pids": torch.tensor(pids, dtype=torch.long), "image_ids": torch.tensor(image_ids, dtype=torch.long),
            "corrupt": len(self.corrupt) - corrupt_before,
        }

    def _other_images(self, pair: Pair) -> list[Pair]:
        """Decodable pairs of the identity's other images (a group whose every image is corrupt
        takes those, so the batch keeps its identities); [] when it has none."""
        shard, row, _, pid = pair
        t = self.ds.data.table
        (i,) = np.flatnonzero((t.shard == shard) & (t.first_row <= row) & (row < t.first_row + t.images))[:1]
        rows = range(int(t.first_row[i]), int(t.first_row[i] + t.images[i]))
        return [(shard, r, c, pid) for r in rows if self._decode((shard, r)) is not None
                for c in range(len(self.store[(shard, r)][1]))]


def _reads(data: TrainData, segments: list[tuple[int, int, int]]):
    """(shard, first row, end row, which rows to keep) to read a window's segments: one read per
    segment where the shard is read by byte range, else one stream per shard up to its last
    segment (a stream restarted per segment would reread the shard's start each time)."""
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for shard, lo, hi in segments:
        by_shard.setdefault(shard, []).append((lo, hi))
    for shard, spans in by_shard.items():
        rows = data.rows(shard)
        if len(spans) == 1 or (ranged(rows.url) and rows.byte_range(0, 1) is not None):
            yield from ((shard, lo, hi, lambda row: True) for lo, hi in spans)
        else:
            wanted = {row for lo, hi in spans for row in range(lo, hi)}
            yield shard, min(lo for lo, _ in spans), max(hi for _, hi in spans), wanted.__contains__


class TrainLoader:
    """The rank's micro-batches for one epoch at a time, with the epoch's data report.

    `set_epoch(e)` (or `set_epoch(e, start_step)` when resuming mid-epoch) before iterating; after
    an epoch, `stats` holds steps, pairs used, repeated and unused, and corrupt images skipped
    (also printed when there were any). The DataLoader's workers persist across epochs.
    """

    def __init__(self, dataset: TrainDataset, pin_memory: bool = False):
        self.dataset, self.pin_memory = dataset, pin_memory
        self.stats: dict = {}
        workers = dataset.loader_workers
        self.loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                 persistent_workers=workers > 0, prefetch_factor=4 if workers else None)

    @property
    def num_ids(self) -> int:
        return self.dataset.data.num_ids

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.dataset.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        """Steps in the current epoch, counting those a resume skips."""
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        layout, corrupt, steps, parts = ds.epoch_layout(), 0, 0, []
        for part in self.loader:  # one part per worker per step, in worker (= slot) order
            parts.append(part)
            if len(parts) < max(1, ds.loader_workers):
                continue
            batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "corrupt"}
            corrupt += sum(p["corrupt"] for p in parts)
            parts, steps = [], steps + 1
            yield batch
        self.stats = {"epoch": ds.epoch, "steps": steps, **layout.stats,
                      "pairs_used_by_dataset": ds.data.pairs_by_dataset(layout.order, layout.copies),
                      "corrupt_skipped_rank": corrupt}
        if corrupt:
            # (printed, not logged: DataLoader workers are processes without the command's logging)
            print(f"[data] rank {ds.rank} epoch {ds.epoch}: skipped {corrupt} corrupt image(s) "
                  "(each replaced by a pair of the same identity)", file=sys.stderr, flush=True)


def train_loader(cfg: DataConfig, *, rank: int, world_size: int, micro_batch: int, seed: int = 0,
                 build_synthetic: bool = False) -> TrainLoader:
    """The train pipeline for one rank, from a data config."""
    ensure_dataset(cfg.root, build_synthetic)
    return TrainLoader(TrainDataset(TrainData(train_sources(cfg)), cfg, rank=rank, world_size=world_size,
                                    micro_batch=micro_batch, seed=seed))


# ----------------------------------------------------------------------------------- eval


class _EvalStream(IterableDataset):
    """Samples of a split, every (rank, worker) taking a disjoint, interleaved slice."""

    def __init__(self, urls: list[str], rank: int, world_size: int, expected: list[int] | None = None):
        self.urls, self.rank, self.world_size = urls, rank, world_size
        self.expected = expected  # samples per shard (dataset.json), checked so none go missing silently

    def _my_samples(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stride, offset = self.world_size * workers, self.rank * workers + worker
        i = 0
        for n, url in enumerate(self.urls):
            start = i
            for sample in iter_shard(url):
                if i % stride == offset:
                    yield sample
                i += 1
            if self.expected is not None and i - start != self.expected[n]:
                raise DataError(f"shard {url} holds {i - start} samples, dataset.json lists {self.expected[n]}: "
                                "the shard is truncated or from another build; rebuild the dataset")


class EvalImages(_EvalStream):
    """Gallery: (image [3, H, W], pid, image_id) per image; undecodable images are skipped and
    reported (they cannot be retrieved, so they would only distort the metrics silently)."""

    def __init__(self, urls, image_size: tuple[int, int], rank: int = 0, world_size: int = 1, expected=None,
                 digests: dict[str, str] | None = None):
        super().__init__(urls, rank, world_size, expected)
        self.image_size, self.digests = image_size, digests  # key -> sha256 (the manifest's), checked

    def __iter__(self):
        for sample in self._my_samples():
            if self.digests is not None:
                check_sample(sample, sample["__key__"], self.digests.get(sample["__key__"], "absent"))
            meta = json.loads(sample[schema.META_EXT])
            try:
                img = T.decode(image_member(sample), self.image_size)
            except Exception:  # noqa: BLE001
                print(f"[data] skipped corrupt gallery image {sample['__key__']} in {sample['__url__']}",  # (a worker)
                      file=sys.stderr, flush=True)
                continue
            yield T.eval_image(img, self.image_size), meta["pid"], meta["image_id"]


class EvalTexts(_EvalStream):
    """Queries: (tokens [L], pid, image_id, caption index) per caption of every image (no augmentation)."""

    def __init__(self, urls, text_length: int = 77, rank: int = 0, world_size: int = 1, expected=None):
        super().__init__(urls, rank, world_size, expected)
        self.text_length = text_length

    def __iter__(self):
        tokenizer = T.Tokenizer(self.text_length)
        for sample in self._my_samples():
            meta = json.loads(sample[schema.META_EXT])
            for i, caption in enumerate(meta["captions"]):
                yield tokenizer(caption), meta["pid"], meta["image_id"], i


def eval_workers(cfg: DataConfig) -> int:
    """Loader processes of evaluation: `data.num_workers`, or with auto (-1) up to the rank's cores - 1."""
    return cfg.num_workers if cfg.num_workers >= 0 else min(AUTO_WORKERS, loader_worker_cap())


def eval_loaders(cfg: DataConfig, split: str, *, rank: int = 0, world_size: int = 1,
                 batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """(gallery, queries) loaders of `split` ('val' or 'test') for one rank's disjoint slice."""
    info = ensure_dataset(cfg.root)
    urls = split_urls(cfg.root, split, info)
    expected = [s["samples"] for s in info["splits"][split]["shards"]]
    images = DataLoader(EvalImages(urls, cfg.image_size, rank, world_size, expected, split_digests(cfg.root, split)),
                        batch_size=batch_size, num_workers=eval_workers(cfg))
    texts = DataLoader(EvalTexts(urls, cfg.text_length, rank, world_size, expected), batch_size=batch_size)
    return images, texts

"""WebDataset train and eval pipelines over the shard format of `shards.schema`.

Train: every rank and DataLoader worker executes its part of the epoch plan (`plan.py`): it
streams its shards in plan order, keeps the encoded samples its next batches need, and emits
identity-aware batches of decoded, augmented images and tokenised, augmented captions.
Eval: gallery images and text queries with person ids, each rank taking a disjoint slice.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import sys
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from shards import schema

from ..config import DataConfig
from . import transforms as T
from ..errors import DataError
from ..layout import data_layout
from .plan import EpochPlan, Pair, ShardIndex, check_slots, derive_seed, plan_epoch

# ----------------------------------------------------------------------------------- dataset


def ensure_dataset(root: str | os.PathLike, build_synthetic: bool = False) -> dict:
    """dataset.json of `root`; with `build_synthetic`, build the embedded synthetic set there
    first when missing (one process builds under a file lock, the others wait and reuse it)."""
    root = Path(root)
    info_file = root / schema.DATASET_FILE
    if not info_file.exists() and build_synthetic:
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(str(root) + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not info_file.exists():
                import shards

                print(f"building the synthetic dataset in {root} (first use)", file=sys.stderr)
                shards.build_synthetic(root, progress=False)
    if not info_file.exists():
        raise DataError(f"{info_file} not found: {root} is not a built dataset. Build it with "
                        f"`python -m shards build --dataset ... --out {root}` or set data.root")
    info = json.loads(info_file.read_text())
    check_schema_version(info.get("schema_version"), info_file)
    return info


def check_schema_version(version, where) -> None:
    """A DataError unless `version` (of dataset.json or the manifest) is one this code reads."""
    if version not in schema.READABLE_VERSIONS:
        readable = ", ".join(map(str, schema.READABLE_VERSIONS))
        raise DataError(f"{where}: shard schema version {version} is not one this code reads ({readable}); "
                        f"rebuild the dataset with `python -m shards build` (or use the code that wrote it)")


def split_urls(cfg: DataConfig, split: str, info: dict | None = None) -> list[str]:
    """Shard URLs of a split: `data.train_shards` for train when set, else those in dataset.json."""
    if split == "train" and cfg.train_shards:
        urls = expand_urls(cfg.train_shards)
    else:
        info = info or ensure_dataset(cfg.root)
        urls = [str(Path(cfg.root) / split / s["name"]) for s in info["splits"][split]["shards"]]
    if not urls:
        raise DataError(f"no {split} shards: dataset {cfg.root} has none and data.train_shards is empty")
    for url in urls:
        if _is_local(url) and not os.path.isfile(url):
            raise DataError(f"shard not found: {url}")
    return urls


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def load_train_index(root: str | os.PathLike, urls: list[str]) -> list[ShardIndex]:
    """Per shard, its identities and images (from manifest.parquet), in the order of `urls`."""
    manifest = Path(root) / schema.MANIFEST_FILE
    if not manifest.exists():
        raise DataError(f"{manifest} not found: the train pipeline plans batches from the manifest")
    table = pq.read_table(manifest, columns=["split", "shard", "key", "pid", "captions"])
    version = (table.schema.metadata or {}).get(schema.MANIFEST_VERSION_KEY)
    if version is not None:  # (manifests written before versioning carry none: dataset.json's applies)
        check_schema_version(int(version) if version.isdigit() else version.decode(errors="replace"), manifest)
    cols = table.to_pydict()
    by_shard: dict[str, list[tuple[int, str, int]]] = {}
    for split, shard, key, pid, caps in zip(cols["split"], cols["shard"], cols["key"], cols["pid"], cols["captions"]):
        if split == "train":
            by_shard.setdefault(shard, []).append((pid, key, len(caps)))
    index = []
    for url in urls:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name not in by_shard:
            raise DataError(f"train shard {url} is not in {manifest}: shards and manifest must come from one build")
        identities: list[tuple[int, list]] = []
        for pid, key, n in by_shard[name]:
            if not identities or identities[-1][0] != pid:
                identities.append((pid, []))
            identities[-1][1].append((key, n))
        index.append(ShardIndex(url, tuple((pid, tuple(imgs)) for pid, imgs in identities)))
    return index


def iter_shard(url: str) -> Iterator[dict]:
    """Samples of one shard as {'__key__', 'json', '<image ext>'}; errors name the shard."""
    def reraise(exn: Exception) -> bool:
        if isinstance(exn, DataError):  # webdataset's outer layer hands back what we raised, args extended
            raise DataError(exn.args[0]) from None
        raise DataError(f"cannot read shard {url}: {exn.args[0] if exn.args else exn!r}") from exn

    try:
        for sample in tarfile_samples([{"url": url}], handler=reraise):
            key = sample["__key__"]
            if key.startswith("/") or ".." in key.split("/"):  # shards are read, never unpacked; refuse anyway
                raise DataError(f"cannot read shard {url}: member {key!r} has an unsafe path (absolute or '..')")
            if schema.META_EXT not in sample or not any(ext in sample for ext in schema.IMAGE_EXTS):
                raise DataError(f"cannot read shard {url}: sample {key} lacks its "
                                f"{'metadata' if schema.META_EXT not in sample else 'image'} member "
                                "(a truncated or damaged shard); rebuild the dataset")
            yield sample
    except DataError:
        raise
    except Exception as exn:  # noqa: BLE001 - tar/gzip/IO errors of any kind
        raise DataError(f"cannot read shard {url}: {exn}") from exn


def image_member(sample: dict) -> bytes:
    """The encoded image of a shard sample, whatever its extension."""
    for ext in schema.IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image member "
                    f"(expected one of {', '.join(schema.IMAGE_EXTS)})")


# ----------------------------------------------------------------------------------- train


class TrainDataset(IterableDataset):
    """Identity-aware batches for one rank; each DataLoader worker serves a range of data slots.

    Per step, a worker yields the concatenation of its slots' sub-batches; the loader (TrainLoader)
    concatenates its workers' outputs into the rank's micro-batch: dicts with images [B, 3, H, W]
    float, tokens [B, L] long, pids [B], image_ids [B], and `corrupt`, how many samples were newly
    found undecodable (each is replaced by a decodable pair of the same identity group, so shapes
    and the identity constraint hold).
    """

    def __init__(self, shards: list[ShardIndex], cfg: DataConfig, *, rank: int, world_size: int,
                 micro_batch: int, seed: int = 0):
        cfg.validate()
        self.shards, self.cfg = shards, cfg
        self.rank, self.world_size = rank, world_size
        self.micro_batch, self.seed = micro_batch, seed
        layout = data_layout(micro_batch * world_size, world_size, 1, cfg.num_instance, cfg.num_workers, cfg.num_slots)
        self.num_slots, self.workers_per_rank, self.slot_batch = layout.num_slots, layout.workers_per_rank, layout.slot_batch
        self.loader_workers = self.workers_per_rank if cfg.num_workers else 0
        check_slots(len(shards), self.num_slots, world_size, self.workers_per_rank)
        self.slots_per_rank = self.num_slots // world_size
        self.epoch, self.start_step = 0, 0
        self._plan: tuple[int, EpochPlan] | None = None

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Serve epoch `epoch` from step `start_step` on (a resumed run skips what it has seen)."""
        self.epoch, self.start_step = epoch, start_step

    def plan(self) -> EpochPlan:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, plan_epoch(
                self.shards, num_slots=self.num_slots, slot_batch=self.slot_batch,
                num_instance=self.cfg.num_instance, window_shards=self.cfg.window_shards,
                seed=self.seed, epoch=self.epoch))
        return self._plan[1]

    def __len__(self) -> int:
        """Steps in the current epoch (the same on every rank)."""
        return self.plan().steps

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers_per_rank:
            raise DataError(f"the DataLoader runs {workers} workers but the data layout has {self.workers_per_rank} "
                            "per rank: build the loader with train_loader() so both agree")
        per_worker = self.slots_per_rank // workers
        first = self.rank * self.slots_per_rank + worker * per_worker
        plan = self.plan()
        readers = [iter(_SlotReader(self, plan, slot)) for slot in range(first, first + per_worker)]
        for _ in range(self.start_step, plan.steps):
            parts = [next(r) for r in readers]
            yield {k: sum(p[k] for p in parts) if k == "corrupt" else torch.cat([p[k] for p in parts])
                   for k in parts[0]}


class _SlotReader:
    """Executes one slot's sub-batches: streams its shards and keeps the samples still needed."""

    def __init__(self, ds: TrainDataset, plan: EpochPlan, slot: int):
        self.ds, self.order, self.batches = ds, plan.slot_shards[slot], plan.slot_batches[slot]
        self.seed = derive_seed(ds.seed, ds.epoch, "augment", slot)
        self.tokenizer = T.Tokenizer(ds.cfg.text_length)
        self.refs: dict[tuple[int, str], int] = {}
        for batch in self.batches:
            for shard, key, _, _ in batch:
                self.refs[(shard, key)] = self.refs.get((shard, key), 0) + 1
        self.store: dict[tuple[int, str], tuple[bytes, list, int]] = {}  # bytes, captions, image_id
        self.corrupt: set[tuple[int, str]] = set()

    def _samples(self) -> Iterator[tuple[tuple[int, str], dict]]:
        for shard in self.order:
            for sample in iter_shard(self.ds.shards[shard].url):
                yield (shard, sample["__key__"]), sample

    def __iter__(self) -> Iterator[dict]:
        stream = self._samples()
        for step, batch in enumerate(self.batches):
            for shard, key, _, _ in batch:
                while (shard, key) not in self.store:
                    try:
                        k, sample = next(stream)
                    except StopIteration:
                        raise DataError(f"sample {key} listed in the manifest is missing from shard "
                                        f"{self.ds.shards[shard].url}: rebuild the dataset") from None
                    if k in self.refs:
                        meta = json.loads(sample[schema.META_EXT])
                        self.store[k] = (image_member(sample), meta["captions"], meta["image_id"])
            if step >= self.ds.start_step:  # earlier steps were seen before a resume: not decoded
                yield self._collate(batch, step)
            self._release(batch)

    def _release(self, batch: list[Pair]) -> None:
        for s, key, _, _ in batch:
            self.refs[(s, key)] -= 1
            if self.refs[(s, key)] == 0:
                del self.refs[(s, key)], self.store[(s, key)]

    def _decode(self, k: tuple[int, str]) -> torch.Tensor | None:
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
        decoded = {(s, key): self._decode((s, key)) for s, key, _, _ in batch}
        groups = [batch[i:i + k] for i in range(0, len(batch), k)]
        good_groups = [g for g in groups if any(decoded[(s, key)] is not None for s, key, _, _ in g)]
        if not good_groups:
            raise DataError(f"every image of a batch is undecodable (shards {sorted({self.ds.shards[s].url for s, *_ in batch})})")
        images, tokens, pids, image_ids = [], [], [], []
        for g in groups:
            good = [p for p in g if decoded[p[:2]] is not None] or good_groups[0]
            for p in g:
                s, key, c, pid = p if decoded[p[:2]] is not None else rng.choice(good)
                images.append(T.train_image(decoded[(s, key)], cfg.image_size, gen, cfg.image_aug))
                tokens.append(self.tokenizer(self.store[(s, key)][1][c], rng if cfg.text_aug else None))
                pids.append(pid)
                image_ids.append(self.store[(s, key)][2])
        return {
            "images": torch.stack(images), "tokens": torch.stack(tokens),
            "pids": torch.tensor(pids, dtype=torch.long), "image_ids": torch.tensor(image_ids, dtype=torch.long),
            "corrupt": len(self.corrupt) - corrupt_before,
        }


class TrainLoader:
    """The rank's micro-batches for one epoch at a time, with the epoch's data report.

    `set_epoch(e)` (or `set_epoch(e, start_step)` when resuming mid-epoch) before iterating; after
    an epoch, `stats` holds steps, pairs used and dropped by the plan, and corrupt images skipped
    (also printed when there were any).
    """

    def __init__(self, dataset: TrainDataset, pin_memory: bool = False):
        self.dataset, self.pin_memory = dataset, pin_memory
        self.stats: dict = {}

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.dataset.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        """Steps in the current epoch, counting those a resume skips."""
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        loader = DataLoader(ds, batch_size=None, num_workers=ds.loader_workers, pin_memory=self.pin_memory)
        plan, corrupt, steps, parts = ds.plan(), 0, 0, []
        for part in loader:  # one part per worker per step, in worker (= slot) order
            parts.append(part)
            if len(parts) < ds.workers_per_rank:
                continue
            batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "corrupt"}
            corrupt += sum(p["corrupt"] for p in parts)
            parts, steps = [], steps + 1
            yield batch
        self.stats = {"epoch": ds.epoch, "steps": steps, "pairs_used": plan.used_pairs,
                      "pairs_dropped": plan.dropped_pairs, "pairs_total": plan.total_pairs,
                      "corrupt_skipped_rank": corrupt}
        if corrupt:
            print(f"[data] rank {ds.rank} epoch {ds.epoch}: skipped {corrupt} corrupt image(s) "
                  "(each replaced by a pair of the same identity)", file=sys.stderr)


def train_loader(cfg: DataConfig, *, rank: int, world_size: int, micro_batch: int, seed: int = 0,
                 build_synthetic: bool = False) -> TrainLoader:
    """The train pipeline for one rank, from a data config."""
    info = ensure_dataset(cfg.root, build_synthetic)
    urls = split_urls(cfg, "train", info)
    return TrainLoader(TrainDataset(load_train_index(cfg.root, urls), cfg, rank=rank, world_size=world_size,
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

    def __init__(self, urls, image_size: tuple[int, int], rank: int = 0, world_size: int = 1, expected=None):
        super().__init__(urls, rank, world_size, expected)
        self.image_size = image_size

    def __iter__(self):
        for sample in self._my_samples():
            meta = json.loads(sample[schema.META_EXT])
            try:
                img = T.decode(image_member(sample), self.image_size)
            except Exception:  # noqa: BLE001
                print(f"[data] skipped corrupt gallery image {sample['__key__']} in {sample['__url__']}", file=sys.stderr)
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


def eval_loaders(cfg: DataConfig, split: str, *, rank: int = 0, world_size: int = 1,
                 batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """(gallery, queries) loaders of `split` ('val' or 'test') for one rank's disjoint slice."""
    info = ensure_dataset(cfg.root)
    urls = split_urls(cfg, split, info)
    expected = [s["samples"] for s in info["splits"][split]["shards"]]
    images = DataLoader(EvalImages(urls, cfg.image_size, rank, world_size, expected), batch_size=batch_size,
                        num_workers=cfg.num_workers)
    texts = DataLoader(EvalTexts(urls, cfg.text_length, rank, world_size, expected), batch_size=batch_size)
    return images, texts

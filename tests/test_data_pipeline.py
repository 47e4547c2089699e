"""The train and eval pipelines: coverage, disjointness, equal batches, identity constraint,
corrupt samples, and errors that name what is wrong."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import random
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest
import torch

from itself.config import ConfigError, DataConfig
from itself.data import DataError, eval_loaders, plan_epoch, train_loader
from itself.data import transforms as T
from itself.data.plan import ShardIndex
from shards import schema

MICRO_BATCH = 4  # 2 identities x 2 pairs


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(**{"root": str(root), "image_size": (48, 16), "text_aug": False, **kw})


def _all_pairs(root) -> collections.Counter:
    """Every train (image_id, tokenised caption) pair of the dataset, from the manifest."""
    tok = T.Tokenizer()
    rows = pq.read_table(root / schema.MANIFEST_FILE).to_pylist()
    return collections.Counter((r["image_id"], tuple(tok(c).tolist())) for r in rows if r["split"] == "train"
                               for c in r["captions"])


def _epoch(root, world, workers, epoch=0, **kw) -> list[list[dict]]:
    """The batches of every rank for one epoch."""
    out = []
    for rank in range(world):
        loader = train_loader(_cfg(root, num_workers=workers, **kw), rank=rank, world_size=world,
                              micro_batch=MICRO_BATCH, seed=0)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        out.append(batches)
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_caption_once_disjoint_ranks_equal_batches(small_dataset, world, workers):
    ranks = _epoch(small_dataset, world, workers)
    assert len({len(batches) for batches in ranks}) == 1, "every rank must yield the same number of batches"
    seen = [collections.Counter((i, tuple(t.tolist())) for b in batches for i, t in zip(b["image_ids"].tolist(), b["tokens"]))
            for batches in ranks]
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(seen[a]) & set(seen[b]), f"ranks {a} and {b} share pairs"
    assert sum(seen, collections.Counter()) == _all_pairs(small_dataset)  # each caption exactly once
    for batches in ranks:
        for b in batches:
            assert b["images"].shape == (MICRO_BATCH, 3, 48, 16) and b["tokens"].shape == (MICRO_BATCH, 77)
            assert set(collections.Counter(b["pids"].tolist()).values()) == {2}, "identity constraint"
    # The global batch of each step holds num_instance pairs per identity too (ranks are identity-disjoint).
    for step in range(len(ranks[0])):
        pids = torch.cat([batches[step]["pids"] for batches in ranks]).tolist()
        assert set(collections.Counter(pids).values()) == {2}


def test_deterministic_by_seed_and_epoch(small_dataset):
    first = _epoch(small_dataset, 2, 0, text_aug=True)
    again = _epoch(small_dataset, 2, 0, text_aug=True)
    other = _epoch(small_dataset, 2, 0, epoch=1, text_aug=True)
    flat = lambda r: [b[k] for batches in r for b in batches for k in ("images", "tokens", "pids")]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(flat(first), flat(again)))
    assert [b["pids"].tolist() for b in first[0]] != [b["pids"].tolist() for b in other[0]]


@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2), (4, 2)])
def test_fixed_slots_make_global_batches_independent_of_world_size_and_workers(small_dataset, world, workers):
    def global_batches(world, workers):
        ranks = []
        for rank in range(world):
            loader = train_loader(_cfg(small_dataset, num_workers=workers, num_slots=8, text_aug=True), rank=rank,
                                  world_size=world, micro_batch=16 // world, seed=0)
            loader.set_epoch(1)
            ranks.append(list(loader))
        return [{k: torch.cat([r[step][k] for r in ranks]) for k in ranks[0][step]} for step in range(len(ranks[0]))]

    reference, other = global_batches(1, 0), global_batches(world, workers)
    assert len(reference) == len(other) == 8
    for a, b in zip(reference, other):
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_mid_epoch_serves_exactly_the_remaining_steps(small_dataset, workers):
    def epoch_from(start):
        loader = train_loader(_cfg(small_dataset, num_workers=workers, text_aug=True), rank=0, world_size=1,
                              micro_batch=MICRO_BATCH, seed=0)
        loader.set_epoch(2, start)
        return list(loader)

    full, rest = epoch_from(0), epoch_from(5)
    assert len(full) == len(rest) + 5
    for a, b in zip(full[5:], rest):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_workers_and_no_workers_see_the_same_data_per_rank(small_dataset):
    # Different slot layouts shuffle differently, but both cover the rank's identities exactly.
    for workers in (0, 2):
        pids = [sorted(p for b in batches for p in b["pids"].tolist()) for batches in _epoch(small_dataset, 1, workers)]
        assert pids[0] == sorted(list(range(32)) * 4)


def test_uneven_shards_drop_whole_groups_and_report_it(tmp_path):
    # 3 slots over 8 shards: slots get 3, 3 and 2 shards; every slot runs the smallest count.
    shards_ = [ShardIndex(f"s{i}", tuple((i * 10 + j, (("k%d_%d" % (i, j), 4),)) for j in range(4))) for i in range(8)]
    plan = plan_epoch(shards_, num_slots=3, slot_batch=4, num_instance=2, window_shards=16, seed=0, epoch=0)
    assert [len(s) for s in plan.slot_shards] == [3, 3, 2]
    assert plan.steps == 8  # 2 shards x 4 identities x 2 groups / 2 groups per batch
    assert plan.total_pairs == 128 and plan.used_pairs == 3 * 8 * 4 and plan.dropped_pairs == 32


def test_plan_keeps_identity_groups_and_drops_remainders():
    # One identity with 3 pairs: one group of 2, one pair dropped; identities are never repeated in a batch.
    shards_ = [ShardIndex("s0", ((1, (("a", 3),)), (2, (("b", 2),)), (3, (("c", 4),)))),
               ShardIndex("s1", ((4, (("d", 2), ("e", 2))),))]
    plan = plan_epoch(shards_, num_slots=1, slot_batch=4, num_instance=2, window_shards=1, seed=1, epoch=0)
    assert plan.total_pairs == 13
    for batch in plan.slot_batches[0]:
        pids = [p[3] for p in batch]
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]
    assert plan.used_pairs == 4 * plan.steps and plan.dropped_pairs == 13 - plan.used_pairs


def test_single_pair_identities_train_with_their_pair_drawn_twice():
    # As the reference sampler: an identity with fewer pairs than num_instance fills its group by
    # drawing its pairs with replacement, so every identity of the shards is in the epoch.
    shards_ = [ShardIndex("s0", ((1, (("a", 1),)), (2, (("b", 2),)), (3, (("c", 1),)), (4, (("d", 1), ("e", 1))))),
               ShardIndex("s1", ((5, (("f", 1),)), (6, (("g", 2),)), (7, (("h", 1),)), (8, (("i", 2),))))]
    plan = plan_epoch(shards_, num_slots=1, slot_batch=4, num_instance=2, window_shards=2, seed=0, epoch=0)
    pairs = [p for batch in plan.slot_batches[0] for p in batch]
    assert sorted({p[3] for p in pairs}) == list(range(1, 9))
    for pid, key in ((1, "a"), (3, "c"), (5, "f"), (7, "h")):
        assert [p[1:3] for p in pairs if p[3] == pid] == [(key, 0), (key, 0)]
    assert plan.used_pairs == plan.total_pairs == 12 and plan.dropped_pairs == 0


def test_fewer_shards_than_ranks_times_workers_is_an_error_naming_both(small_dataset):
    with pytest.raises(DataError, match=r"8 train shards are fewer than the 16 data slots \(ranks x workers = 4 x 4.*--shard-samples"):
        train_loader(_cfg(small_dataset, num_workers=4), rank=0, world_size=4, micro_batch=8)
    with pytest.raises(ConfigError, match=r"data.num_slots: 3 is not a multiple of the world size 2"):
        train_loader(_cfg(small_dataset, num_workers=2, num_slots=3), rank=0, world_size=2, micro_batch=MICRO_BATCH)


def test_workers_never_outnumber_the_identities_a_rank_adds_per_step(small_dataset):
    # micro-batch 4 = 2 identities: of 4 requested workers only 2 are used (each adds 1 identity).
    loader = train_loader(_cfg(small_dataset, num_workers=4), rank=0, world_size=1, micro_batch=MICRO_BATCH)
    assert (loader.dataset.workers_per_rank, loader.dataset.num_slots, loader.dataset.slot_batch) == (2, 2, 2)
    loader.set_epoch(0)
    assert all(set(collections.Counter(b["pids"].tolist()).values()) == {2} for b in loader)


def test_missing_shard_path_is_an_error_naming_it(small_dataset):
    missing = str(small_dataset / "elsewhere" / "train-000000.tar")
    with pytest.raises(DataError, match="shard not found: .*elsewhere/train-000000.tar"):
        train_loader(_cfg(small_dataset, train_shards=missing), rank=0, world_size=1, micro_batch=MICRO_BATCH)


def test_unreadable_shard_is_an_error_naming_it(small_dataset, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(small_dataset, root)
    bad = root / "train" / "train-000003.tar"
    bad.write_bytes(b"this is not a tar file" * 100)
    loader = train_loader(_cfg(root, num_workers=0), rank=0, world_size=1, micro_batch=MICRO_BATCH)
    with pytest.raises(DataError, match="cannot read shard .*train-000003.tar"):
        list(loader)


def test_brace_pattern_shards_are_matched_to_the_manifest(small_dataset):
    pattern = str(small_dataset / "train" / "train-{000000..000003}.tar")
    loader = train_loader(_cfg(small_dataset, train_shards=pattern, num_workers=0), rank=0, world_size=1,
                          micro_batch=MICRO_BATCH)
    loader.set_epoch(0)
    assert sum(len(b["pids"]) for b in loader) == 4 * 4 * 4  # 4 shards x 4 identities x 4 pairs


def _plant_corrupt_image(root, shard_name: str, index: int) -> int:
    """Replace the image of the index-th sample of a shard by garbage; returns its image_id."""
    path = root / "train" / shard_name
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    victim = members[2 * index][0].name.split(".")[0]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for m, data in members:
            if m.name == f"{victim}.jpg":
                data = b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(200)
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    return int(victim)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_skipped_counted_and_the_rest_of_the_shard_arrives(small_dataset, tmp_path, workers, capfd):
    root = tmp_path / "d"
    shutil.copytree(small_dataset, root)
    victim = _plant_corrupt_image(root, "train-000002.tar", 3)
    loader = train_loader(_cfg(root, num_workers=workers), rank=0, world_size=1, micro_batch=MICRO_BATCH)
    loader.set_epoch(0)
    batches = list(loader)
    assert loader.stats["corrupt_skipped_rank"] == 1
    assert "skipped 1 corrupt image" in capfd.readouterr().err
    seen = collections.Counter((i, tuple(t.tolist())) for b in batches for i, t in zip(b["image_ids"].tolist(), b["tokens"]))
    expected = _all_pairs(root)
    lost = {p for p in expected if p[0] == victim}
    assert len(lost) == 2 and not lost & set(seen)  # the corrupt image's two pairs are gone ...
    assert all(seen[p] >= 1 for p in expected if p[0] != victim)  # ... every other pair still arrives
    assert sum(seen.values()) == sum(expected.values())  # replaced, so shapes stay equal on all ranks
    for b in batches:
        assert set(collections.Counter(b["pids"].tolist()).values()) == {2}


@pytest.mark.parametrize("world", [1, 3])
def test_eval_gallery_and_queries_cover_the_split_once_across_ranks(small_dataset, world):
    rows = [r for r in pq.read_table(small_dataset / schema.MANIFEST_FILE).to_pylist() if r["split"] == "test"]
    images, texts = [], []
    for rank in range(world):
        gallery, queries = eval_loaders(_cfg(small_dataset, num_workers=2), "test", rank=rank, world_size=world,
                                        batch_size=5)
        for img, pid, image_id in gallery:
            assert img.shape[1:] == (3, 48, 16)
            images += list(zip(image_id.tolist(), pid.tolist()))
        for tok, pid, image_id, _ in queries:
            assert (tok[:, 0] == 49406).all()
            texts += list(zip(image_id.tolist(), pid.tolist()))
    assert sorted(images) == sorted((r["image_id"], r["pid"]) for r in rows)
    assert sorted(texts) == sorted((r["image_id"], r["pid"]) for r in rows for _ in r["captions"])


def test_tokenizer_packs_sos_tokens_eot_then_padding():
    tok = T.Tokenizer(text_length=8)
    short = tok("a red coat").tolist()
    assert short[0] == 49406 and 49407 in short and short[short.index(49407) + 1:] == [0] * (7 - short.index(49407))
    long = tok("a man in a red coat with a black backpack and white shoes").tolist()
    assert len(long) == 8 and long[0] == 49406 and long[-1] == 49407 and 0 not in long


def test_text_augmentation_rates():
    rng = random.Random(0)
    ids = list(range(1000, 1100))
    n, masked, removed, changed = 0, 0, 0, 0
    for _ in range(200):
        out = T.augment_tokens(ids, rng)
        n += len(ids)
        removed += len(ids) - len(out)
        masked += out.count(T.MASK_TOKEN)
        changed += sum(1 for t in out if t != T.MASK_TOKEN and not 1000 <= t < 1100)
    assert abs(masked / n - 0.2 * 0.6) < 0.01
    assert abs(removed / n - 0.2 * 0.2) < 0.01
    assert abs(changed / n - 0.2 * 0.2) < 0.01


def test_train_image_augmentation_shapes_and_determinism():
    img = torch.randint(0, 255, (3, 60, 20), dtype=torch.uint8)
    a = T.train_image(img, (48, 16), torch.Generator().manual_seed(1))
    b = T.train_image(img, (48, 16), torch.Generator().manual_seed(1))
    c = T.eval_image(img, (48, 16))
    assert a.shape == c.shape == (3, 48, 16) and torch.equal(a, b)
    plain = T.train_image(img, (48, 16), torch.Generator().manual_seed(1), augment=False)
    assert torch.equal(plain, c)


def test_random_erasing_fills_with_the_raw_clip_mean_as_the_reference_code():
    # torchvision's RandomErasing(value=mean) after Normalize: the box holds the un-normalised
    # mean (0.4815, 0.4578, 0.4082), not 0 (the mean colour) nor noise.
    x = torch.full((3, 48, 16), 7.0)
    T._erase(x, torch.Generator().manual_seed(0))
    erased = x != 7.0
    assert erased.any() and erased[0].equal(erased[1]) and erased[0].equal(erased[2])
    for c, mean in enumerate((0.48145466, 0.4578275, 0.40821073)):
        assert torch.allclose(x[c][erased[c]], torch.tensor(mean))


def test_missing_dataset_is_an_error_naming_how_to_build(tmp_path):
    with pytest.raises(DataError, match="python -m shards build"):
        train_loader(_cfg(tmp_path / "nothing"), rank=0, world_size=1, micro_batch=MICRO_BATCH)


def test_default_synthetic_dataset_is_built_on_first_use(tmp_path):
    cfg = dataclasses.replace(_cfg(tmp_path / "syn"), num_workers=0)
    loader = train_loader(cfg, rank=0, world_size=1, micro_batch=8, build_synthetic=True)
    info = json.loads((tmp_path / "syn" / schema.DATASET_FILE).read_text())
    assert info["name"] == "synthetic" and len(info["splits"]["train"]["shards"]) == 16
    loader.set_epoch(0)
    assert len(loader) == 1280 // 8 and loader.dataset.plan().dropped_pairs == 0

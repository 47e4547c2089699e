"""The train and eval pipelines: coverage, disjointness, equal batches, identity constraint,
corrupt samples, and errors that name what is wrong."""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from itself.config import DataConfig
from itself.data.pipeline import eval_loaders, train_loader
from itself.data.plan import IdentityTable, epoch_layout, plan_slot
from itself.errors import DataError
from itself.data import transforms as T
from runs import plant_undecodable_image
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
    layout = train_loader(_cfg(small_dataset, num_workers=workers), rank=0, world_size=world,
                          micro_batch=MICRO_BATCH).dataset.epoch_layout()
    assert layout.stats["pairs_unused"] == layout.stats["pairs_repeated"] == 0  # (identities of 4 pairs: balanced)
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


def test_workers_persist_across_epochs_and_serve_the_epoch_they_are_handed(small_dataset):
    loader = train_loader(_cfg(small_dataset, num_workers=2, text_aug=True), rank=0, world_size=1,
                          micro_batch=MICRO_BATCH)
    served, workers = {}, []
    for epoch, start in ((0, 0), (1, 0), (3, 6), (1, 0)):
        loader.set_epoch(epoch, start)
        served[(epoch, start)] = list(loader)
        workers.append([w.pid for w in loader.loader._iterator._workers])
    assert all(w == workers[0] for w in workers) and len(set(workers[0])) == 2  # the same two processes
    for (epoch, start), batches in served.items():  # ... serving exactly what fresh loaders serve
        fresh = train_loader(_cfg(small_dataset, num_workers=0, text_aug=True, num_slots=2), rank=0, world_size=1,
                             micro_batch=MICRO_BATCH)
        fresh.set_epoch(epoch, start)
        expected = list(fresh)
        assert len(batches) == len(expected) == len(loader) - start
        assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, expected) for k in a)


def test_workers_and_no_workers_see_the_same_data_per_rank(small_dataset):
    # Different slot layouts shuffle differently, but both cover the rank's identities exactly.
    for workers in (0, 2):
        pids = [sorted(p for b in batches for p in b["pids"].tolist()) for batches in _epoch(small_dataset, 1, workers)]
        assert pids[0] == sorted(list(range(32)) * 4)


def _table(shards: list[list[tuple[int, list[int]]]], copies_of_shard=None) -> tuple[IdentityTable, dict]:
    """An identity table from shards given as [(pid, [captions of each image]), ...], and the
    caption count of each (shard, row)."""
    shard, pid, captions, caps = [], [], [], {}
    for s, identities in enumerate(shards):
        row = 0
        for p, images in identities:
            for n in images:
                shard.append(s), pid.append(p), captions.append(n)
                caps[(s, row)] = n
                row += 1
    return IdentityTable.from_rows(np.array(shard), np.array(pid), np.array(captions), len(shards),
                                   copies_of_shard), caps


def _plan(table, caps, num_slots, slot_batch, window_shards=16, epoch=0, k=2, identity_order="slots"):
    layout = epoch_layout(table, num_slots=num_slots, slot_batch=slot_batch, num_instance=k,
                          window_shards=window_shards, seed=0, epoch=epoch, identity_order=identity_order)
    slots = [[b for w in plan_slot(table, layout, s, lambda sh, r: caps[(sh, r)], seed=0, epoch=epoch)
              for b in w.batches] for s in range(num_slots)]
    return layout, slots


def _all_table_pairs(caps, table):
    pid_of = {}
    for i in range(len(table)):
        for r in range(table.first_row[i], table.first_row[i] + table.images[i]):
            pid_of[(int(table.shard[i]), int(r))] = int(table.pid[i])
    return {(s, r, c, pid_of[(s, r)]) for (s, r), n in caps.items() for c in range(n)}


def test_unbalanced_identities_use_every_pair_and_pad_slots_to_equal_steps():
    # Identities of 1 to 9 pairs over 5 shards, 3 slots: every slot yields the epoch's step count,
    # every pair is used, short groups and short slots are completed with repeats (counted).
    rng = random.Random(0)
    shards = [[(s * 10 + j, [rng.randint(1, 3) for _ in range(rng.randint(1, 3))]) for j in range(6)] for s in range(5)]
    table, caps = _table(shards)
    layout, slots = _plan(table, caps, num_slots=3, slot_batch=4)
    assert [len(b) for b in slots] == [layout.steps] * 3
    used = [p for batches in slots for b in batches for p in b]
    assert set(used) == _all_table_pairs(caps, table)
    assert layout.stats["pairs_unused"] == 0 and layout.stats["pairs_used"] == table.num_pairs
    assert layout.stats["pairs_repeated"] == len(used) - table.num_pairs > 0
    for batches in slots:  # sub-batches of 2 identities x 2 pairs, slots identity-disjoint
        for b in batches:
            assert len(b) == 4 and b[0][3] == b[1][3] and b[2][3] == b[3][3] and b[0][3] != b[2][3]
    owners = [{p[3] for b in batches for p in b} for batches in slots]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])


def test_single_pair_identities_train_with_their_pair_drawn_twice():
    # As the reference sampler: an identity with fewer pairs than num_instance fills its group by
    # drawing its pairs with replacement, so every identity of the shards is in the epoch.
    table, caps = _table([[(1, [1]), (2, [2]), (3, [1]), (4, [1, 1])], [(5, [1]), (6, [2]), (7, [1]), (8, [2])]])
    layout, (batches,) = _plan(table, caps, num_slots=1, slot_batch=4, window_shards=2)
    pairs = [p for batch in batches for p in batch]
    assert sorted({p[3] for p in pairs}) == list(range(1, 9))
    for pid in (1, 3, 5, 7):
        ((shard, row, cap, _),) = {p for p in pairs if p[3] == pid}
        assert [p for p in pairs if p[3] == pid] == [(shard, row, cap, pid)] * 2
    assert layout.stats["pairs_used"] == layout.stats["pairs_total"] == 12 and layout.stats["pairs_unused"] == 0


def test_more_slots_than_shards_split_shards_at_identity_boundaries():
    # 2 shards of 8 identities, 8 slots: each slot reads a part of a shard.
    table, caps = _table([[(s * 8 + j, [2, 2]) for j in range(8)] for s in range(2)])
    layout, slots = _plan(table, caps, num_slots=8, slot_batch=2)
    assert layout.steps == 4 and layout.stats["pairs_repeated"] == 0  # 2 identities x 2 groups of 2 pairs per slot
    assert {len({p[3] for b in batches for p in b}) for batches in slots} == {2}


def test_mixture_weights_repeat_or_subsample_identities():
    # Two datasets (one shard each): weight 2 uses the first's pairs twice, weight 0.5 half of the
    # second's identities, drawn anew each epoch.
    table, caps = _table([[(j, [2]) for j in range(8)], [(100 + j, [2]) for j in range(8)]], np.array([2.0, 0.5]))
    drawn = []
    for epoch in range(2):
        layout, (batches,) = _plan(table, caps, num_slots=1, slot_batch=4, epoch=epoch)
        count = collections.Counter(p[3] for b in batches for p in b)
        assert all(count[j] >= 4 for j in range(8))  # 2 pairs, twice (a short batch may repeat one more)
        drawn.append({p for p in count if p >= 100})
        assert 0 < len(drawn[-1]) < 8 and sum(count.values()) == 4 * layout.steps
        assert layout.stats["pairs_used"] == 16 + 2 * len(drawn[-1])
    assert drawn[0] != drawn[1]


def test_uniform_identity_order_spreads_each_batch_over_the_whole_set_and_uses_every_pair_once():
    # 40 shards of 10 identities in person-id order (as the builder writes them), 2 pairs each.
    table, caps = _table([[(s * 10 + j, [1, 1]) for j in range(10)] for s in range(40)])
    spread = {}
    for order in ("slots", "uniform"):
        layout, slots = _plan(table, caps, num_slots=4, slot_batch=8, window_shards=2, identity_order=order)
        used = collections.Counter(p for batches in slots for b in batches for p in b)
        assert set(used) == _all_table_pairs(caps, table) and set(used.values()) == {1}  # every pair, once
        assert layout.stats["pairs_used"] == 800 and layout.stats["pairs_unused"] == layout.stats["pairs_repeated"] == 0
        owners = [{p[3] for b in batches for p in b} for batches in slots]
        assert sum(map(len, owners)) == len(set().union(*owners)) == 400  # slots identity-disjoint
        gaps = []
        for batches in slots:
            for b in batches:
                ids = sorted({p[3] for p in b})
                assert len(ids) == 4 and all(collections.Counter(p[3] for p in b)[i] == 2 for i in ids)
                gaps += [y - x for n, x in enumerate(ids) for y in ids[n + 1:]]
        spread[order] = float(np.median(gaps))
    # slots: a batch's identities come from the 2 shards of a window (ids at most 19 apart);
    # uniform: from the whole set (two ids drawn from 0..399 sit a third of it apart: ~133).
    assert spread["slots"] <= 19 and spread["uniform"] > 90, spread


@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2)])
def test_uniform_identity_order_keeps_global_batches_independent_of_world_size(small_dataset, world, workers):
    def global_batches(world, workers):
        ranks = []
        for rank in range(world):
            loader = train_loader(_cfg(small_dataset, num_workers=workers, num_slots=4, identity_order="uniform"),
                                  rank=rank, world_size=world, micro_batch=8 // world, seed=0)
            loader.set_epoch(1)
            ranks.append(list(loader))
        return [{k: torch.cat([r[step][k] for r in ranks]) for k in ranks[0][step]} for step in range(len(ranks[0]))]

    reference, other = global_batches(1, 0), global_batches(world, workers)
    assert len(reference) == len(other)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(reference, other) for k in a)
    seen = collections.Counter((i, tuple(t.tolist())) for b in reference for i, t in zip(b["image_ids"].tolist(), b["tokens"]))
    assert seen == _all_pairs(small_dataset)  # every caption of the set, once
    assert all(set(collections.Counter(b["pids"].tolist()).values()) == {2} for b in reference)


def test_fewer_identities_than_slots_is_an_error_naming_what_to_change():
    table, caps = _table([[(j, [2]) for j in range(3)]])
    with pytest.raises(DataError, match="fewer than the 4 data slots: use fewer slots"):
        _plan(table, caps, num_slots=4, slot_batch=2)


def test_identity_split_across_a_shard_is_an_error():
    with pytest.raises(DataError, match="not consecutive in its shard"):
        _table([[(1, [2]), (2, [2]), (1, [2])]])


def test_workers_never_outnumber_the_identities_a_rank_adds_per_step(small_dataset):
    loader = train_loader(_cfg(small_dataset, num_workers=8), rank=0, world_size=2, micro_batch=MICRO_BATCH)
    assert (loader.dataset.layout.workers_per_rank, loader.dataset.layout.num_slots,
            loader.dataset.layout.slot_batch) == (2, 4, 2)
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


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_skipped_counted_and_the_rest_of_the_shard_arrives(small_dataset, tmp_path, workers, capfd):
    root = tmp_path / "d"
    shutil.copytree(small_dataset, root)
    victim = plant_undecodable_image(root, "train", "train-000002.tar", 3)
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
    assert len(loader) == 1280 // 8 and loader.dataset.epoch_layout().stats["pairs_repeated"] == 0


def test_a_16_bit_png_in_an_older_shard_decodes_scaled_not_clipped():
    # Builds before the builder converted 16-bit images stored them as they came: mid-grey must
    # read 128, not 255 (Pillow's convert("RGB") clips I;16 samples).
    import io

    import numpy as np
    from PIL import Image

    from itself.data.transforms import decode

    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(buf, "PNG")
    assert decode(buf.getvalue())[0, 0].tolist() == [0, 128, 255]


def test_an_epoch_counts_the_pairs_it_uses_per_dataset(small_dataset, tmp_path):
    """A mixture's proportions as metrics.jsonl's data record reports them: a weight of 2 uses every
    pair of its dataset twice, a weight of 1 once (whole weights: no draw)."""
    twin = tmp_path / "twin"
    shutil.copytree(small_dataset, twin)
    cfg = dataclasses.replace(_cfg(small_dataset), mix=(str(twin),), mix_weights=(1.0, 2.0))
    loader = train_loader(cfg, rank=0, world_size=1, micro_batch=MICRO_BATCH)
    loader.set_epoch(0)
    for _ in loader:
        pass
    pairs = _all_pairs(small_dataset).total()
    assert loader.stats["pairs_used_by_dataset"] == {str(small_dataset): pairs, str(twin): 2 * pairs}
    assert loader.stats["pairs_total"] == 2 * pairs


@pytest.mark.slow
def test_auto_workers_follow_the_cores_and_give_the_batches_of_explicit_workers(small_dataset):
    # data.num_workers=-1 (the default): the layout's slot readers run in at most cores - 1 loader
    # processes (itself.cpus), so the process count depends on the host but the batches do not.
    from itself.cpus import loader_worker_cap

    auto, explicit = _epoch(small_dataset, 1, -1, num_slots=2), _epoch(small_dataset, 1, 0, num_slots=2)
    assert len(auto[0]) == len(explicit[0])
    for a, b in zip(auto[0], explicit[0]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    loader = train_loader(_cfg(small_dataset, num_workers=-1, num_slots=2), rank=0, world_size=1,
                          micro_batch=MICRO_BATCH)
    assert loader.dataset.loader_workers <= max(0, loader_worker_cap())

"""Scale-out as typed: every node count works or says what to change, the paper presets lay out
the real datasets' sizes on 1 to 64 ranks using every pair, runs continue on another number of
ranks, data comes from a URL, and datasets are mixed and cross-evaluated."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import shards
from runs import SMALL, SMALL_SHARD_SAMPLES
from http_server import serve
from itself.filenames import latest_tag, tag_for
from itself.data.plan import IdentityTable, epoch_layout, plan_slot
from itself.dist import free_port
from itself.presets import get_preset
from itself.rundir import RunDir
from launch import slurm
from runs import STEPS_PER_EPOCH, RunsCode, run_train, small_run_args
from shards.writer import SHARD_SAMPLES

# ------------------------------------------------------------------------------ launch as typed


@pytest.mark.parametrize("preset", ["synthetic", "cuhk-pedes"])
def test_every_node_count_from_1_to_32_works_or_names_the_values_that_do(preset, tmp_path, capsys):
    for nodes in range(1, 33):
        args = ["--nodes", str(nodes), "--dry-run", "--jobs-dir", str(tmp_path), "--preset", preset]
        code = slurm.main(args)
        out, err = capsys.readouterr()
        if code == 0:
            assert f"{nodes} nodes x 8 tasks = {8 * nodes} ranks" in out
            continue
        assert code == 2 and err.startswith("error: "), err
        fix = re.search(r"use (data\.num_slots=\d+)|: (train\.batch_size=\d+(?: data\.num_slots=\d+)?)", err)
        assert fix, err
        assert slurm.main(args + (fix.group(1) or fix.group(2)).split()) == 0, capsys.readouterr().err
        capsys.readouterr()
    # The mission's command, as typed: 4 nodes x 8 GPUs on the default profile and preset.
    assert slurm.main(["--nodes", "4", "--dry-run", "--jobs-dir", str(tmp_path)]) == 0


# ------------------------------------------------------------------------------ real sizes


def planted_table(images: int, identities: int, pairs: int, seed: int) -> tuple[IdentityTable, list]:
    """Metadata of a train split of a real dataset's size: identity sizes drawn at random around
    the mean, each image with the dataset's caption count (a few with one more, to reach `pairs`),
    identities written into shards of up to SHARD_SAMPLES images as `python -m shards build` does
    (an identity never spans two)."""
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.multinomial(images - identities, rng.dirichlet(np.ones(identities) * 2))
    caps = np.full(images, pairs // images)
    caps[rng.choice(images, pairs - caps.sum(), replace=False)] += 1
    shard, pid, row, count = [], [], 0, 0
    for p, n in enumerate(sizes):
        if count + n > SHARD_SAMPLES and count:
            row, count = row + 1, 0
        shard += [row] * n
        pid += [p] * n
        count += n
    table = IdentityTable.from_rows(np.array(shard), np.array(pid), caps, row + 1)
    rows_of = {}
    for s, p_row in zip(np.array(shard), range(images)):
        rows_of.setdefault(int(s), []).append(int(caps[p_row]))
    return table, rows_of


# (train images, identities, pairs) of CUHK-PEDES, ICFG-PEDES and RSTPReid
REAL = {"cuhk-pedes": (34054, 11003, 68450), "icfg-pedes": (34674, 3102, 34674), "rstpreid": (18505, 3701, 37010)}


@pytest.mark.parametrize("name", sorted(REAL))
def test_paper_presets_lay_out_the_real_datasets_on_1_to_64_ranks_using_every_pair(name):
    cfg = get_preset(name)
    table, rows_of = planted_table(*REAL[name], seed=1)
    assert (int(table.images.sum()), len(table), table.num_pairs) == REAL[name]
    for world in (1, 8, 32, 64):
        lay = cfg.layout(world)
        layout = epoch_layout(table, num_slots=lay.num_slots, slot_batch=lay.slot_batch, num_instance=2,
                              window_shards=cfg.data.window_shards, seed=0, epoch=3,
                              identity_order=cfg.data.identity_order)
        assert layout.stats["pairs_unused"] / table.num_pairs <= 0.01  # (every pair, in fact)
        for slot in range(lay.num_slots):  # every slot, as its reader would plan it
            windows = plan_slot(table, layout, slot, lambda s, r: rows_of[s][r], seed=0, epoch=3)
            batches = [b for w in windows for b in w.batches]
            assert len(batches) == layout.steps and {len(b) for b in batches} == {lay.slot_batch}
            assert all(len({p[3] for p in b}) == lay.slot_batch // 2 for b in batches)
        repeated = layout.stats["pairs_repeated"] / table.num_pairs
        print(f"{name} {world} ranks: {lay.num_slots} slots, {layout.steps} steps, {repeated:.2%} pairs repeated")
        odd = int((table.pairs % 2).sum()) / table.num_pairs  # an identity's odd pair completes a group of 2
        assert repeated < odd + 0.05, (repeated, odd)  # (and padding slots to the largest one's steps)


# ------------------------------------------------------------------------------ another world size


def _final(run_dir) -> dict:
    folder = run_dir / "checkpoints" / latest_tag(run_dir / "checkpoints")
    return torch.load(sorted(folder.glob("*model_states.pt"))[0], weights_only=True)["module"]


def _launch(world: int) -> list[str] | None:
    return None if world == 1 else [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(world),
                                     "--master_port", str(free_port())]


@pytest.mark.slow
@pytest.mark.parametrize("stage,first,then", [("zero1", 2, 1), ("zero1", 1, 2), ("zero0", 2, 1)])
def test_a_run_continues_on_another_number_of_ranks(two_rank_run, small_dataset, tmp_path, stage, first, then):
    args = small_run_args(small_dataset, f"train.deepspeed={stage}")
    straight = tmp_path / "straight"
    if (stage, first) == ("zero0", 2):  # (the small runs' own: the synthetic preset's zero0)
        straight = two_rank_run
    else:
        run_train(args + [f"run_dir={straight}"], launcher=_launch(first))
    # Its checkpoint after epoch 1 (written by `first` ranks) continued on `then` ranks.
    moved, after = tmp_path / "moved", tag_for(STEPS_PER_EPOCH)
    source = straight / "checkpoints"
    if stage != "zero0":
        # The checkpoint is another run's (maybe read-only, maybe hostile): its universal copy is made
        # in this run's folder, and one planted beside it (DeepSpeed would unpickle it) is not used.
        marker, planted = tmp_path / "code-ran", source / f"universal-{after}"
        planted.mkdir()
        (planted / "COMPLETE").write_text("")
        torch.save({"module": RunsCode(marker)}, planted / "mp_rank_00_model_states.pt")
        before = sorted(p.relative_to(source) for p in source.rglob("*"))
    run = run_train(args + [f"run_dir={moved}", f"train.resume={source / after}"], launcher=_launch(then))
    assert f"(written by {first} rank(s), now {then})" in run.stdout
    if stage != "zero0":
        assert not marker.exists() and sorted(p.relative_to(source) for p in source.rglob("*")) == before
        assert (moved / "checkpoints" / f"universal-{after}" / "COMPLETE").exists()
    # The same batches in the same order (fixed data slots), the optimizer and BatchNorm state carried
    # over: only float summation order differs between world sizes. Stated tolerance: every tensor
    # within 5% (relative Frobenius norm; a lost optimizer state is ~40%), losses within 1e-3.
    a, b = _final(straight), _final(moved)
    worst = max(float((a[k].float() - b[k].float()).norm() / (a[k].float().norm() + 1e-12)) for k in a)
    assert a.keys() == b.keys() and worst < 0.05, worst
    losses = lambda run: [(r["step"], r["loss"]) for r in RunDir(run).records("train")  # noqa: E731
                          if r["step"] > STEPS_PER_EPOCH]
    assert [s for s, _ in losses(moved)] == [s for s, _ in losses(straight)] != []
    assert [x for _, x in losses(moved)] == pytest.approx([x for _, x in losses(straight)], rel=1e-3)


# ------------------------------------------------------------------------------ data from anywhere


@pytest.mark.slow
def test_two_ranks_reading_over_http_end_with_the_weights_of_the_local_run(two_rank_run, small_dataset, tmp_path):
    with serve(small_dataset.parent) as url:
        run_train(small_run_args(small_dataset, f"data.root={url}/{small_dataset.name}", f"run_dir={tmp_path / 'http'}"),
                  launcher=_launch(2))
    a, b = _final(two_rank_run), _final(tmp_path / "http")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = json.loads((tmp_path / "http" / "results.json").read_text())
    assert results["test_counts"]["gallery"] == 16


# ------------------------------------------------------------------------------ mixtures


@pytest.mark.slow
def test_a_mixture_trains_on_both_datasets_and_each_test_split_is_reported(small_dataset, tmp_path):
    other = tmp_path / "other"
    shards.build_synthetic(other, SMALL.__class__(**{**SMALL.__dict__, "seed": 11}), max_samples=SMALL_SHARD_SAMPLES,
                           progress=False)
    run_dir = tmp_path / "mixed"
    run_train(small_run_args(small_dataset, "train.epochs=1", f"data.mix=[{other}]", "data.mix_weights=[1, 0.5]",
                             f"eval.test_roots=[{other}]", f"run_dir={run_dir}"))
    data = RunDir(run_dir).records("data")[0]
    assert data["pairs_total"] == 128 + 128 and 128 < data["pairs_used"] < 256  # all of one, about half of the other
    by_dataset = data["pairs_used_by_dataset"]  # the mixture's proportions, as the user reads them
    assert by_dataset[str(small_dataset)] == 128 and by_dataset[str(other)] == data["pairs_used"] - 128
    assert torch.load(run_dir / "model.pt", weights_only=True)["num_ids"] == 64  # labels of both, apart
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["test_datasets"]) == {str(other)}
    other_test = results["test_datasets"][str(other)]
    assert other_test["counts"]["gallery"] == 16 and set(other_test["metrics"]) == {"global", "grab", "fused"}
    assert other_test["metrics"] != results["test"]

"""Person pre-training, then fine-tuning: the identity-free objective on a step schedule, a run that
starts from another run's exported weights (`model.init_from`), and the zero-shot numbers."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import shards

from itself.filenames import latest_tag, tag_for
from itself.config import TrainConfig
from itself.dist import free_port
from itself.engine import lr_factor
from itself.model import ITSELF
from itself.model.init import init_from
from itself.presets import resolve_config
from itself.records import Results
from itself.rundir import RunDir
from runs import run_train, small_run_args

PRETRAIN_STEPS = 6


def pretrain_args(root, *extra):
    return ["--preset", "pretrain-synthetic", *small_run_args(root), "train.max_steps=6", "train.warmup_steps=2",
            "eval.every_steps=3", "train.checkpoint_every=3", "model.t_small=4 steps", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A converted pre-training corpus as a user builds it (`--dataset synthetic-pretrain`): WebPerson's
    layout converted, one pseudo-identity per image, held-out val identities, an empty test split."""
    out = tmp_path_factory.mktemp("corpus") / "synthetic-pretrain"
    shards.build_synthetic_pretrain(out, pairs=256, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def pretrained(corpus, small_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    run_train(pretrain_args(corpus, f"run_dir={run_dir}", f"eval.test_roots=[{small_dataset}]"))
    return run_dir


def test_identity_free_pretraining_runs_on_steps_without_classifiers(pretrained, small_dataset):
    weights = torch.load(pretrained / "model.pt", weights_only=True)["state_dict"]
    assert weights and not [k for k in weights if k.startswith(("cid_heads", "id_heads"))]
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert not [k for r in train for k in r if k.startswith(("cid_", "id_"))]  # (only TAL: no classifier loss)
    assert {"tal_global_loss", "tal_grab_loss"} <= set(train[0])
    # Warm-up over warmup_steps, cosine to max_steps (the lr logged is the step's).
    t = TrainConfig(schedule="steps", max_steps=6, warmup_steps=2, lr=1e-3)
    cfg = type("C", (), {"train": t})()
    for r in train:
        assert r["lr"] == pytest.approx(1e-3 * lr_factor(r["step"], 1, cfg), rel=1e-6)
    assert lr_factor(2, 1, cfg) == 1.0 and lr_factor(6, 1, cfg) == pytest.approx(0.0, abs=1e-12)
    evals = [r["step"] for r in records if r["type"] == "eval"]
    assert evals == [3, 6]  # eval.every_steps, and the end
    results = RunDir(pretrained).results()
    assert results.best_step in (3, 6) and results.init_from is None and results.zero_shot is None
    # The corpus has no test split: the benchmark named in eval.test_roots is its test, zero-shot.
    tested = results.test_datasets[str(small_dataset)]
    assert tested["counts"]["queries"] == 32 and set(tested["metrics"]) == {"global", "grab", "fused"}


def final_weights(run_dir) -> dict:
    tag = latest_tag(run_dir / "checkpoints")
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def test_a_step_schedule_resumes_mid_stream_exactly(pretrained, tmp_path, corpus, small_dataset):
    # A job killed after its step-3 checkpoint: the run folder as it was then, resumed.
    run_dir = tmp_path / "killed"
    shutil.copytree(pretrained, run_dir)
    for name in ("model.pt", "model.safetensors", "config.json", "results.json"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "checkpoints" / tag_for(6))
    (run_dir / "checkpoints" / "latest").write_text(tag_for(3))
    (run_dir / "checkpoints" / "best").write_text(tag_for(3))
    run_train(pretrain_args(corpus, f"run_dir={run_dir}", f"eval.test_roots=[{small_dataset}]", "train.resume=latest"))
    a, b = final_weights(pretrained), final_weights(run_dir)
    assert latest_tag(run_dir / "checkpoints") == tag_for(6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_loads_the_towers_and_grab_and_leaves_the_heads_fresh(pretrained, small_dataset):
    cfg = resolve_config("synthetic", None, small_run_args(small_dataset))
    torch.manual_seed(1)
    model = ITSELF(cfg.model, 32, cfg.data.image_size)
    heads = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("cid_heads", "id_heads"))}
    record = init_from(model, pretrained / "model.pt", cfg.model.arch)
    source = torch.load(pretrained / "model.pt", weights_only=True)["state_dict"]
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in source.items())  # every tower and GRAB tensor
    assert heads and all(torch.equal(ours[k], v) for k, v in heads.items())  # classifiers as initialised
    assert record["loaded"] == len(source) and record["fresh"] == len(heads) and len(record["sha256"]) == 64


def test_init_from_refuses_another_architecture_or_image_size(pretrained, small_dataset):
    from itself.config import ConfigError

    cfg = resolve_config("synthetic", None, small_run_args(small_dataset, "data.image_size=[64,32]"))
    model = ITSELF(cfg.model, 32, cfg.data.image_size)
    with pytest.raises(ConfigError, match="the towers must match"):
        init_from(model, pretrained / "model.pt", cfg.model.arch)
    with pytest.raises(ConfigError, match="is a tiny model, this run builds tiny-deep"):
        init_from(ITSELF(resolve_config("synthetic", None, small_run_args(small_dataset, "model.arch=tiny-deep")).model,
                         32, (48, 16)), pretrained / "model.pt", "tiny-deep")


def test_a_fine_tune_starts_from_the_pretrained_run_and_reports_zero_shot(pretrained, small_dataset, tmp_path):
    run_dir = tmp_path / "finetune"
    run_train(small_run_args(small_dataset, f"run_dir={run_dir}", f"model.init_from={pretrained}", "train.epochs=1"))
    results = Results.read(run_dir / "results.json")
    assert results.init_from["path"] == str((pretrained / "model.pt").resolve())
    assert results.init_from["fresh"] > 0  # (the benchmark's classifier heads)
    zero = results.zero_shot
    assert set(zero["metrics"]) == {"global", "grab", "fused"} and zero["counts"]["queries"] == 32
    assert all(math.isfinite(v) for row in zero["metrics"].values() for v in row.values())
    assert f"init_from: {pretrained / 'model.pt'}" in (run_dir / "config.yaml").read_text()
    assert "zero-shot (initial weights)" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_identity_free_pretraining_on_two_ranks_follows_one_rank(pretrained, corpus, small_dataset, tmp_path):
    """The pseudo-identities (an image's captions) and TAL over the gathered global batch: 2 ranks train
    what 1 rank trains, but for float summation order (the stated tolerance of the scale-out tests:
    every tensor within 5% relative norm, losses within 1e-3)."""
    run_dir = tmp_path / "two"
    run_train(pretrain_args(corpus, f"run_dir={run_dir}", f"eval.test_roots=[{small_dataset}]"),
              launcher=[shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port())])
    a, b = final_weights(pretrained), final_weights(run_dir)
    worst = max(float((a[k].float() - b[k].float()).norm() / (a[k].float().norm() + 1e-12)) for k in a)
    assert a.keys() == b.keys() and worst < 0.05, worst
    losses = lambda run: [r["loss"] for r in RunDir(run).records("train")]  # noqa: E731
    assert losses(run_dir) == pytest.approx(losses(pretrained), rel=1e-3)

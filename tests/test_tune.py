"""`tune/search.py` on this machine: when ASHA may decide (after warm-up and the ATS horizon, never
at a rung within noise of chance), several seeds per configuration ranked by their mean, the best
config trains as is. The Ray cluster and SLURM paths are in test_tune_cluster.py / test_tune_slurm.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile

import pandas as pd
import pytest
import yaml
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from itself.presets import resolve_config
from runs import REPO, SECRETS, STEPS_PER_EPOCH, assert_no_secrets, run_main, run_train, small_run_args, train_env
from tune import rungs
from tune.search import best_configs
from tune.settings import SHORT_SCHEDULE, SearchSettings, short_schedule

def search(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    """`tune/search.py --storage-path TMP_PATH ARGS` with a Ray temp folder of its own (searches may
    run side by side), short: Ray's socket paths must fit."""
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    try:
        return subprocess.run([sys.executable, "tune/search.py", "--storage-path", str(tmp_path), *args], cwd=REPO,
                              env=train_env(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", **env),
                              capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------- rungs


def test_first_rung_comes_after_warm_up_and_the_ats_horizon():
    # The default search on the synthetic set: 20 steps/epoch, warm-up 1 epoch, ATS over 3 epochs.
    cfg = resolve_config("synthetic", None, list(SHORT_SCHEDULE))
    assert rungs.signal_onset_epochs(cfg, 20) == 3 and rungs.grace_evaluations(cfg, 20) == 3
    # The paper (RSTPReid): warm-up 5 epochs, ATS over 1450 steps = 10 epochs at 145 steps/epoch,
    # then rounded up to whole epochs and counted in evaluations.
    paper = resolve_config("rstpreid", None, [])
    assert rungs.grace_evaluations(paper, 145) == 10 and rungs.grace_evaluations(paper, 150) == 10
    paper.eval.every = 3
    assert rungs.grace_evaluations(paper, 145) == 4  # evaluations after epochs 3, 6, 9, 12
    paper.model.ats = "fixed"  # no horizon: warm-up alone
    assert rungs.grace_evaluations(paper, 145) == 2
    short = resolve_config("synthetic", None, ["train.epochs=4"])  # onset (6 epochs) after the last evaluation
    assert rungs.grace_evaluations(short, 20) == rungs.evaluations(short) == 4


def test_steps_per_epoch_are_counted_as_the_trainer_counts_them(small_dataset):
    cfg = resolve_config("synthetic", None, small_run_args(small_dataset))
    assert rungs.steps_per_epoch(cfg, 1) == STEPS_PER_EPOCH  # what train.log reports for these runs
    cfg.train.grad_accum = 2  # the same global batch in two micro-batches: the same optimizer steps
    assert rungs.steps_per_epoch(cfg, 1) == rungs.steps_per_epoch(cfg, 2) == STEPS_PER_EPOCH
    cfg.train.batch_size = 32
    assert rungs.steps_per_epoch(cfg, 1) == STEPS_PER_EPOCH // 2


def test_chance_floor_is_chance_plus_three_standard_errors():
    # The synthetic val split: 40 identities (chance 2.5%), 320 caption queries.
    assert rungs.chance_floor(2.5, 320) == pytest.approx(2.5 + 3 * 100 * (0.025 * 0.975 / 320) ** 0.5)
    assert 5.0 < rungs.chance_floor(2.5, 320) < 5.2
    assert rungs.chance_floor(2.5, 320, seeds=4) == pytest.approx(2.5 + (rungs.chance_floor(2.5, 320) - 2.5) / 2)


def _scheduler(tmp_path, grace=1, max_t=4):
    s = rungs.SignalASHA(floor=5.0, decisions=tmp_path / "asha.jsonl", metric="val_R1", mode="max",
                         time_attr="training_iteration", max_t=max_t, grace_period=grace, reduction_factor=2)
    trials = [Trial("__fake", stub=True) for _ in range(5)]
    for t in trials:
        s.on_trial_add(None, t)
    return s, trials


def _at(s, trial, evaluation, r1):
    return s.on_trial_result(None, trial, {"training_iteration": evaluation, "val_R1": r1})


def test_asha_stops_nobody_at_a_rung_within_noise_of_chance(tmp_path):
    s, (a, b, c, d, e) = _scheduler(tmp_path)
    assert _at(s, a, 1, 2.6) == TrialScheduler.CONTINUE
    assert _at(s, b, 1, 2.4) == TrialScheduler.CONTINUE  # below a (plain ASHA stops it), but both at chance
    assert s.held == 1
    assert _at(s, c, 1, 30.0) == TrialScheduler.CONTINUE  # signal at this rung from now on
    assert _at(s, d, 1, 2.5) == TrialScheduler.STOP  # below the cutoff of a rung that has signal
    assert _at(s, c, 4, 30.0) == TrialScheduler.CONTINUE
    assert _at(s, e, 4, 1.0) == TrialScheduler.CONTINUE  # below c, but a last evaluation: the run ends by itself
    decisions = [json.loads(line) for line in (tmp_path / "asha.jsonl").read_text().splitlines()]
    assert [(x["trial_id"], x["decision"].split(":")[0]) for x in decisions] == [(b.trial_id, "held"),
                                                                                  (d.trial_id, "stop")]


def test_asha_decides_only_from_its_grace_period_on(tmp_path):
    s, (a, b, *_) = _scheduler(tmp_path, grace=2)
    assert _at(s, a, 1, 40.0) == TrialScheduler.CONTINUE
    assert _at(s, b, 1, 10.0) == TrialScheduler.CONTINUE  # far below, but no rung yet
    assert _at(s, a, 2, 40.0) == TrialScheduler.CONTINUE
    assert _at(s, b, 2, 10.0) == TrialScheduler.STOP


# ----------------------------------------------------------------------------------- searches

_SETTINGS = dict(metric="val_R1", searcher="optuna", num_samples=2, searcher_seed=0,
                 searched=["p_start", "p_end", "discard_ratio"], seeds=[0], confirm_top=0, confirm_seeds=[1, 2],
                 gpus_per_trial=0, cpus_per_trial=1, max_failures=2, reduction_factor=2, max_evaluations=8,
                 grace_period=3, derived_grace_period=3, steps_per_epoch=20, signal_onset_epochs=3.0,
                 val_chance_R1=2.5, val_queries=320, signal_floor_R1=5.12)


@pytest.mark.slow
def test_default_search_decides_after_the_signal_with_seed_means_and_confirms_the_best(small_dataset, tmp_path):
    # The defaults, on the small set: warm-up 1 epoch and ATS over 2 epochs put the first rung at
    # evaluation 2 of 3; each configuration trains 2 seeds and is ranked by their mean. Then
    # --confirm-top 1 re-trains the best with a new seed (2), every evaluation, and ranks it first.
    run = search(tmp_path, "--name", "s", "--num-samples", "2", "--seeds", "2", "--confirm-top", "1",
                 "--confirm-seeds", "1",
                 *small_run_args(small_dataset, "train.epochs=3", "model.t_small=2 epochs"), **SECRETS)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    exp = tmp_path / "s"
    assert_no_secrets(exp)  # trials inherit the credentials; no trial folder or result keeps them
    settings = json.loads((exp / "search.json").read_text())
    assert settings["grace_period"] == settings["derived_grace_period"] == 2 and settings["seeds"] == [0, 1]
    assert "ASHA: first decision at evaluation 2 of 3" in run.stdout
    table = pd.read_parquet(exp / "results.parquet")
    assert len(table) == 2 and list(pd.read_csv(exp / "results.csv")["trial_id"]) == list(table["trial_id"])
    assert (table["evaluations"] >= 2).all(), "a trial was stopped before the first rung"
    # Every trial ASHA stopped has its stop in asha.jsonl, at the first rung or later, and no other
    # trial does (no file: ASHA stopped nobody and held nothing back).
    decisions = exp / "asha.jsonl"
    lines = [json.loads(x) for x in decisions.read_text().splitlines()] if decisions.exists() else []
    assert all(x["evaluation"] >= 2 and x["rung"] >= 2 for x in lines), lines
    stops = {x["trial_id"] for x in lines if x["decision"] == "stop"}
    assert stops == set(table.loc[table["stopped_early"], "trial_id"]), (lines, table[["trial_id", "evaluations"]])
    assert list(table["confirmed"]) == [True, False]
    top, rest = table.iloc[0], table.iloc[1:]
    # Its search seeds count when it ran every evaluation (the confirmation's protocol), then seed 2.
    assert list(top["seed_list"]) == ([2] if top["stopped_early"] else [0, 1, 2]) == list(range(3 - top["seeds"], 3))
    (confirm_trial,) = [p for p in (exp / "confirm").glob("run_trial_*") if p.is_dir()]
    confirmed = [json.loads(line) for line in (confirm_trial / "result.json").read_text().splitlines()]
    seed_2 = [line["per_seed"]["2"]["val_R1"] for line in confirmed]  # (a seed counts at its best evaluation)
    assert len(seed_2) == 3 and top["val_R1_per_seed"][-1] == pytest.approx(max(seed_2))
    for row in rest.to_dict("records"):
        assert row["seeds"] == 2 and list(row["seed_list"]) == [0, 1]
    for row in table.to_dict("records"):
        assert len(row["val_R1_per_seed"]) == row["seeds"]
        assert row["val_R1_mean"] == pytest.approx(sum(row["val_R1_per_seed"]) / row["seeds"])
        assert row["val_R1_std"] == pytest.approx(pd.Series(row["val_R1_per_seed"]).std())
    assert list(rest["val_R1_mean"]) == sorted(rest["val_R1_mean"], reverse=True)
    assert ((table["p_start"] == 0.65) & (table["p_end"] == 0.5) & (table["discard_ratio"] == 0.25)).any()
    assert (table["p_end"] <= table["p_start"]).all()
    assert (exp / "val_R1_vs_params.png").stat().st_size > 1000
    best = yaml.safe_load((exp / "best_config.yaml").read_text())
    assert best["model"]["p_start"] == pytest.approx(top["p_start"])
    run_train(["--config", str(exp / "best_config.yaml"), "train.epochs=1", f"run_dir={tmp_path / 'best_run'}"])
    assert (tmp_path / "best_run" / "results.json").exists()


def test_best_config_is_the_full_schedule_and_the_searched_one_is_beside_it():
    # The synthetic preset searches a short schedule; the best configuration is written at the
    # preset's own (what the README says `--config best_config.yaml` trains), and as searched.
    preset = resolve_config("synthetic", None, [])
    schedule = short_schedule("synthetic", [])
    assert schedule == list(SHORT_SCHEDULE)
    settings = SearchSettings(**{**_SETTINGS, "schedule": schedule})
    full, searched = best_configs(preset, settings, {"p_start": 0.7, "p_end": 0.45, "discard_ratio": 0.3})
    assert (full.train.epochs, full.train.warmup_epochs, full.model.t_small) == (24, 2.0, "6 epochs")
    assert (full.train.epochs, full.train.warmup_epochs, full.model.t_small) == (
        preset.train.epochs, preset.train.warmup_epochs, preset.model.t_small)
    assert (searched.train.epochs, searched.train.warmup_epochs, str(searched.model.t_small)) == (8, 1.0, "3")
    for cfg in (full, searched):
        assert (cfg.model.p_start, cfg.model.p_end, cfg.model.discard_ratio) == (0.7, 0.45, 0.3)
        assert cfg.name == "synthetic-best" and cfg.run_dir == "" and cfg.train.resume == ""
    # What the user set is theirs: only the rest of the short schedule applies; none with train.epochs.
    assert short_schedule("synthetic", ["train.warmup_epochs=2"]) == ["train.epochs=8", "model.t_small=3"]
    assert short_schedule("synthetic", ["train.epochs=3"]) == [] and short_schedule("rstpreid", []) == []


def test_settings_go_to_search_json_and_back_through_their_type():
    settings = SearchSettings(**{**_SETTINGS, "schedule": list(SHORT_SCHEDULE)})
    text = settings.to_json()
    assert json.loads(text)["signal_floor_R1"] == 5.12 and SearchSettings.from_json(text) == settings
    old = {k: v for k, v in json.loads(text).items() if k != "schedule"}  # (written before schedules were kept)
    assert SearchSettings.from_json(json.dumps(old)).schedule == []
    assert settings.demand(2) == {"CPU": 2, "GPU": 0} and settings.largest_demand() == {"CPU": 1, "GPU": 0}


def test_bad_search_arguments_are_user_errors(tmp_path):
    from tune.search import main

    run = run_main(main, ["--storage-path", tmp_path, "--seeds", "0"], env=train_env(RAY_TMPDIR=str(tmp_path / "ray")))
    assert run.returncode == 2 and "error: --seeds must be >= 1, got 0" in run.stderr
    run = run_main(main, ["--storage-path", tmp_path, "--resume", "--name", "nothing-here"], env=train_env(RAY_TMPDIR=str(tmp_path / "ray")))
    assert run.returncode == 2 and "error: --resume:" in run.stderr and "not a search" in run.stderr


@pytest.mark.slow
def test_a_trial_no_node_can_hold_is_refused_before_anything_is_written(small_dataset, tmp_path):
    # It would wait forever: said once Ray is up, before anything is written.
    run = search(tmp_path, "--name", "gpu", "--seeds", "2", "--gpus-per-trial", "1", *small_run_args(small_dataset))
    assert run.returncode == 2 and "error: a trial needs 2 CPU(s) and 2 GPU(s) on one node" in run.stderr, run.stderr
    assert not (tmp_path / "gpu").exists()


@pytest.mark.slow
def test_a_search_of_the_synthetic_preset_writes_the_full_schedule_as_best_config(small_dataset, tmp_path):
    # The search of the synthetic preset (no train.epochs given: the short schedule), on the small
    # set, one configuration: its best_config.yaml trains the preset's 24 epochs, and the output
    # is ours alone (a line per trial event, our table), not Ray's trial table.
    args = [a for a in small_run_args(small_dataset) if not a.startswith(("train.epochs=", "train.warmup_epochs="))]
    run = search(tmp_path, "--name", "short", "--num-samples", "1", *args)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    exp, preset = tmp_path / "short", resolve_config("synthetic", None, [])
    best = yaml.safe_load((exp / "best_config.yaml").read_text())
    assert (best["train"]["epochs"], best["train"]["warmup_epochs"], best["model"]["t_small"]) == (
        preset.train.epochs, preset.train.warmup_epochs, preset.model.t_small) == (24, 2.0, "6 epochs")
    searched = yaml.safe_load((exp / "best_config_search.yaml").read_text())
    assert (searched["train"]["epochs"], searched["train"]["warmup_epochs"], str(searched["model"]["t_small"])) == (
        8, 1.0, "3")
    assert best["data"] == searched["data"] and best["data"]["root"] == str(small_dataset)
    assert SearchSettings.from_json((exp / "search.json").read_text()).schedule == list(SHORT_SCHEDULE)
    assert "train the best at full length (24 epochs" in run.stdout and "best_config_search.yaml" in run.stdout
    assert "evaluation 8/8: val_R1" in run.stdout and "ran all 8 evaluations" in run.stdout
    for rays in ("Trial status", "Configuration for experiment", "tensorboard --logdir"):
        assert rays not in run.stdout + run.stderr

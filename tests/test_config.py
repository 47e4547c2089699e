"""The typed config: presets, overrides, YAML files, and errors that name the field."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from itself.config import Config, ConfigError, apply_overrides, to_dict
from itself.presets import PRESETS, get_preset, resolve_config
from runs import run_train


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips_through_yaml(name, tmp_path):
    cfg = get_preset(name)
    cfg.validate(world_size=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert resolve_config("synthetic", str(path)) == cfg


def test_paper_presets_carry_the_paper_hyper_parameters():
    cfg = get_preset("cuhk-pedes")
    assert (cfg.model.arch, cfg.data.image_size, cfg.train.batch_size, cfg.train.epochs) == ("ViT-B-16", (384, 128), 256, 60)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_epochs, cfg.model.tau) == (1e-5, 4e-5, 5.0, 0.015)
    assert (cfg.model.mars_layers, cfg.model.discard_ratio, cfg.model.p_start, cfg.model.p_end) == ((4, 11), 0.25, 0.65, 0.5)
    assert get_preset("select-a").model.selection == "mean_min" and get_preset("select-d").model.selection == "std_max"
    assert get_preset("ats-epoch").model.ats == "epoch" and get_preset("ats-none").model.ats == "fixed"
    assert get_preset("vit-b32-baseline").model.arch == "ViT-B-32" and get_preset("vit-b32-baseline").model.global_only


def test_each_paper_default_is_the_dataclass_default():
    # The dataset presets change nothing but the data: every other value is the config's default.
    cfg, default = get_preset("icfg-pedes"), Config()
    assert cfg.data.root == "data/icfg-pedes" and (cfg.name, cfg.data.root) != (default.name, default.data.root)
    cfg.name, cfg.data.root = default.name, default.data.root
    assert cfg == default


def _finished_run(path, preset: str, *overrides: str, best_epoch: int = 7):
    """A run directory as a finished training leaves the files `from:RUN_DIR` reads: config.yaml
    (written as the trainer writes it) and results.json."""
    from itself.config import config_yaml
    from itself.records import Results
    from itself.rundir import RunDir

    run = RunDir(path)
    run.path.mkdir(parents=True)
    run.write_configs(config_yaml(resolve_config(preset, None, list(overrides))), {})
    run.write_text(RunDir.RESULTS, Results(run_dir=str(path), best_epoch=best_epoch).to_json())
    return path


def test_t_small_from_a_baseline_run_is_its_best_epoch(tmp_path):
    baseline = _finished_run(tmp_path / "baseline", "vit-b16-baseline")  # (global only, on data/rstpreid)
    cfg = resolve_config("rstpreid", None, [f"model.t_small=from:{baseline}"])
    assert cfg.model.t_small == "7 epochs" and cfg.model.t_small_parsed() == (7.0, "epochs")
    assert get_preset("rstpreid").model.t_small_parsed() == (1450.0, "steps")  # the reference code's T
    with pytest.raises(ConfigError, match="is not a finished training run"):
        resolve_config("rstpreid", None, [f"model.t_small=from:{tmp_path / 'none'}"])


def test_t_small_from_a_run_that_is_not_a_global_only_baseline_is_refused(tmp_path):
    full = _finished_run(tmp_path / "full", "rstpreid")
    with pytest.raises(ConfigError, match=r"model.t_small=from:.*full is not a global-only baseline \(its "
                                          r"model.global_only is False: it trained GRAB and MARS\)"):
        resolve_config("rstpreid", None, [f"model.t_small=from:{full}"])
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "results.json").write_text('{"best_epoch": 7}')
    with pytest.raises(ConfigError, match="has no config.yaml: cannot check that it is a global-only baseline"):
        resolve_config("rstpreid", None, [f"model.t_small=from:{tmp_path / 'bare'}"])


def test_t_small_from_a_baseline_on_other_data_is_refused(tmp_path, small_dataset):
    other = _finished_run(tmp_path / "cuhk", "vit-b16-baseline", "data.root=data/cuhk-pedes")
    with pytest.raises(ConfigError, match=r"cuhk was trained on other data \(data/cuhk-pedes, this run: "
                                          r"data/rstpreid\)"):
        resolve_config("rstpreid", None, [f"model.t_small=from:{other}"])
    mixed = _finished_run(tmp_path / "mixed", "vit-b16-baseline", "data.mix=[data/icfg-pedes]")
    with pytest.raises(ConfigError, match="was trained on other data"):
        resolve_config("rstpreid", None, [f"model.t_small=from:{mixed}"])
    # Built data is compared by content: the same dataset elsewhere is the same data, another is not.
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    shutil.copy(small_dataset / "dataset.json", elsewhere / "dataset.json")
    moved = _finished_run(tmp_path / "moved", "baseline", f"data.root={elsewhere}")
    cfg = resolve_config("synthetic", None, [f"data.root={small_dataset}", f"model.t_small=from:{moved}"])
    assert cfg.model.t_small == "7 epochs"
    info = json.loads((small_dataset / "dataset.json").read_text())
    (elsewhere / "dataset.json").write_text(json.dumps({**info, "content_sha256": "0" * 64}))
    with pytest.raises(ConfigError, match="was trained on other data"):
        resolve_config("synthetic", None, [f"data.root={small_dataset}", f"model.t_small=from:{moved}"])


def test_overrides_are_typed():
    cfg = Config()
    apply_overrides(cfg, ["train.lr=3e-4", "model.mars_layers=[2, 3]", "data.text_aug=false", "seed=7",
                          "eval.fusion_weights=[0.5]", "train.warmup_epochs=1"])
    assert cfg.train.lr == 3e-4 and cfg.model.mars_layers == (2, 3) and cfg.data.text_aug is False
    assert cfg.seed == 7 and cfg.eval.fusion_weights == (0.5,) and cfg.train.warmup_epochs == 1.0


@pytest.mark.parametrize("overrides,world,message", [
    (["train.lrr=1"], 1, "unknown config key 'train.lrr'; did you mean train.lr"),
    (["optim.lr=1"], 1, "no section 'optim'"),
    (["train.epochs=many"], 1, "train.epochs: cannot use 'many'"),
    (["train.epochs=2.5"], 1, "train.epochs: cannot use 2.5"),
    (["model.p_start=0.4", "model.p_end=0.5"], 1, "model.p_start / model.p_end"),
    (["train.batch_size=66"], 2, r"train.batch_size: 66 is not divisible by world_size x train.grad_accum x "
                                 r"data.num_instance = 2 x 1 x 2 = 4"),
    (["train.batch_size=64", "train.grad_accum=3"], 1, "train.batch_size: 64 is not divisible"),
    (["data.num_slots=3"], 2, "data.num_slots: 3 is not a multiple of the world size 2"),
    (["train.precision=fp16"], 1, "train.precision"),
    (["model.selection=median"], 1, "model.selection"),
    (["eval.fusion_weights=[1.5]"], 1, "eval.fusion_weights"),
    (["train.lr"], 1, "expected key=value"),
])
def test_config_errors_name_the_field(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        cfg = resolve_config("synthetic", None, overrides)
        cfg.validate(world_size=world)


def test_unknown_preset_and_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'cuhk'"):
        get_preset("cuhk")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.epochz'"):
        resolve_config("synthetic", str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_config("synthetic", str(tmp_path / "missing.yaml"))


def test_cli_fails_before_any_work_with_the_message():
    run = run_train(["model.p_start=0.3", "run_dir=/nonexistent/x"], check=False)
    assert run.returncode == 2
    assert "error: model.p_start / model.p_end: need 0 < p_end <= p_start <= 1" in run.stderr
    printed = run_train(["--preset", "rstpreid", "--print-config", "train.epochs=3"]).stdout
    assert yaml.safe_load(printed)["train"]["epochs"] == 3

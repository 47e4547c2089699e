"""Inputs a careless user or an attacker can hand the trainer: each gets a clear refusal in
bounded time and memory, and nothing is turned silently into something else or left behind."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from itself.config import ConfigError
from itself.errors import UserError
from itself.model.export import load_exported
from itself.presets import resolve_config
from runs import REPO, run_train, small_run_args, train_env

# 320 bytes of YAML that expand to 10^9 strings if aliases are followed ("billion laughs").
ALIAS_BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"]
                       + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
                          f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
                          f"*{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]) + "\n"


def _train(*args: str, timeout: int | None = None) -> subprocess.CompletedProcess:
    """`python itself/train.py ARGS`: as a process of its own under `timeout` (a hang guard; a bomb
    must not take this test's memory), else run by this process."""
    if timeout is None:
        return run_train(list(args), check=False)
    return subprocess.run([sys.executable, "itself/train.py", *args], cwd=REPO, env=train_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    run = _train("--config", str(bomb), "--print-config", timeout=60)
    assert run.returncode == 2 and "aliases (*name) are not allowed" in run.stderr and "Traceback" not in run.stderr
    run = _train("--print-config", "data.mix=[&a x, *a]", timeout=60)
    assert run.returncode == 2 and "aliases (*name) are not allowed" in run.stderr


def test_a_config_bomb_inside_a_weights_only_model_file_is_refused_with_a_short_message(tmp_path):
    # A pickle can share one list many times: 40 levels of [x, x] are 2^40 leaves in 40 objects.
    node = [1]
    for _ in range(40):
        node = [node, node]
    path = tmp_path / "model.pt"
    torch.save({"format": "itself-model/1", "config": {"data": {"mix": node}}, "num_ids": 4, "fusion_weight": 0.5,
                "state_dict": {}}, path)
    with pytest.raises(UserError) as info:
        load_exported(path)
    assert "data.mix" in str(info.value) and len(str(info.value)) < 500


@pytest.mark.parametrize("override,message", [
    ("seed=1180591620717411303424", "seed: 1180591620717411303424 does not fit in 64 bits"),
    ("seed=-1", "seed: must be in [0, 2^63), got -1"),
    ("train.collective_timeout_s=1000000000000", "must be 1 second to 7 days (604800)"),
    ("model.mars_layers=[" + ",".join(["1"] * 2000) + "]", "model.mars_layers: 2000 values; at most 1000"),
    ("name=" + "a" * 300, "name: must be letters"),
], ids=["seed-over-64-bits", "seed-negative", "timeout-huge", "mars-layers-2000", "name-300-chars"])
def test_out_of_range_numbers_and_huge_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config("synthetic", None, [override]).validate()


def test_a_mistyped_data_root_is_an_error_not_a_synthetic_run(tmp_path):
    typo = tmp_path / "data" / "cuhk-pedse"
    run = _train(f"data.root={typo}", f"run_dir={tmp_path / 'run'}")
    assert run.returncode == 2 and f"{typo}/dataset.json not found" in run.stderr, run.stderr[-2000:]
    assert not typo.exists() and not (tmp_path / "run").exists()
    # Asked for, it is built there.
    cfg = resolve_config("synthetic", None, [f"data.root={typo}", "data.build_synthetic=true"])
    assert cfg.data.build_synthetic and not resolve_config("synthetic", None, [f"data.root={typo}"]).data.build_synthetic


def test_a_run_that_fails_before_its_first_step_leaves_no_run_folder(small_dataset, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"not_clip.weight": torch.zeros(3)}, weights)
    run_dir = tmp_path / "new-run"
    run = run_train(small_run_args(small_dataset, f"run_dir={run_dir}", f"model.pretrained={weights}"), check=False)
    assert run.returncode == 2 and "holds weights of another architecture" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and not run_dir.exists()

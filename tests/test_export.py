"""The exported model as the README presents it: `load_exported` gives the model (a named record
that still unpacks as `model, config, fusion_weight`), and its three files are readable alike."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from itself.config import to_dict
from itself.model import ITSELF
from itself.filenames import EXPORT_CONFIG, WEIGHTS
from itself.model.export import Exported, export, load_exported
from itself.presets import resolve_config
from runs import REPO, small_run_args, train_env


def _export(folder, small_dataset, selection="last_layer@0.4"):
    cfg = resolve_config("synthetic", None, small_run_args(small_dataset))
    torch.manual_seed(0)
    model = ITSELF(cfg.model, 32, cfg.data.image_size)
    export(folder / "model.pt", model.state_dict(), to_dict(cfg), 32, 0.3, selection=selection)
    return cfg


def test_load_exported_names_what_it_gives_and_still_unpacks(small_dataset, tmp_path):
    cfg = _export(tmp_path, small_dataset)
    for path in (tmp_path / "model.pt", tmp_path / WEIGHTS, tmp_path):
        exported = load_exported(path)
        assert isinstance(exported, Exported) and isinstance(exported.model, ITSELF)
        assert not exported.model.training
        assert exported.config.model.grab_dim == cfg.model.grab_dim == 32
        assert exported.fusion_weight == 0.3 and exported.selection == "last_layer@0.4"
        model, config, fusion_weight = exported  # (how itself/retrieve and older code read it)
        assert model is exported.model and config is exported.config and fusion_weight == 0.3


EXPORT = """
import sys, torch
from itself.config import to_dict
from itself.model import ITSELF
from itself.model.export import export
from itself.presets import resolve_config
cfg = resolve_config("synthetic", None, ["model.grab_dim=32"])
export(sys.argv[1] + "/model.pt", ITSELF(cfg.model, 4, cfg.data.image_size).state_dict(), to_dict(cfg), 4, 0.5)
"""


@pytest.mark.slow  # (a process per umask: it is read once, at import)
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_the_three_files_get_the_umask_permissions(tmp_path, umask, mode):
    # A run's export in a process of its own with that umask: model.safetensors once came out 0600
    # (safetensors' own) beside a 0644 model.pt.
    run = subprocess.run([sys.executable, "-c", EXPORT, str(tmp_path)], cwd=REPO, env=train_env(PYTHONPATH=str(REPO)),
                         preexec_fn=lambda: os.umask(umask), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("model.pt", WEIGHTS, EXPORT_CONFIG)}
    assert modes == {"model.pt": mode, WEIGHTS: mode, EXPORT_CONFIG: mode}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(modes)  # (no temporary file left)


def test_a_model_whose_config_disagrees_with_its_weights_is_refused_before_it_is_built(untrained_model, tmp_path):
    # A 15 MB model.pt saying num_ids=1000000 had the classifier heads (gigabytes) allocated first.
    from itself.errors import UserError

    blob = torch.load(untrained_model, weights_only=True)
    for num_ids, message in ((10**6, r"its config and weights disagree \(cid_heads.global.classifier.bias: the config "
                                     r"makes \(1000001,\), the file holds \(33,\)\)"),
                             ("32", "num_ids must be a positive integer, got '32'")):
        torch.save({**blob, "num_ids": num_ids}, tmp_path / "evil.pt")
        with pytest.raises(UserError, match=message):
            load_exported(tmp_path / "evil.pt")


@pytest.mark.parametrize("plant", ["/dev/zero", "fifo"])
def test_a_safetensors_config_that_is_a_device_or_fifo_is_refused_without_reading_it(untrained_model, tmp_path, plant):
    from itself.safeio import UnsafePath

    exported = load_exported(untrained_model)
    export(tmp_path / "model.pt", exported.model.state_dict(), to_dict(exported.config),
           torch.load(untrained_model, weights_only=True)["num_ids"], exported.fusion_weight)
    (tmp_path / EXPORT_CONFIG).unlink()
    os.mkfifo(tmp_path / EXPORT_CONFIG) if plant == "fifo" else (tmp_path / EXPORT_CONFIG).symlink_to(plant)
    with pytest.raises(UnsafePath, match=f"model: {tmp_path / EXPORT_CONFIG} is a (FIFO|special file), not a regular"):
        load_exported(tmp_path / WEIGHTS)

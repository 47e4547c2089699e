"""The exported model as the README presents it: `load_exported` gives the model (a named record
that still unpacks as `model, config, fusion_weight`), and its three files are readable alike."""

from __future__ import annotations

import os
import stat

import torch

from itself.config import to_dict
from itself.model import ITSELF
from itself.model.export import CONFIG, WEIGHTS, Exported, export, load_exported
from itself.presets import resolve_config
from runs import small_run_args


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


def test_the_three_files_get_the_umask_permissions(small_dataset, tmp_path):
    previous = os.umask(0o022)
    try:
        _export(tmp_path, small_dataset)
        modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("model.pt", WEIGHTS, CONFIG)}
        assert modes == {"model.pt": 0o644, WEIGHTS: 0o644, CONFIG: 0o644}  # safetensors alone wrote 0600
        os.umask(0o027)
        _export(tmp_path, small_dataset)  # (replacing them)
        modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("model.pt", WEIGHTS, CONFIG)}
        assert set(modes.values()) == {0o640}, modes
    finally:
        os.umask(previous)

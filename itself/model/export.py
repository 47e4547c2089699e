"""The exported model: everything inference needs, loadable without DeepSpeed.

A run writes `model.pt` (one file: the fp32 weights, the resolved config, the number of train
identities, the fusion weight and GRAB selection chosen on val, the test metrics) and the same
as `model.safetensors` (the weights) + `config.json` (the rest) beside it, the layout other
tools read. `load_exported` takes either and returns an `Exported` (model, config, fusion weight;
unpacks as that tuple); neither can run code (torch.load(weights_only=True), safetensors). All
three files get the same permissions: the umask's, as any file the run writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path
from typing import NamedTuple

import torch

from .. import filenames
from ..config import Config, from_dict
from ..errors import UserError
from ..safeio import read_regular, safe_load, temp_beside, write_atomic
from .itself import ITSELF, TRAIN

FORMAT = "itself-model/1"


class Exported(NamedTuple):
    """An exported model, ready for inference: `model, config, fusion_weight = load_exported(path)`."""

    model: ITSELF
    """In eval mode; encodes with the GRAB token selection chosen on val."""
    config: Config
    """The resolved training config of the run that wrote it."""
    fusion_weight: float
    """a of the fused score `a * S_global + (1 - a) * S_grab`, chosen on val."""

    @property
    def selection(self) -> str:
        """Which tokens GRAB embeds (`train`, or `last_layer@<ratio>`), chosen on val."""
        return self.model.selection


def export(path: str | os.PathLike, state_dict: dict, config: dict, num_ids: int, fusion_weight: float,
           metrics: dict | None = None, selection: str = TRAIN) -> None:
    """Write model.pt, and model.safetensors + config.json beside it, each atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT, "config": config, "num_ids": num_ids, "fusion_weight": fusion_weight,
            "selection": selection, "metrics": metrics or {}}
    _write_replacing(path, lambda tmp: torch.save({**meta, "state_dict": state_dict}, tmp))

    def weights(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
        shutil.copymode(path, tmp)  # (safetensors makes its file 0600; model.pt has the umask's)

    _write_replacing(path.with_name(filenames.WEIGHTS), weights)
    write_atomic(path.with_name(filenames.EXPORT_CONFIG), json.dumps(meta, indent=2) + "\n")


def _write_replacing(path: Path, write) -> None:
    """`write(tmp)` into a new file beside `path` (the umask's permissions), then rename it over `path`."""
    tmp = temp_beside(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


MAX_CONFIG_BYTES = 16 << 20  # config.json beside model.safetensors (a few KiB as written)


def _check_shapes(path: Path, model_cfg, num_ids, image_size, state_dict: dict) -> None:
    """UserError unless the model the file's config describes has exactly the file's tensors, found
    on the meta device (no memory): a config claiming a million identities or a huge embedding
    beside small weights would otherwise allocate gigabytes before the weights are compared."""
    if not isinstance(num_ids, int) or isinstance(num_ids, bool) or num_ids < 1:
        raise UserError(f"{path}: num_ids must be a positive integer, got {num_ids!r}")
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in ITSELF(model_cfg, num_ids, image_size).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    if wanted != found:
        key = next((k for k in sorted(wanted.keys() | found.keys()) if wanted.get(k) != found.get(k)), None)
        raise UserError(f"{path}: its config and weights disagree ({key}: the config makes {wanted.get(key)}, the file "
                        f"holds {found.get(key)}); not a model itself/train.py exported")


def load_exported(path: str | os.PathLike, map_location="cpu") -> Exported:
    """The model (in eval mode), its config and fusion weight, from an exported model.pt, or from
    a model.safetensors with its config.json (or the folder holding them)."""
    path = Path(path)
    if path.is_dir():
        path = path / filenames.WEIGHTS
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):  # (a FIFO or device would block or never end)
        raise UserError(f"{path}: not a regular file (a run writes model.pt into its run directory)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        companion = path.with_name(filenames.EXPORT_CONFIG)
        if not companion.exists():
            raise UserError(f"{path}: no {filenames.EXPORT_CONFIG} beside it (written with the weights by itself/train.py)")
        text = read_regular(companion, "model", MAX_CONFIG_BYTES, follow=True)
        try:
            meta = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{companion}: not the JSON itself/train.py writes ({e})") from None
        state_dict = load_file(str(path), device=str(map_location))
    else:
        if not path.exists():
            raise UserError(f"{path}: no such model file (a run writes model.pt into its run directory)")
        meta = safe_load(path, map_location)
        state_dict = meta.get("state_dict") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or state_dict is None:
        raise UserError(f"{path}: not an exported ITSELF model (expected model.pt, or model.safetensors with "
                        f"{filenames.EXPORT_CONFIG}, written by itself/train.py)")
    cfg = from_dict(meta["config"])
    # The exported weights replace any pretrained ones: build the backbone without loading them.
    model_cfg, num_ids = dataclasses.replace(cfg.model, pretrained=""), meta.get("num_ids")
    _check_shapes(path, model_cfg, num_ids, cfg.data.image_size, state_dict)
    model = ITSELF(model_cfg, num_ids, cfg.data.image_size)
    model.load_state_dict(state_dict)
    model.selection = meta.get("selection", TRAIN)  # encode_image / encode_text use the one chosen on val
    return Exported(model.eval(), cfg, meta["fusion_weight"])

"""The exported model: one file with everything inference needs, loadable without DeepSpeed.

`model.pt` holds the fp32 weights, the resolved config, the number of train identities and the
fusion weight chosen on val; `load_exported` rebuilds the model from it (never running code from
the file: it is read with torch.load(weights_only=True)).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..config import Config, from_dict
from ..safeio import safe_load
from .itself import ITSELF, TRAIN

FORMAT = "itself-model/1"


def export(path: str | os.PathLike, state_dict: dict, config: dict, num_ids: int, fusion_weight: float,
           metrics: dict | None = None, selection: str = TRAIN) -> None:
    """Write model.pt atomically: everything inference needs, without DeepSpeed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"format": FORMAT, "config": config, "num_ids": num_ids, "fusion_weight": fusion_weight,
                "selection": selection, "state_dict": state_dict, "metrics": metrics or {}}, tmp)
    os.replace(tmp, path)


def load_exported(path: str | os.PathLike, map_location="cpu") -> tuple[ITSELF, Config, float]:
    """(model in eval mode, config, fusion weight) from an exported model.pt."""
    blob = safe_load(path, map_location)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not an exported ITSELF model (expected model.pt written by itself/train.py)")
    cfg = from_dict(blob["config"])
    # The exported weights replace any pretrained ones: build the backbone without loading them.
    model = ITSELF(dataclasses.replace(cfg.model, pretrained=""), blob["num_ids"], cfg.data.image_size)
    model.load_state_dict(blob["state_dict"])
    model.selection = blob.get("selection", TRAIN)  # encode_image / encode_text use the one chosen on val
    return model.eval(), cfg, blob["fusion_weight"]

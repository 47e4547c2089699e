"""Starting a model from another run's exported weights (`model.init_from`): pre-train, then fine-tune.

The towers (the CLIP backbone) and the GRAB embeddings are copied where their shapes match; the
classifier heads (CID and ID: one class per identity of *this* run's data) always start fresh.
The weights are read from model.pt (torch.load with weights_only=True) or model.safetensors: a
file that would run code is refused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from ..safeio import file_sha256, safe_load

log = logging.getLogger(__name__)

FRESH = ("cid_heads.", "id_heads.")
"""Parameters that belong to the data a model was trained on: never carried over."""


def exported_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict, the exported model's metadata: config, ...) of model.pt or model.safetensors
    (with its config.json)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta_file = path.with_name("config.json")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.init_from: {meta_file} unreadable ({e}): it is written beside "
                              f"{path.name} by itself/train.py") from None
        return load_file(str(path)), meta
    try:
        blob = safe_load(path)
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"model.init_from: {path} cannot be read as an exported model ({str(e)[:200]})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise ConfigError(f"model.init_from: {path} is not an exported ITSELF model (model.pt of a run)")
    return blob["state_dict"], {k: v for k, v in blob.items() if k != "state_dict"}


def init_from(model: torch.nn.Module, path: str | os.PathLike, arch: str) -> dict:
    """Copy the towers and GRAB of the exported model at `path` into `model` (an `arch` model); returns
    {"path", "sha256", "loaded", "fresh", "skipped"} for the run's records. A ConfigError when the
    source is another architecture or its towers do not fit (another image size, say)."""
    weights, meta = exported_weights(path)
    source_arch = ((meta.get("config") or {}).get("model") or {}).get("arch")
    if source_arch and source_arch != arch:
        raise ConfigError(f"model.init_from: {path} is a {source_arch} model, this run builds {arch}: use the same "
                          "model.arch as the run it starts from")
    ours = model.state_dict()
    loaded, skipped = {}, []
    for name, value in weights.items():
        if name.startswith(FRESH) or name not in ours:
            continue
        if tuple(value.shape) != tuple(ours[name].shape):
            if name.startswith("backbone."):
                raise ConfigError(f"model.init_from: {name} is {tuple(value.shape)} in {path}, {tuple(ours[name].shape)} "
                                  "here: the towers must match (same model.arch and data.image_size as the run it "
                                  "starts from)")
            skipped.append(name)  # (GRAB of another grab_dim: it starts fresh, said below)
            continue
        loaded[name] = value
    missing_towers = [n for n in ours if n.startswith("backbone.") and n not in loaded]
    if missing_towers:
        raise ConfigError(f"model.init_from: {path} lacks {missing_towers[0]} (and {len(missing_towers) - 1} more "
                          "tower tensors): not a model of this architecture")
    model.load_state_dict(loaded, strict=False)
    fresh = [n for n in ours if n not in loaded]
    log.info(f"init_from {path}: {len(loaded)} tensors loaded (towers{', GRAB' if any(n.startswith('grab_') for n in loaded) else ''}), "
             f"{len(fresh)} fresh (classifier heads{', GRAB of another size' if skipped else ''})")
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "loaded": len(loaded), "fresh": len(fresh),
            "skipped": skipped}

"""What each backbone name means, without building anything or importing open_clip: the CPU-sized
random CLIPs and open_clip's named ViT configs (read from its JSON files), in open_clip's config
layout, and the facts validation needs. Below the config and the model."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import re
from pathlib import Path

# CPU-sized configurations (random weights only), beside open_clip's named architectures.
TINY_ARCHS = {
    "tiny": {"embed_dim": 64, "vision_cfg": {"layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
             "text_cfg": {"layers": 4, "width": 64, "heads": 2}},
    "tiny-deep": {"embed_dim": 128, "vision_cfg": {"layers": 6, "width": 128, "head_width": 32, "patch_size": 8},
                  "text_cfg": {"layers": 6, "width": 128, "heads": 4}},
}

# The fields of open_clip's tower configs the backbone builds, with open_clip's defaults. A named
# config that sets any other field (layer scale, attentional pooling, another tokenizer, a timm or
# Hugging Face tower...) is not offered: the backbone would build a different network.
VISION_DEFAULTS = {"image_size": 224, "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16}
TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0}


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    image_layers: int
    text_layers: int
    context_length: int
    patch_size: int

    @property
    def layers(self) -> int:
        """Layers of the shallower tower: the selection strategies index both towers' layers."""
        return min(self.image_layers, self.text_layers)


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


@functools.lru_cache(maxsize=1)
def _named_configs() -> dict[str, dict]:
    """open_clip's named configs that are plain CLIP ViTs, read from its model_configs/*.json
    (importing open_clip would load torchvision, timm and torch._dynamo: seconds per process)."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    configs = {}
    for path in sorted((f for folder in folders for f in folder.glob("*.json")), key=lambda f: _natural_key(f.stem)):
        c = json.loads(path.read_text())
        v, t = c.get("vision_cfg"), c.get("text_cfg")
        if (isinstance(v, dict) and isinstance(t, dict) and set(c) <= {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
                and set(v) <= set(VISION_DEFAULTS) and set(t) <= set(TEXT_DEFAULTS) and isinstance(v.get("layers"), int)):
            configs[path.stem] = c
    return configs


def clip_config(arch: str) -> dict | None:
    """{"embed_dim", "vision_cfg", "text_cfg"} of `arch` with open_clip's defaults filled in, or None
    when the backbone cannot build it."""
    c = TINY_ARCHS.get(arch) or _named_configs().get(arch)
    if c is None:
        return None
    return {"embed_dim": c["embed_dim"], "vision_cfg": {**VISION_DEFAULTS, **c["vision_cfg"]},
            "text_cfg": {**TEXT_DEFAULTS, **c["text_cfg"]}}


def known_archs() -> list[str]:
    return [*TINY_ARCHS, *_named_configs()]


def arch_spec(arch: str) -> ArchSpec | None:
    """The spec of `arch`, or None when the backbone cannot build it."""
    c = clip_config(arch)
    if c is None:
        return None
    v, t = c["vision_cfg"], c["text_cfg"]
    return ArchSpec(v["layers"], t["layers"], t["context_length"], v["patch_size"])


ACTIVATIONS = ("auto", "quick_gelu", "gelu")


def tag_quick_gelu(arch: str, tag: str) -> bool:
    """Whether open_clip's pretrained weights `tag` of `arch` were trained with QuickGELU (OpenAI's
    are); a KeyError when open_clip has no such tag for `arch`."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise KeyError(tag)
    return bool(cfg.get("quick_gelu", False))


def use_quick_gelu(arch: str, activation: str, weights_quick_gelu: bool | None) -> bool:
    """The activation to build: what the weights were trained with (`weights_quick_gelu`, None when
    unknown or random), unless `activation` or the architecture's name says otherwise. A known
    mismatch is a ValueError: the weights would run with an activation they were not trained with."""
    named_quick = arch.endswith("-quickgelu") or bool(_named_configs().get(arch, {}).get("quick_gelu"))
    if activation == "auto":
        want = weights_quick_gelu if weights_quick_gelu is not None else named_quick
    else:
        want = activation == "quick_gelu"
    if named_quick and not want:
        raise ValueError(f"{arch} is a QuickGELU architecture, but the weights or model.activation={activation} "
                         "ask for GELU")
    if weights_quick_gelu is not None and want != weights_quick_gelu:
        trained = "QuickGELU" if weights_quick_gelu else "GELU"
        raise ValueError(f"the weights were trained with {trained}, but model.activation={activation}"
                         f"{' and model.arch=' + arch if named_quick else ''} would build "
                         f"{'QuickGELU' if want else 'GELU'}; use model.activation=auto (or "
                         f"{'quick_gelu' if weights_quick_gelu else 'gelu'})")
    return want

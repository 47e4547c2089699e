"""What each backbone name means, without building anything: the CPU-sized random CLIPs and the
facts of open_clip's named configs that validation needs. Below the config and the model."""

from __future__ import annotations

import dataclasses

# CPU-sized configurations (random weights only), beside open_clip's named architectures.
TINY_ARCHS = {
    "tiny": dict(embed_dim=64, vision=dict(layers=4, width=64, head_width=32, patch_size=8),
                 text=dict(layers=4, width=64, heads=2)),
    "tiny-deep": dict(embed_dim=128, vision=dict(layers=6, width=128, head_width=32, patch_size=8),
                      text=dict(layers=6, width=128, heads=4)),
}


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


def _open_clip_spec(name: str) -> ArchSpec | None:
    """None for ResNet, timm, Hugging Face or CoCa towers: the backbone reads CLIP's own blocks."""
    import open_clip

    c = open_clip.get_model_config(name) or {}
    v, t = c.get("vision_cfg", {}), c.get("text_cfg", {})
    if (not isinstance(v.get("layers"), int) or v.get("timm_model_name") or c.get("custom_text")
            or t.get("hf_model_name") or "multimodal_cfg" in c):
        return None
    return ArchSpec(v["layers"], t.get("layers", 12), t.get("context_length", 77), v.get("patch_size", 16))


def known_archs() -> list[str]:
    import open_clip

    return [*TINY_ARCHS, *(name for name in open_clip.list_models() if _open_clip_spec(name))]


def arch_spec(arch: str) -> ArchSpec | None:
    """The spec of `arch`, or None when the backbone cannot build it."""
    if arch in TINY_ARCHS:
        v, t = TINY_ARCHS[arch]["vision"], TINY_ARCHS[arch]["text"]
        return ArchSpec(v["layers"], t["layers"], 77, v["patch_size"])
    import open_clip

    return _open_clip_spec(arch) if arch in open_clip.list_models() else None


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
    named_quick = arch.endswith("-quickgelu")
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

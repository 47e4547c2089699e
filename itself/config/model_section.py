"""The `model` section: backbone, GRAB, MARS, ATS and the losses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..archs import ACTIVATIONS, tag_quick_gelu, use_quick_gelu
from ..errors import ConfigError
from .values import ATS_MODES, SELECTION_STRATEGIES, T_SMALL, short_repr, spec_or_error


@dataclasses.dataclass
class ModelConfig:
    arch: str = "ViT-B-16"
    """Backbone: `ViT-B-16` (paper), `ViT-B-32` (supplementary Tab. 2), any of open_clip's plain CLIP
    ViT configs (not those with layer scale, attentional pooling or another tokenizer), or the
    CPU-sized random `tiny` / `tiny-deep`."""
    pretrained: str = "openai"
    """CLIP weights: "" for random, a local state-dict file, or an open_clip pretrained tag
    (e.g. `openai`; downloaded by open_clip). Position embeddings are interpolated to the image grid."""
    activation: str = "auto"
    """Transformer MLP activation: `auto` (what the weights were trained with: QuickGELU for OpenAI's
    weights, the `openai` tag or a local file in OpenAI's layout; the architecture's own otherwise),
    `quick_gelu` or `gelu`. A choice that contradicts the weights is refused."""
    patch_stride: int = 0
    """Stride of the image patches in pixels; 0 = the patch size (non-overlapping patches, as
    open_clip builds them). The reference code's `--stride_size` defaults to 16 whatever the
    backbone, so its ViT-B/32 runs overlapping 32-pixel patches every 16 pixels (a 23x7 grid at
    384x128 instead of 12x4): the `vit-b32` presets set 16 to match the reference. At most the
    patch size (a larger stride leaves pixels unseen). The position embedding follows the grid."""
    global_only: bool = False
    """Baseline: train the global branch only (no GRAB, no attention capture)."""
    grab_dim: int = 4096
    """Output size of the GRAB embedding (paper: 4096; the MLP's hidden layer is half of it)."""
    selection: str = "mars"
    """Saliency strategy for top-k: `mars`, `mean_max` (Tab. 3 B), `mean_min` (A), `std_max` (D),
    `std_min` (C) or `layer:<i>` (one layer)."""
    mars_layers: tuple[int, ...] = (4, 11)
    """Layers MARS rolls out, ascending (paper: middle + late = 4 and 11 of 12)."""
    discard_ratio: float = 0.25
    """Fraction of each rolled-out layer's lowest attention entries set to zero (paper: 0.25)."""
    ats: str = "step"
    """Token scheduler: `step` (ATS per step, the paper's best), `epoch` (ATS per epoch) or `fixed`."""
    p_start: float = 0.65
    """ATS keep ratio at the start (paper: 0.65)."""
    p_end: float = 0.5
    """ATS keep ratio from t_small on, and at inference (paper: 0.5)."""
    t_small: str = "1450 steps"
    """ATS decay length T: `<n> epochs` (the paper's rule: the epoch at which the baseline peaks),
    `<n> steps`, or `from:RUN_DIR` (the best val epoch of a finished baseline run, read from its
    results.json when the config is resolved). A bare number is epochs. Default: the reference
    code's 1450 steps, used there for every dataset (10 epochs of RSTPReid at batch 256)."""
    fixed_ratio: float = 0.4
    """Keep ratio when `ats` is `fixed` (the reference code's `select_ratio` without ATS: 0.4)."""
    tau: float = 0.015
    """TAL temperature (paper: 0.015)."""
    margin: float = 0.1
    """TAL margin (paper: 0.1)."""
    cid: bool = True
    """Train with the CID loss (cross-modal identity classification with hard negatives)."""
    id_loss: bool = True
    """Train with the ID loss (identity classification of image and text embeddings)."""
    init_from: str = ""
    """Start from another run's exported weights: a run directory (its model.pt), a model.pt or a
    model.safetensors. The towers and GRAB (where their shapes match) are loaded, the classifier
    heads start fresh, `pretrained` is not read; results.json records the source and its test
    metrics before fine-tuning (`zero_shot`). The pre-train -> fine-tune step."""

    def _check_pretrained_tag(self) -> None:
        """An open_clip tag must exist for `arch` and agree with `activation` (files are checked when
        loaded: that reads them)."""
        from ..archs import TINY_ARCHS

        if not self.pretrained or Path(self.pretrained).is_file():
            return
        if "/" in self.pretrained or Path(self.pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"):
            raise ConfigError(f"model.pretrained: file {self.pretrained} not found (a local weights file must be "
                              "readable where training runs: on a cluster, a shared file system)")
        if self.arch in TINY_ARCHS:
            raise ConfigError(f"model.pretrained: {self.arch} has no pretrained weights; use \"\" (random) or a "
                              f"local file, got {short_repr(self.pretrained)}")
        try:
            use_quick_gelu(self.arch, self.activation, tag_quick_gelu(self.arch, self.pretrained))
        except KeyError:
            import open_clip

            tags = ", ".join(open_clip.list_pretrained_tags_by_model(self.arch)) or "none"
            raise ConfigError(f"model.pretrained: {short_repr(self.pretrained)} is neither a file nor an open_clip tag of "
                              f"{self.arch} (tags: {tags})") from None
        except ValueError as e:
            raise ConfigError(f"model.activation: {e}") from None

    def t_small_parsed(self) -> tuple[float, str]:
        """(T, `steps` or `epochs`) of `t_small`; a ConfigError if it is not a number with a unit."""
        m = T_SMALL.fullmatch(str(self.t_small))
        if not m or float(m.group(1)) <= 0:
            raise ConfigError(f"model.t_small: expected a positive number of epochs or steps (`10 epochs`, "
                              f"`1450 steps`) or from:RUN_DIR, got {short_repr(self.t_small)}")
        unit = m.group(2) or "epochs"
        return float(m.group(1)), unit if unit.endswith("s") else unit + "s"

    def selection_layer(self) -> int | None:
        """The layer of a `layer:<i>` selection, None for the other strategies."""
        return int(self.selection.split(":", 1)[1]) if self.selection.startswith("layer:") else None

    def validate(self, num_layers: int | None = None) -> None:
        """`num_layers`: of the built model's shallower tower; by default looked up from `arch`."""
        if num_layers is None:
            num_layers = spec_or_error(self.arch).layers
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation: must be one of {', '.join(ACTIVATIONS)}, got {short_repr(self.activation)}")
        self._check_pretrained_tag()
        if self.ats not in ATS_MODES:
            raise ConfigError(f"model.ats: must be one of {', '.join(ATS_MODES)}, got {short_repr(self.ats)}")
        if not 0 < self.p_end <= self.p_start <= 1:
            raise ConfigError(f"model.p_start / model.p_end: need 0 < p_end <= p_start <= 1, "
                              f"got p_start={self.p_start}, p_end={self.p_end}")
        if not 0 < self.fixed_ratio <= 1:
            raise ConfigError(f"model.fixed_ratio: must be in (0, 1], got {self.fixed_ratio}")
        if not str(self.t_small).startswith("from:"):  # (resolved with resolve_t_small before a run)
            self.t_small_parsed()
        if not 0 <= self.discard_ratio < 1:
            raise ConfigError(f"model.discard_ratio: must be in [0, 1), got {self.discard_ratio}")
        if self.grab_dim < 2 or self.grab_dim % 2:
            raise ConfigError(f"model.grab_dim: must be a positive even number, got {self.grab_dim}")
        if self.init_from and not (Path(self.init_from).is_file() or Path(self.init_from).is_dir()):
            raise ConfigError(f"model.init_from: {short_repr(self.init_from)} is neither a run directory nor a model file")
        if self.tau <= 0:
            raise ConfigError(f"model.tau: must be > 0, got {self.tau}")
        if self.margin < 0:
            raise ConfigError(f"model.margin: must be >= 0, got {self.margin}")
        layers = list(self.mars_layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < 0:
            raise ConfigError(f"model.mars_layers: need ascending distinct layer indices >= 0, got {self.mars_layers}")
        if self.selection not in SELECTION_STRATEGIES and not self.selection.startswith("layer:"):
            raise ConfigError(f"model.selection: must be one of {', '.join(SELECTION_STRATEGIES)} or layer:<i>, "
                              f"got {short_repr(self.selection)}")
        try:
            single = self.selection_layer()
        except ValueError:
            raise ConfigError(f"model.selection: layer:<i> needs an integer, got {short_repr(self.selection)}") from None
        used = layers if self.selection == "mars" else [single] if single is not None else []
        bad = [i for i in used if not 0 <= i < num_layers]
        if bad:
            field = "model.mars_layers" if self.selection == "mars" else "model.selection"
            raise ConfigError(f"{field}: layer {bad[0]} does not exist; {self.arch} has {num_layers} layers "
                              f"(0..{num_layers - 1})")

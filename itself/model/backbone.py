"""The CLIP backbone (`clip.py`: open_clip's CLIP, built without importing open_clip) with attention
capture on chosen layers.

Layers whose attention the selection strategy needs run an explicit softmax attention and hand
back their head-averaged attention probabilities; every other layer keeps the fused
attention path (PyTorch SDPA / flash attention on GPU). The capture costs, per captured layer,
one unfused attention (a [B, H, N, N] matrix materialised instead of streamed: for ViT-B/16 at
384x128, N = 193, about 1.8 MB per image in fp32) and a head-averaged [B, N, N] copy kept for
selection. MARS (layers 4 and 11) captures 2 of 12 layers per tower; the mean/std strategies
capture all 12.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from ..archs import TINY_ARCHS, clip_config, known_archs, tag_quick_gelu, use_quick_gelu
from ..errors import ConfigError
from ..safeio import read_weights
from .clip import CLIP


def interpolate_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a [1 + h*w, D] ViT position embedding (square source grid) to `new_grid` (rows,
    columns) bilinearly, as the reference code does (align_corners=False, no antialiasing); the
    class-token embedding is kept as is. Interpolated in fp32 whatever the stored dtype."""
    cls, patches = pos[:1], pos[1:]
    side = math.isqrt(patches.shape[0])
    if side * side != patches.shape[0]:
        raise ValueError(f"cannot infer the grid of a position embedding with {patches.shape[0]} patches "
                         "(only square source grids are supported)")
    if (side, side) == tuple(new_grid):
        return pos
    grid = patches.reshape(side, side, -1).permute(2, 0, 1)[None].float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=False)
    return torch.cat([cls, grid[0].permute(1, 2, 0).reshape(-1, pos.shape[1]).to(pos.dtype)])


# Keys of OpenAI's CLIP state dicts that every layout has; OpenAI's released files are TorchScript
# archives whose state dicts also hold these three plain values.
OPENAI_KEYS = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
               "token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight")
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def read_clip_state_dict(path: str) -> tuple[dict, bool]:
    """(state dict, whether it is in OpenAI's layout) of a local weights file: OpenAI's TorchScript
    archive, a plain state dict with OpenAI CLIP's key names, or an open_clip checkpoint
    ({"state_dict": {"module.visual..."}}, not OpenAI's layout)."""
    sd = read_weights(path)
    wrapped = isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict)
    if wrapped:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict of CLIP weights")
    prefixed = any(k.startswith("module.") for k in sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    openai = not wrapped and not prefixed and all(k in sd for k in OPENAI_KEYS)
    return sd, openai


def load_clip_weights(clip: nn.Module, sd: dict, source: str) -> None:
    """Load a CLIP state dict, interpolating the image position embedding to this model's grid."""
    sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRAS}
    key = "visual.positional_embedding"
    if key in sd:
        sd[key] = interpolate_pos_embed(sd[key], clip.visual.grid_size)
    own = clip.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the model's: {tuple(own[k].shape)})" for k, v in sd.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in sd and k not in ("logit_scale", "logit_bias")]
    unexpected = [k for k in sd if k not in own and k not in ("logit_scale", "logit_bias")]
    if wrong or missing or unexpected:
        raise ConfigError(f"model.pretrained: {source} holds weights of another architecture than model.arch "
                          f"({'shapes ' + ', '.join(wrong[:2]) if wrong else ''}"
                          f"{'; missing ' + ', '.join(missing[:3]) if missing else ''}"
                          f"{'; unexpected ' + ', '.join(unexpected[:3]) if unexpected else ''})")
    clip.load_state_dict(sd, strict=False)


def pretrained_file(arch: str, tag: str) -> str:
    """The local file of open_clip's pretrained weights `tag` of `arch` (its cache, or a download)."""
    import open_clip

    try:
        return open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(arch, tag))
    except Exception as e:  # noqa: BLE001 - no network on a compute node, most often
        raise ConfigError(f"model.pretrained={tag}: cannot get open_clip's {arch} weights ({type(e).__name__}: {e}). "
                          "On a machine without internet, fill the Hugging Face cache (HF_HOME) from one with "
                          "internet, or point model.pretrained at a local weights file") from None


def strided_grid(image_size: tuple[int, int], patch: int, stride: int) -> tuple[int, int]:
    """(rows, columns) of patches of side `patch` taken every `stride` pixels (the reference code's
    grid: (H - patch) // stride + 1)."""
    return (image_size[0] - patch) // stride + 1, (image_size[1] - patch) // stride + 1


def set_patch_stride(visual: nn.Module, stride: int) -> None:
    """Take the image tower's patches every `stride` pixels (overlapping when below the patch size):
    the patch convolution's stride, the grid, and a position embedding for that grid (the current
    one resized bilinearly; pretrained weights are resized to it when loaded)."""
    patch = visual.conv1.kernel_size[0]
    if not 0 < stride <= patch:
        raise ConfigError(f"model.patch_stride: must be in 0..{patch} (0 = the patch size), got {stride}")
    if stride == visual.conv1.stride[0]:
        return
    old_grid = tuple(visual.grid_size)
    visual.conv1.stride = (stride, stride)
    visual.grid_size = strided_grid(visual.image_size, patch, stride)
    with torch.no_grad():  # (random weights: the drawn embedding, resized; open_clip draws no other)
        pos = visual.positional_embedding
        grid = pos[1:].T.reshape(1, -1, *old_grid).float()
        grid = F.interpolate(grid, size=visual.grid_size, mode="bilinear", align_corners=False)
        visual.positional_embedding = nn.Parameter(torch.cat([pos[:1], grid[0].flatten(1).T.to(pos.dtype)]))


def build_clip(arch: str, image_size: tuple[int, int], pretrained: str = "", activation: str = "auto",
               patch_stride: int = 0) -> nn.Module:
    """A CLIP (open_clip's, `clip.py`) for `image_size` (H, W) with the activation its weights were trained with:
    weights random (`pretrained=""`), from a local file (OpenAI's TorchScript archive, a state dict
    in OpenAI's layout, or an open_clip checkpoint), or an open_clip pretrained tag (its cached or
    downloaded file); patches taken every `patch_stride` pixels (0: the patch size). The image
    position embedding is resized bilinearly to the image grid."""
    sd, weights_quick = None, None
    if pretrained and os.path.isfile(pretrained):
        sd, openai = read_clip_state_dict(pretrained)
        weights_quick = True if openai else None  # (OpenAI trained with QuickGELU; others: unknown)
    elif pretrained:
        if arch in TINY_ARCHS:
            raise ConfigError(f"model.pretrained: {arch} has no pretrained weights, got {pretrained!r}")
        weights_quick = tag_quick_gelu(arch, pretrained)
        sd, _ = read_clip_state_dict(pretrained_file(arch, pretrained))
    try:
        quick = use_quick_gelu(arch, activation, weights_quick)
    except ValueError as e:
        raise ConfigError(f"model.activation: {e}") from None
    config = clip_config(arch)
    if config is None:
        raise ConfigError(f"model.arch: unknown architecture {arch!r}; use one of {', '.join(known_archs())}")
    clip = CLIP(config, image_size, quick)
    if patch_stride:
        set_patch_stride(clip.visual, patch_stride)
    if sd is not None:
        load_clip_weights(clip, sd, pretrained)
    return clip


def _attention_with_probs(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None):
    """One ResidualAttentionBlock with explicit softmax attention -> (x, [B, N, N] head-mean probs)."""
    mha: nn.MultiheadAttention = block.attn
    y = block.ln_1(x)
    b, n, d = y.shape
    h = mha.num_heads
    q, k, v = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    scores = (q * (d // h) ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    probs = scores.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, d)
    x = x + mha.out_proj(out)
    x = x + block.mlp(block.ln_2(x))
    return x, probs.detach().mean(dim=1)


def _plain_block(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    return block(x, attn_mask=attn_mask)


def _run_blocks(blocks, x, attn_mask, capture: tuple[int, ...], checkpoint: bool = False):
    """Run the blocks, capturing attention on `capture`; with `checkpoint`, each block's
    activations are recomputed in the backward pass instead of kept (captured attention is
    detached, so recomputing it changes nothing)."""
    from torch.utils.checkpoint import checkpoint as recompute

    captured = []
    for i, block in enumerate(blocks):
        run = _attention_with_probs if i in capture else _plain_block
        out = recompute(run, block, x, attn_mask, use_reentrant=False) if checkpoint else run(block, x, attn_mask)
        if i in capture:
            x, probs = out
            captured.append(probs)
        else:
            x = out
    return x, (torch.stack(captured) if captured else None)


class ClipBackbone(nn.Module):
    """Token features of both towers (projected to the joint space) and captured attention.

    `checkpointing` recomputes each transformer block's activations in the backward pass (less
    memory, about a third more compute); `compile()` compiles both towers with torch.compile."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.embed_dim = clip.visual.output_dim
        self.image_layers = len(clip.visual.transformer.resblocks)
        self.text_layers = len(clip.transformer.resblocks)
        self.num_patches = clip.visual.grid_size[0] * clip.visual.grid_size[1]
        self.checkpointing = False
        self._image_tower, self._text_tower = self._image, self._text

    def compile(self, **options) -> None:
        """torch.compile both towers (one graph each per set of captured layers: no graph breaks)."""
        self._image_tower = torch.compile(self._image, **options)
        self._text_tower = torch.compile(self._text, **options)

    def encode_image(self, images: torch.Tensor, capture: tuple[int, ...] = ()):
        """images [B, 3, H, W] -> (tokens [B, 1 + patches, E], attention [len(capture), B, N, N] or None)."""
        with record_function("image_tower"):  # (profiler ranges: bench/profile_step.py reads them)
            return self._image_tower(images, tuple(capture), self.checkpointing and torch.is_grad_enabled())

    def encode_text(self, tokens: torch.Tensor, capture: tuple[int, ...] = ()):
        """tokens [B, L] -> (tokens [B, L, E], attention [len(capture), B, L, L] or None)."""
        with record_function("text_tower"):
            return self._text_tower(tokens, tuple(capture), self.checkpointing and torch.is_grad_enabled())

    def _image(self, images: torch.Tensor, capture: tuple[int, ...], checkpoint: bool):
        vis = self.clip.visual
        x = vis.embed(images.to(vis.conv1.weight.dtype))
        x, attn = _run_blocks(vis.transformer.resblocks, x, None, capture, checkpoint)
        x = vis.ln_post(x)
        return (x @ vis.proj if vis.proj is not None else x), attn

    def _text(self, tokens: torch.Tensor, capture: tuple[int, ...], checkpoint: bool):
        c = self.clip
        x = c.token_embedding(tokens).to(c.positional_embedding.dtype)
        x = x + c.positional_embedding[: tokens.shape[1]]
        mask = c.attn_mask[: tokens.shape[1], : tokens.shape[1]] if c.attn_mask is not None else None
        x, attn = _run_blocks(c.transformer.resblocks, x, mask, capture, checkpoint)
        x = c.ln_final(x)
        proj = c.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else (x @ proj if proj is not None else x)
        return x, attn

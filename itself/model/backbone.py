"""The CLIP backbone (open_clip) with attention capture on chosen layers.

Layers whose attention the selection strategy needs run an explicit softmax attention and hand
back their head-averaged attention probabilities; every other layer keeps open_clip's fused
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

# CPU-sized configurations (random weights only), beside open_clip's named architectures.
TINY_ARCHS = {
    "tiny": dict(embed_dim=64, vision=dict(layers=4, width=64, head_width=32, patch_size=8),
                 text=dict(layers=4, width=64, heads=2)),
    "tiny-deep": dict(embed_dim=128, vision=dict(layers=6, width=128, head_width=32, patch_size=8),
                      text=dict(layers=6, width=128, heads=4)),
}
OPEN_CLIP_ARCHS = ("ViT-B-16", "ViT-B-32", "ViT-B-16-quickgelu", "ViT-B-32-quickgelu", "ViT-L-14")


def _tiny_clip(arch: str, image_size: tuple[int, int]) -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    spec = TINY_ARCHS[arch]
    return CLIP(embed_dim=spec["embed_dim"],
                vision_cfg=CLIPVisionCfg(image_size=image_size, **spec["vision"]),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, **spec["text"]))


def interpolate_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a [1 + h*w, D] ViT position embedding (square source grid) to `new_grid` (bicubic);
    the class-token embedding is kept as is."""
    cls, patches = pos[:1], pos[1:]
    side = math.isqrt(patches.shape[0])
    if side * side != patches.shape[0]:
        raise ValueError(f"cannot infer the grid of a position embedding with {patches.shape[0]} patches "
                         "(only square source grids are supported)")
    if (side, side) == tuple(new_grid):
        return pos
    grid = patches.reshape(side, side, -1).permute(2, 0, 1)[None].float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid[0].permute(1, 2, 0).reshape(-1, pos.shape[1]).to(pos.dtype)])


def read_weights(path: str) -> dict:
    """A state dict from a local file, never by unpickling code: a TorchScript archive (OpenAI's
    released CLIP files) through torch.jit, anything else with torch.load(weights_only=True)."""
    import zipfile

    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        return torch.jit.load(path, map_location="cpu").state_dict()
    from ..checkpoint import safe_load

    return safe_load(path)


def load_clip_weights(clip: nn.Module, path: str) -> None:
    """Load an open_clip / OpenAI-format state dict from a local file, interpolating the image
    position embedding to this model's grid."""
    sd = read_weights(path)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    key = "visual.positional_embedding"
    if key in sd:
        sd[key] = interpolate_pos_embed(sd[key], clip.visual.grid_size)
    missing, unexpected = clip.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in ("logit_scale", "logit_bias")]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of this architecture; missing {missing[:5]} ...")


def build_clip(arch: str, image_size: tuple[int, int], pretrained: str = "") -> nn.Module:
    """An open_clip CLIP for `image_size` (H, W): weights random (`pretrained=""`), from a local
    file, or from an open_clip pretrained tag (which open_clip downloads and resizes)."""
    if arch in TINY_ARCHS:
        clip = _tiny_clip(arch, image_size)
        if pretrained:
            load_clip_weights(clip, pretrained)
    else:
        import open_clip

        if arch not in open_clip.list_models():
            raise ValueError(f"model.arch: unknown architecture {arch!r}; use one of "
                             f"{', '.join((*TINY_ARCHS, *OPEN_CLIP_ARCHS))}")
        is_file = bool(pretrained) and os.path.isfile(pretrained)
        clip = open_clip.create_model(arch, pretrained=(pretrained or None) if not is_file else None,
                                      force_image_size=image_size)
        if is_file:
            load_clip_weights(clip, pretrained)
    # DeepSpeed crashes broadcasting 0-dim parameters; ITSELF uses a fixed temperature instead.
    clip.logit_scale = None
    if getattr(clip, "logit_bias", None) is not None:
        clip.logit_bias = None
    return clip


def _attention_with_probs(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None):
    """One open_clip ResidualAttentionBlock with explicit softmax attention -> (x, [B, N, N] head-mean probs)."""
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
    x = x + block.ls_1(mha.out_proj(out))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, probs.detach().mean(dim=1)


def _run_blocks(blocks, x, attn_mask, capture: tuple[int, ...]):
    captured = []
    for i, block in enumerate(blocks):
        if i in capture:
            x, probs = _attention_with_probs(block, x, attn_mask)
            captured.append(probs)
        else:
            x = block(x, attn_mask=attn_mask)
    return x, (torch.stack(captured) if captured else None)


class ClipBackbone(nn.Module):
    """Token features of both towers (projected to the joint space) and captured attention."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        for tower in (clip.visual.transformer, clip.transformer):
            if not getattr(tower, "batch_first", True):
                raise ValueError("open_clip transformers must be batch-first (open_clip >= 2.24)")
        self.clip = clip
        self.embed_dim = clip.visual.output_dim
        self.image_layers = len(clip.visual.transformer.resblocks)
        self.text_layers = len(clip.transformer.resblocks)
        self.num_patches = clip.visual.grid_size[0] * clip.visual.grid_size[1]

    def encode_image(self, images: torch.Tensor, capture: tuple[int, ...] = ()):
        """images [B, 3, H, W] -> (tokens [B, 1 + patches, E], attention [len(capture), B, N, N] or None)."""
        vis = self.clip.visual
        x = vis._embeds(images.to(vis.conv1.weight.dtype))
        x, attn = _run_blocks(vis.transformer.resblocks, x, None, capture)
        x = vis.ln_post(x)
        return (x @ vis.proj if vis.proj is not None else x), attn

    def encode_text(self, tokens: torch.Tensor, capture: tuple[int, ...] = ()):
        """tokens [B, L] -> (tokens [B, L, E], attention [len(capture), B, L, L] or None)."""
        c = self.clip
        x = c.token_embedding(tokens).to(c.positional_embedding.dtype)
        x = x + c.positional_embedding[: tokens.shape[1]]
        mask = c.attn_mask[: tokens.shape[1], : tokens.shape[1]] if c.attn_mask is not None else None
        x, attn = _run_blocks(c.transformer.resblocks, x, mask, capture)
        x = c.ln_final(x)
        proj = c.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else (x @ proj if proj is not None else x)
        return x, attn

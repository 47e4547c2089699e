"""CLIP's two towers: the ViT image tower and the causal text transformer, module for module and
parameter for parameter open_clip's `CLIP` for the plain ViT configs (`itself.archs.clip_config`):
the same state-dict names, the same parameter order (ZeRO checkpoints flatten parameters in that
order) and the same random initialisation, draw for draw (a seed gives the weights open_clip
would). Built here instead of by open_clip because importing open_clip loads torchvision, timm and
torch._dynamo: about 4 CPU-seconds in every training process, more than a small run's training.
The forward passes are in `backbone.py` (they capture attention on chosen layers)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose output keeps its input's dtype (bf16 activations through fp32 weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        mask = attn_mask.to(y.dtype) if attn_mask is not None else None
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]  # (the fused SDPA path)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers)])


class VisionTransformer(nn.Module):
    """Patch embedding, class token, learned position embedding, ln_pre, blocks, ln_post, proj."""

    def __init__(self, image_size: int | tuple[int, int], patch_size: int, width: int, layers: int, head_width: int,
                 mlp_ratio: float, output_dim: int, act: type[nn.Module]):
        super().__init__()
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.grid_size = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, width // head_width, mlp_ratio, act)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> the first block's input [B, 1 + patches, width]."""
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)


class CLIP(nn.Module):
    """The image tower as `visual`; the text tower's parts on the model itself, as open_clip keeps
    them (token_embedding, positional_embedding, transformer, ln_final, text_projection, and the
    causal mask as a buffer that is not saved)."""

    def __init__(self, config: dict, image_size: tuple[int, int], quick_gelu: bool):
        super().__init__()
        v, t = config["vision_cfg"], config["text_cfg"]
        act = QuickGELU if quick_gelu else nn.GELU
        self.visual = VisionTransformer(image_size, v["patch_size"], v["width"], v["layers"], v["head_width"],
                                        v["mlp_ratio"], config["embed_dim"], act)
        # Created in open_clip's order (its random draws), registered in open_clip's order below.
        token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        positional_embedding = nn.Parameter(torch.empty(t["context_length"], t["width"]))
        transformer = Transformer(t["width"], t["layers"], t["heads"], t["mlp_ratio"], act)
        ln_final = LayerNorm(t["width"])
        text_projection = nn.Parameter(torch.empty(t["width"], config["embed_dim"]))
        _init_text(token_embedding, positional_embedding, transformer, text_projection)
        self.transformer = transformer
        self.token_embedding = token_embedding
        self.positional_embedding = positional_embedding
        self.ln_final = ln_final
        self.text_projection = text_projection
        causal = torch.full((t["context_length"], t["context_length"]), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", causal, persistent=False)


def _init_text(token_embedding: nn.Embedding, positional_embedding: nn.Parameter, transformer: Transformer,
               text_projection: nn.Parameter) -> None:
    """open_clip's (and OpenAI's) initialisation of the text tower; the image tower keeps PyTorch's."""
    nn.init.normal_(token_embedding.weight, std=0.02)
    nn.init.normal_(positional_embedding, std=0.01)
    width, layers = transformer.width, transformer.layers
    proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(text_projection, std=width ** -0.5)

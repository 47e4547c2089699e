"""The ITSELF model: CLIP global embeddings + GRAB local embeddings selected by MARS / ATS."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import losses
from ..config import ModelConfig
from . import mars
from .ats import KeepSchedule
from .backbone import ClipBackbone, build_clip
from .grab import GrabEmbedding, select_tokens


class CidHead(nn.Module):
    """CID classifier of an (image, text) pair: MLP(concat) -> num_ids + 1 classes (last = NEG)."""

    def __init__(self, dim: int, num_ids: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.LayerNorm(dim), nn.GELU())
        self.classifier = nn.Linear(dim, num_ids + 1)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.mlp(torch.cat([a, b], dim=-1)))


def _id_classifier(dim: int, num_ids: int) -> nn.Linear:
    layer = nn.Linear(dim, num_ids)
    nn.init.normal_(layer.weight, std=0.001)
    nn.init.zeros_(layer.bias)
    return layer


class ITSELF(nn.Module):
    """`forward(batch, step)` -> dict of this rank's loss shares (`*_loss`) and report values;
    `encode_image` / `encode_text` -> (global, GRAB or None) embeddings for retrieval."""

    # Top-level modules that are new (not CLIP); the trainer gives them their own learning rates.
    GRAB_MODULES = ("grab_image", "grab_text")
    HEAD_MODULES = ("cid_heads", "id_heads")

    def __init__(self, cfg: ModelConfig, num_ids: int, image_size: tuple[int, int] = (384, 128), clip=None):
        super().__init__()
        self.cfg, self.num_ids = cfg, num_ids
        self.backbone = ClipBackbone(clip if clip is not None else build_clip(cfg.arch, image_size, cfg.pretrained))
        cfg.validate(num_layers=min(self.backbone.image_layers, self.backbone.text_layers))
        self.schedule = KeepSchedule(cfg.ats, cfg.p_start, cfg.p_end, cfg.t_small, cfg.fixed_ratio)
        dim = self.backbone.embed_dim
        branches = {"global": dim} if cfg.global_only else {"global": dim, "grab": cfg.grab_dim}
        if not cfg.global_only:
            self.grab_image = GrabEmbedding(dim, cfg.grab_dim)
            self.grab_text = GrabEmbedding(dim, cfg.grab_dim)
        self.cid_heads = nn.ModuleDict({b: CidHead(d, num_ids) for b, d in branches.items()}) if cfg.cid else None
        self.id_heads = nn.ModuleDict({b: _id_classifier(d, num_ids) for b, d in branches.items()}) if cfg.id_loss else None

    # -- selection ----------------------------------------------------------------------------

    def capture_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layers whose attention the selection strategy reads (none for the baseline)."""
        s = self.cfg.selection
        if self.cfg.global_only:
            return ()
        if s == "mars":
            return tuple(self.cfg.mars_layers)
        if s.startswith("layer:"):
            return (int(s.split(":", 1)[1]),)
        return tuple(range(num_layers))

    def _saliency(self, attn: torch.Tensor, query_index) -> torch.Tensor:
        s = self.cfg.selection
        if s.startswith("layer:"):
            s = "layer:0"  # only that layer was captured
        return mars.saliency(attn, s, query_index, discard_ratio=self.cfg.discard_ratio)

    # -- towers ---------------------------------------------------------------------------------

    def _image(self, images: torch.Tensor, step: int | None):
        tokens, attn = self.backbone.encode_image(images, self.capture_layers(self.backbone.image_layers))
        glob = tokens[:, 0]
        if self.cfg.global_only:
            return glob, None, 0
        k = self.schedule.num_keep(tokens.shape[1] - 1, step)
        with torch.no_grad():
            scores = self._saliency(attn, 0)
            candidates = torch.ones_like(scores, dtype=torch.bool)
            candidates[:, 0] = False  # never the CLS token
        picked, valid = select_tokens(tokens, scores, candidates, k)
        return glob, self.grab_image(picked, valid), k

    def _text(self, text: torch.Tensor, step: int | None):
        tokens, attn = self.backbone.encode_text(text, self.capture_layers(self.backbone.text_layers))
        eot = text.argmax(dim=-1)  # the end token has the highest id
        glob = tokens[torch.arange(text.shape[0], device=text.device), eot]
        if self.cfg.global_only:
            return glob, None, 0
        k = self.schedule.num_keep(text.shape[1] - 2, step)
        with torch.no_grad():
            scores = self._saliency(attn, eot)
            pos = torch.arange(text.shape[1], device=text.device)[None]
            candidates = (pos > 0) & (pos < eot[:, None]) & (text != 0)  # no SOS, EOT or padding
        picked, valid = select_tokens(tokens, scores, candidates, k)
        return glob, self.grab_text(picked, valid), k

    @torch.no_grad()
    def patch_selection(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(saliency [B, patches], indices [B, k] of the patches GRAB keeps at the final ratio), patches
        numbered row-major over the backbone's grid (for visualisation)."""
        if self.cfg.global_only:
            raise ValueError("a global-only (baseline) model selects no patches")
        _, attn = self.backbone.encode_image(images, self.capture_layers(self.backbone.image_layers))
        scores = self._saliency(attn, 0)[:, 1:]  # drop the CLS column
        return scores, scores.topk(self.schedule.num_keep(scores.shape[1], None), dim=1).indices

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor):
        """(global [B, E], GRAB [B, G] or None), with the final keep ratio."""
        glob, grab, _ = self._image(images, None)
        return glob.float(), None if grab is None else grab.float()

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor):
        glob, grab, _ = self._text(tokens, None)
        return glob.float(), None if grab is None else grab.float()

    # -- training --------------------------------------------------------------------------------

    def forward(self, batch: dict, step: int) -> dict:
        """Loss shares of this rank for a batch {images, tokens, pids} at global step `step`."""
        img_g, img_l, k_img = self._image(batch["images"], step)
        txt_g, txt_l, k_txt = self._text(batch["tokens"], step)
        pids = batch["pids"]
        out = {}
        branches = {"global": (img_g, txt_g)} if img_l is None else {"global": (img_g, txt_g), "grab": (img_l, txt_l)}
        for name, (v, t) in branches.items():
            out.update(losses.branch_losses(
                name, v, t, pids, tau=self.cfg.tau, margin=self.cfg.margin,
                cid_head=self.cid_heads[name] if self.cid_heads is not None else None,
                id_classifier=self.id_heads[name] if self.id_heads is not None else None, num_ids=self.num_ids))
        out["k_image"], out["k_text"] = k_img, k_txt
        return out

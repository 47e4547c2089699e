"""The ITSELF model: CLIP global embeddings + GRAB local embeddings selected by MARS / ATS."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.profiler import record_function

from .. import losses
from ..config import ModelConfig
from . import mars
from .ats import KeepSchedule
from .backbone import ClipBackbone, build_clip
from .grab import GrabEmbedding, select_tokens

TRAIN = "train"
"""The selection that trains: the model's strategy at the ATS keep ratio."""


def last_layer_selection(keep_ratio: float) -> str:
    """The reference code's evaluation selection: the last layer's attention at `keep_ratio`."""
    return f"last_layer@{keep_ratio:g}"


def last_layer_ratio(selection: str) -> float:
    name, _, ratio = selection.partition("@")
    if name != "last_layer" or not ratio:
        raise ValueError(f"unknown selection {selection!r}: expected {TRAIN!r} or last_layer@<keep ratio>")
    return float(ratio)


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

    def speed_options(self, grad_checkpointing: bool = False, compile: bool = False) -> None:
        """Recompute the transformer blocks' activations in the backward pass (memory for compute),
        and/or torch.compile both towers. Neither changes what the model computes."""
        self.backbone.checkpointing = grad_checkpointing
        if compile:
            self.backbone.compile()

    def param_role(self, name: str) -> str:
        """What a parameter is, for its learning rate: `grab` (the new GRAB embedding layers),
        `classifier` (the CID and ID classifier layers) or `backbone` (CLIP, and the CID MLP, which
        the reference code trains at the backbone's rate)."""
        top = name.split(".")[0]
        if top in ("grab_image", "grab_text"):
            return "grab"
        if top == "id_heads" or (top == "cid_heads" and name.split(".")[2] == "classifier"):
            return "classifier"
        return "backbone"

    def __init__(self, cfg: ModelConfig, num_ids: int, image_size: tuple[int, int], steps_per_epoch: int = 1,
                 clip=None):
        """`steps_per_epoch`: optimizer steps per epoch of the data plan (ATS's T is given in epochs)."""
        super().__init__()
        self.cfg, self.num_ids = cfg, num_ids
        self.backbone = ClipBackbone(clip if clip is not None else build_clip(cfg.arch, image_size, cfg.pretrained,
                                                                                cfg.activation, cfg.patch_stride))
        cfg.validate(num_layers=min(self.backbone.image_layers, self.backbone.text_layers))
        self.schedule = KeepSchedule.from_config(cfg, steps_per_epoch)
        self.selection = TRAIN
        """The selection `encode_image` / `encode_text` use by default (an exported model: the one chosen on val)."""
        dim = self.backbone.embed_dim
        branches = {"global": dim} if cfg.global_only else {"global": dim, "grab": cfg.grab_dim}
        if not cfg.global_only:
            self.grab_image = GrabEmbedding(dim, cfg.grab_dim)
            self.grab_text = GrabEmbedding(dim, cfg.grab_dim)
        self.cid_heads = nn.ModuleDict({b: CidHead(d, num_ids) for b, d in branches.items()}) if cfg.cid else None
        self.id_heads = nn.ModuleDict({b: _id_classifier(d, num_ids) for b, d in branches.items()}) if cfg.id_loss else None

    # -- selection ----------------------------------------------------------------------------
    # A selection names which tokens GRAB embeds: `train` is the training strategy at the current
    # (or, at inference, the final) ATS ratio; `last_layer@<r>` is the reference code's evaluation,
    # the last layer's attention at keep ratio r.

    def capture_layers(self, num_layers: int, selections=(TRAIN,)) -> tuple[int, ...]:
        """Layers (ascending) whose attention the selections read (none for the baseline)."""
        if self.cfg.global_only:
            return ()
        layers = set()
        for selection in selections:
            if selection != TRAIN:
                layers.add(num_layers - 1)
            elif self.cfg.selection == "mars":
                layers.update(self.cfg.mars_layers)
            elif self.cfg.selection_layer() is not None:
                layers.add(self.cfg.selection_layer())
            else:
                layers.update(range(num_layers))
        return tuple(sorted(layers))

    def _scores(self, attn: torch.Tensor, captured: tuple[int, ...], selection: str, query_index,
                num_tokens: int, step: int | None) -> tuple[torch.Tensor, int]:
        """(saliency [B, N] for the query token, tokens to keep) of one selection."""
        at = {layer: i for i, layer in enumerate(captured)}
        if selection != TRAIN:
            last = attn[at[captured[-1]]][None]
            return mars.saliency(last, "layer:0", query_index, self.cfg.discard_ratio), \
                max(1, math.floor(num_tokens * last_layer_ratio(selection) + 1e-9))
        s, single = self.cfg.selection, self.cfg.selection_layer()
        if s == "mars":
            used = attn[[at[layer] for layer in self.cfg.mars_layers]]
        elif single is not None:
            used, s = attn[[at[single]]], "layer:0"
        else:
            used = attn
        return mars.saliency(used, s, query_index, self.cfg.discard_ratio), self.schedule.num_keep(num_tokens, step)

    # -- towers ---------------------------------------------------------------------------------

    def _image(self, images: torch.Tensor, step: int | None, selections=(TRAIN,)):
        """(global [B, E], {selection: GRAB [B, G]}, k of the first selection)."""
        captured = self.capture_layers(self.backbone.image_layers, selections)
        tokens, attn = self.backbone.encode_image(images, captured)
        glob = tokens[:, 0]
        if self.cfg.global_only:
            return glob, {}, 0
        grabs, ks = {}, []
        candidates = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        candidates[:, 0] = False  # never the CLS token
        for selection in selections:
            with torch.no_grad(), record_function("selection"):
                scores, k = self._scores(attn, captured, selection, 0, tokens.shape[1] - 1, step)
            with record_function("grab"):
                picked, valid = select_tokens(tokens, scores, candidates, k)
                grabs[selection] = self.grab_image(picked, valid)
            ks.append(k)
        return glob, grabs, ks[0]

    def _text(self, text: torch.Tensor, step: int | None, selections=(TRAIN,)):
        captured = self.capture_layers(self.backbone.text_layers, selections)
        tokens, attn = self.backbone.encode_text(text, captured)
        eot = text.argmax(dim=-1)  # the end token has the highest id
        glob = tokens[torch.arange(text.shape[0], device=text.device), eot]
        if self.cfg.global_only:
            return glob, {}, 0
        pos = torch.arange(text.shape[1], device=text.device)[None]
        candidates = (pos > 0) & (pos < eot[:, None]) & (text != 0)  # no SOS, EOT or padding
        grabs, ks = {}, []
        for selection in selections:
            with torch.no_grad(), record_function("selection"):
                scores, k = self._scores(attn, captured, selection, eot, text.shape[1] - 2, step)
            with record_function("grab"):
                picked, valid = select_tokens(tokens, scores, candidates, k)
                grabs[selection] = self.grab_text(picked, valid)
            ks.append(k)
        return glob, grabs, ks[0]

    @torch.no_grad()
    def patch_selection(self, images: torch.Tensor, selection: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(saliency [B, patches], indices [B, k] of the patches GRAB keeps), patches numbered
        row-major over the backbone's grid (for visualisation); `selection` as in `encode_image`."""
        if self.cfg.global_only:
            raise ValueError("a global-only (baseline) model selects no patches")
        selection = selection or self.selection
        captured = self.capture_layers(self.backbone.image_layers, (selection,))
        _, attn = self.backbone.encode_image(images, captured)
        scores, k = self._scores(attn, captured, selection, 0, self.backbone.num_patches, None)
        scores = scores[:, 1:]  # drop the CLS column
        return scores, scores.topk(k, dim=1).indices

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, selections=(TRAIN,)) -> tuple[torch.Tensor, dict]:
        """(global [B, E], {selection: GRAB [B, G]}) in one pass, at the final keep ratio."""
        glob, grabs, _ = self._image(images, None, tuple(selections))
        return glob.float(), {s: g.float() for s, g in grabs.items()}

    @torch.no_grad()
    def encode_texts(self, tokens: torch.Tensor, selections=(TRAIN,)) -> tuple[torch.Tensor, dict]:
        glob, grabs, _ = self._text(tokens, None, tuple(selections))
        return glob.float(), {s: g.float() for s, g in grabs.items()}

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, selection: str | None = None):
        """(global [B, E], GRAB [B, G] or None) with `selection` (default: `self.selection`, the one
        chosen on val for an exported model)."""
        selection = selection or self.selection
        glob, grabs = self.encode_images(images, (selection,))
        return glob, grabs.get(selection)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, selection: str | None = None):
        selection = selection or self.selection
        glob, grabs = self.encode_texts(tokens, (selection,))
        return glob, grabs.get(selection)

    # -- training --------------------------------------------------------------------------------

    def forward(self, batch: dict, step: int) -> dict:
        """Loss shares of this rank for a batch {images, tokens, pids} at global step `step`."""
        img_g, img_l, k_img = self._image(batch["images"], step)
        txt_g, txt_l, k_txt = self._text(batch["tokens"], step)
        pids = batch["pids"]
        out = {}
        branches = {"global": (img_g, txt_g)}
        if not self.cfg.global_only:
            branches["grab"] = (img_l[TRAIN], txt_l[TRAIN])
        for name, (v, t) in branches.items():
            with record_function("losses"):
                out.update(losses.branch_losses(
                    name, v, t, pids, tau=self.cfg.tau, margin=self.cfg.margin,
                    cid_head=self.cid_heads[name] if self.cid_heads is not None else None,
                    id_classifier=self.id_heads[name] if self.id_heads is not None else None, num_ids=self.num_ids))
        out["k_image"], out["k_text"] = k_img, k_txt
        return out

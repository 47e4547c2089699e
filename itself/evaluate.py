"""Evaluation: ranks embed disjoint slices of a split, rank 0 ranks (blocked) and reports.

Every selection of GRAB tokens asked for (`eval.selection`: the training strategy at the final
keep ratio, the reference code's last-layer attention, or both) is embedded in the same forward
pass and ranked; `choose` picks the selection and fusion weight on val.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .config import Config
from .data.pipeline import eval_loaders
from .data.sources import ensure_dataset
from .fusion import best_fusion
from .metrics import fused_metrics
from .model.itself import TRAIN, last_layer_selection
from .records import Counts, EvalRecord, Evaluation


def selections_of(cfg: Config) -> tuple[str, ...]:
    """The GRAB selections `eval.selection` asks for (the training one alone for a global-only model)."""
    if cfg.model.global_only:
        return (TRAIN,)
    last = last_layer_selection(cfg.eval.keep_ratio)
    return {"train": (TRAIN,), "last_layer": (last,), "both": (TRAIN, last)}[cfg.eval.selection]


def _gather_rows(x: torch.Tensor, device) -> torch.Tensor:
    """Concatenate per-rank tensors of different lengths (padded all_gather: gloo and NCCL)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.to(device)
    n = torch.tensor([x.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).cpu()


class _Columns:
    """Per-batch embeddings of one side (gallery or queries), assembled over ranks in a fixed order."""

    def __init__(self, selections, global_dim: int, grab_dim: int | None):
        self.glob, self.pids, self.order = [], [], []
        self.grab = {s: [] for s in selections} if grab_dim else {}
        self.dims = {"global": global_dim, "grab": grab_dim}

    def add(self, glob, grabs: dict, pids, order) -> None:
        self.glob.append(glob.cpu())
        for s, g in grabs.items():
            self.grab[s].append(g.cpu())
        self.pids.append(pids)
        self.order.append(order)

    def assemble(self, device) -> dict:
        """{"global", "grab": {selection: ...}, "pids", "keys"} on every rank, sorted by key (image id;
        image id * 1000 + caption index for queries), so results do not depend on how ranks sliced
        the split."""
        def cat(parts, dim=None):  # (a rank with an empty slice still joins every gather, in its shape)
            local = torch.cat(parts) if parts else torch.zeros((0, dim) if dim else (0,), dtype=torch.long if
                                                                 dim is None else torch.float32)
            return _gather_rows(local, device)

        keys = cat(self.order)
        order = keys.argsort(stable=True)
        return {"global": cat(self.glob, self.dims["global"])[order], "pids": cat(self.pids)[order], "keys": keys[order],
                "grab": {s: cat(parts, self.dims["grab"])[order] for s, parts in self.grab.items()}}


@torch.no_grad()
def embed_split(model, cfg: Config, split: str, rank: int, world: int, device, selections=(TRAIN,), root=None):
    """(queries, gallery) of a split of `root` (default: data.root) on every rank (see `_Columns.assemble`)."""
    was_training = model.training
    model.eval()
    data = dataclasses.replace(cfg.data, root=root or cfg.data.root)
    images, texts = eval_loaders(data, split, rank=rank, world_size=world, batch_size=cfg.eval.batch_size)
    dims = model.backbone.embed_dim, None if model.cfg.global_only else model.cfg.grab_dim
    gallery, queries = _Columns(selections, *dims), _Columns(selections, *dims)
    for img, pid, image_id in images:
        gallery.add(*model.encode_images(img.to(device, non_blocking=True), selections), pid, image_id)
    for tok, pid, image_id, cap in texts:
        queries.add(*model.encode_texts(tok.to(device, non_blocking=True), selections), pid, image_id * 1000 + cap)
    model.train(was_training)
    return queries.assemble(device), gallery.assemble(device)


def evaluate(model, cfg: Config, split: str, rank: int, world: int, device, selections=None,
             root: str | None = None, keep_embeddings: bool = False) -> Evaluation | None:
    """The `Evaluation` of a split of `root` (default: data.root) on rank 0 (with the embeddings
    when `keep_embeddings`); None elsewhere. `selections` default to `selections_of(cfg)`."""
    selections = tuple(selections or selections_of(cfg))
    root = root or cfg.data.root
    queries, gallery = embed_split(model, cfg, split, rank, world, device, selections, root)
    if rank != 0:
        return None
    by_selection = {}
    for s in selections:
        q = {"global": queries["global"], "grab": queries["grab"].get(s), "pids": queries["pids"]}
        g = {"global": gallery["global"], "grab": gallery["grab"].get(s), "pids": gallery["pids"]}
        by_selection[s] = fused_metrics(q, g, cfg.eval.fusion_weights, block_bytes=cfg.eval.block_mb << 20)
    listed = ensure_dataset(root)["splits"][split]
    # Undecodable gallery images are skipped (and printed); the count says how many, never silently.
    counts = Counts(gallery=len(gallery["pids"]), queries=len(queries["pids"]),
                    gallery_skipped=listed["images"] - len(gallery["pids"]))
    return Evaluation(counts, by_selection, (queries, gallery) if keep_embeddings else None)


def choose(evaluation: Evaluation, split: str, epoch: int, step: int, metric: str = "R1") -> EvalRecord:
    """The evaluation's record with the selection and fusion weight of the highest fused `metric`
    (ties: higher mAP, then the order of `eval.selection`); `candidates` says how it was chosen."""
    candidates = {}
    for s, res in evaluation.selections.items():
        a, row = best_fusion(res, metric)
        candidates[s] = {"fusion_weight": a, "R1": row["R1"], "mAP": row["mAP"]}
    best = max(candidates, key=lambda s: (candidates[s][metric], candidates[s]["mAP"],
                                          -list(candidates).index(s)))
    return EvalRecord(split, epoch, step, candidates[best]["fusion_weight"], evaluation.selections[best], best,
                      candidates, dataclasses.asdict(evaluation.counts))

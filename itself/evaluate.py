"""Evaluation: ranks embed disjoint slices of a split, rank 0 ranks (blocked) and reports."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .config import Config
from .data import ensure_dataset, eval_loaders
from .metrics import fused_metrics


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


@torch.no_grad()
def embed_split(model, cfg: Config, split: str, rank: int, world: int, device) -> tuple[dict, dict]:
    """(queries, gallery) of a split on every rank: {"global", "grab" or None, "pids"} sorted by
    image id (and caption), so results do not depend on how ranks sliced the split."""
    was_training = model.training
    model.eval()
    images, texts = eval_loaders(cfg.data, split, rank=rank, world_size=world, batch_size=cfg.eval.batch_size)
    cols = {"global": [], "grab": [], "pids": [], "order": []}
    gallery = {k: [] for k in cols}
    for img, pid, image_id in images:
        g, l = model.encode_image(img.to(device, non_blocking=True))
        gallery["global"].append(g.cpu()), gallery["grab"].append(None if l is None else l.cpu())
        gallery["pids"].append(pid), gallery["order"].append(image_id)
    queries = {k: [] for k in cols}
    for tok, pid, image_id, cap in texts:
        g, l = model.encode_text(tok.to(device, non_blocking=True))
        queries["global"].append(g.cpu()), queries["grab"].append(None if l is None else l.cpu())
        queries["pids"].append(pid), queries["order"].append(image_id * 1000 + cap)
    model.train(was_training)
    return _assemble(queries, device), _assemble(gallery, device)


def _assemble(parts: dict, device) -> dict:
    out = {}
    for key in ("global", "grab", "pids", "order"):
        items = [p for p in parts[key] if p is not None]
        if key == "grab" and not items:
            out[key] = None
            continue
        local = torch.cat(items) if items else torch.zeros(0)
        out[key] = _gather_rows(local, device)
    order = out.pop("order").argsort(stable=True)
    return {k: (v[order] if v is not None else None) for k, v in out.items()}


def evaluate(model, cfg: Config, split: str, rank: int, world: int, device) -> dict | None:
    """All metrics of a split ({"global", "grab", "fused@a" ...}) on rank 0, None elsewhere."""
    queries, gallery = embed_split(model, cfg, split, rank, world, device)
    if rank != 0:
        return None
    results = fused_metrics(queries, gallery, cfg.eval.fusion_weights, block_bytes=cfg.eval.block_mb << 20)
    listed = ensure_dataset(cfg.data.root)["splits"][split]
    # Undecodable gallery images are skipped (and printed); the count says how many, never silently.
    results["counts"] = {"gallery": len(gallery["pids"]), "queries": len(queries["pids"]),
                         "gallery_skipped": listed["images"] - len(gallery["pids"])}
    return results


def best_fusion(results: dict, metric: str = "R1") -> tuple[float, dict]:
    """(a, metrics) of the fused weight with the highest `metric` (ties: higher mAP, then larger a)."""
    fused = {float(k.split("@")[1]): v for k, v in results.items() if k.startswith("fused@")}
    if not fused:
        return 1.0, results["global"]
    a = max(fused, key=lambda w: (fused[w][metric], fused[w]["mAP"], w))
    return a, fused[a]

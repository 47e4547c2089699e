"""MARS, multi-layer attention for robust selection: which tokens GRAB keeps.

`rollout` is attention rollout over selected layers with low-attention discarding; `saliency`
turns captured attention into one score per token for the query token (image: CLS, index 0;
text: the EOT position of each caption), for MARS and the ablation strategies of the
supplementary's Tab. 3. Selection is not differentiated through: callers run it under no_grad.
"""

from __future__ import annotations

import torch

from ..config import SELECTION_STRATEGIES


def _head_mean(attn: torch.Tensor) -> torch.Tensor:
    """[L, B, H, N, N] -> [L, B, N, N]; already head-averaged input passes through."""
    if attn.dim() == 5:
        return attn.mean(dim=2)
    if attn.dim() != 4:
        raise ValueError(f"attention must be [L, B, H, N, N] or [L, B, N, N], got shape {tuple(attn.shape)}")
    return attn


def rollout(attn: torch.Tensor, layers, discard_ratio: float) -> torch.Tensor:
    """Attention rollout over `layers` (indices into attn's first dim, ascending) -> [B, N, N].

    Per used layer: average heads; zero the lowest `discard_ratio` fraction of the N*N entries
    (the [0, 0] entry is never discarded); add the identity and halve; L1-normalise rows;
    R <- A @ R, starting from R = I.
    """
    attn = _head_mean(attn).float()
    layers = list(layers)
    if layers != sorted(layers) or not layers:
        raise ValueError(f"rollout layers must be a non-empty ascending list, got {layers}")
    _, b, n, _ = attn.shape
    eye = torch.eye(n, device=attn.device, dtype=attn.dtype).expand(b, n, n)
    result = eye
    num_discard = int(n * n * discard_ratio)
    for layer in layers:
        a = attn[layer].reshape(b, n * n)
        if num_discard > 0:
            lowest = a.topk(num_discard, dim=-1, largest=False).indices
            discard = torch.zeros_like(a, dtype=torch.bool).scatter_(1, lowest, True)
            discard[:, 0] = False  # the [0, 0] entry (query to itself) is never discarded
            a = a.masked_fill(discard, 0.0)
        a = (a.view(b, n, n) + eye) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def _query_rows(m: torch.Tensor, query_index) -> torch.Tensor:
    """Row `query_index` (an int, or one index per sample) of each [N, N] matrix of m [B, N, N]."""
    b = m.shape[0]
    if isinstance(query_index, int):
        return m[:, query_index]
    return m[torch.arange(b, device=m.device), query_index.to(m.device)]


def saliency(attn: torch.Tensor, strategy: str, query_index, discard_ratio: float, layers=None) -> torch.Tensor:
    """One score per token [B, N] for the query token; top-k keeps the highest scores.

    `attn` [L, B, (H,) N, N] holds the captured layers. Strategies: `mars` (the rollout row over
    `layers`, all when None), `mean_max` / `mean_min` (layer-mean attention, largest / smallest
    first: Tab. 3 B / A), `std_max` / `std_min` (layer-std attention: D / C) and `layer:<i>` (the
    attention of layer i, an index into attn's first dim).
    """
    a = _head_mean(attn).float()
    if strategy == "mars":
        return _query_rows(rollout(a, range(a.shape[0]) if layers is None else layers, discard_ratio), query_index)
    if strategy.startswith("layer:"):
        return _query_rows(a[int(strategy.split(":", 1)[1])], query_index)
    stat, _, order = strategy.partition("_")
    if stat not in ("mean", "std") or order not in ("max", "min"):
        raise ValueError(f"unknown selection strategy {strategy!r}; expected one of {', '.join(SELECTION_STRATEGIES)} or layer:<i>")
    reduced = a.mean(dim=0) if stat == "mean" else a.std(dim=0, unbiased=False)
    rows = _query_rows(reduced, query_index)
    return rows if order == "max" else -rows

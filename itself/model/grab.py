"""GRAB, the local branch: keep the most salient tokens, embed each, max-pool to one vector."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..collectives import all_reduce_sum_with_grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the rows of the *global* batch (all ranks), counting only valid rows.

    SyncBatchNorm needs CUDA; this computes the same statistics with two differentiable
    all-reduces, on any backend, so results do not depend on the world size. Padding tokens
    (captions shorter than k) are excluded from the statistics with `valid`.
    """

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:  # in fp32: bf16 activations may meet fp32 buffers (CPU kernels need one dtype)
            return F.batch_norm(x.float(), self.running_mean.float(), self.running_var.float(), self.weight.float(),
                                self.bias.float(), False, 0.0, self.eps).to(x.dtype)
        w = torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype) if valid is None else valid.to(x.dtype)[:, None]
        xf, wf = x.float(), w.float()
        stats = torch.cat([(xf * wf).sum(0), (xf * xf * wf).sum(0), wf.sum(0)])
        stats = all_reduce_sum_with_grad(stats)
        c = x.shape[1]
        count = stats[2 * c].clamp(min=1)
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean * mean).clamp(min=0)
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp(min=1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked += 1
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight.float() + self.bias.float()).to(x.dtype)


class GrabEmbedding(nn.Module):
    """Embed each kept token with Linear(x) + MLP(x) (MLP: Linear-BN-ReLU-Linear), max-pool over
    the real kept tokens."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.fc1 = nn.Linear(in_dim, out_dim // 2)
        self.bn = GlobalBatchNorm1d(out_dim // 2)
        self.fc2 = nn.Linear(out_dim // 2, out_dim)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """tokens [B, k, D] (already L2-normalised), valid [B, k] bool -> [B, out_dim]."""
        b, k, d = tokens.shape
        flat, vflat = tokens.reshape(b * k, d), valid.reshape(b * k)
        hidden = F.relu(self.bn(self.fc1(flat), vflat))
        emb = (self.linear(flat) + self.fc2(hidden)).view(b, k, -1)
        emb = emb.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
        return torch.where(valid.any(dim=1, keepdim=True), emb, torch.zeros_like(emb))


def select_tokens(features: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor, k: int):
    """Top-k candidate tokens by score -> (L2-normalised features [B, k, D], valid [B, k]).

    `candidates` [B, N] marks tokens that may be kept (not CLS / SOS / EOT / padding). When a
    sample has fewer than k candidates, the extra slots are marked invalid and ignored by pooling.
    """
    k = min(k, scores.shape[1])
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    idx = masked.topk(k, dim=1).indices
    valid = candidates.gather(1, idx)
    picked = features.gather(1, idx[..., None].expand(-1, -1, features.shape[-1]))
    return F.normalize(picked.float(), dim=-1).to(features.dtype), valid

"""The naive reference of full ITSELF: the same computation written the way research code does,
with per-sample Python loops (hard-negative search by argsort per row, triplets built one by one,
rollout discarding per sample, GRAB pooling per sample). Used only by bench/step_bench.py, which
checks it gives the same loss as ours before timing both."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from itself import losses
from itself.model import grab, mars


def naive_hard_negatives(sim, pids):
    text_neg, image_neg = [], []
    for i in range(sim.shape[0]):
        for j in torch.argsort(sim[i], descending=True):
            if pids[i] != pids[j]:
                text_neg.append(int(j))
                break
        for j in torch.argsort(sim[:, i], descending=True):
            if pids[i] != pids[j]:
                image_neg.append(int(j))
                break
    return torch.tensor(text_neg), torch.tensor(image_neg)


def naive_cid_sum(head, image_feats, text_feats, pids, text_neg, image_neg, neg_class, rows):
    vs, ts, labels = [], [], []
    for i in range(image_feats.shape[0])[rows]:
        vs += [image_feats[i], image_feats[image_neg[i]], image_feats[i]]
        ts += [text_feats[i], text_feats[i], text_feats[text_neg[i]]]
        labels += [int(pids[i]), neg_class, neg_class]
    v, t, y = torch.stack(vs), torch.stack(ts), torch.tensor(labels, device=image_feats.device)
    dtype = next(head.parameters()).dtype
    v, t = v.to(dtype), t.to(dtype)
    return (F.cross_entropy(head(v, t).float(), y, reduction="sum") + F.cross_entropy(head(t, v).float(), y, reduction="sum")) / 2


def naive_rollout(attn, layers, discard_ratio):
    attn = mars._head_mean(attn).float()
    _, b, n, _ = attn.shape
    eye = torch.eye(n, device=attn.device)
    result = eye.expand(b, n, n)
    for layer in layers:
        flat = attn[layer].reshape(b, n * n).clone()
        k = int(n * n * discard_ratio)
        if k:
            idx = flat.topk(k, dim=-1, largest=False).indices
            for s in range(b):  # the reference code's per-sample loop
                row = idx[s][idx[s] != 0]
                flat[s, row] = 0
        a = (flat.view(b, n, n) + eye) / 2
        a = a / a.sum(-1, keepdim=True)
        result = torch.bmm(a, result)
    return result


def naive_grab_forward(self, tokens, valid):
    b, k, d = tokens.shape
    flat, vflat = tokens.reshape(b * k, d), valid.reshape(b * k)
    emb = (self.linear(flat) + self.fc2(F.relu(self.bn(self.fc1(flat), vflat)))).view(b, k, -1)
    pooled = []
    for s in range(b):  # maxk_pool1d_var: one sample at a time over its real tokens
        real = emb[s][valid[s]]
        pooled.append(real.max(dim=0).values if len(real) else torch.zeros_like(emb[s, 0]))
    return torch.stack(pooled)


@contextlib.contextmanager
def naive():
    """Swap our vectorised pieces for the loops while the block runs."""
    saved = (losses.hard_negatives, losses.cid_sum, mars.rollout, grab.GrabEmbedding.forward)
    losses.hard_negatives, losses.cid_sum, mars.rollout = naive_hard_negatives, naive_cid_sum, naive_rollout
    grab.GrabEmbedding.forward = naive_grab_forward
    try:
        yield
    finally:
        losses.hard_negatives, losses.cid_sum, mars.rollout, grab.GrabEmbedding.forward = saved

"""The ITSELF losses over the global batch: TAL, CID and ID, for one embedding branch.

Each rank computes its *share* of each loss: the terms of its own pairs, with negatives and
normalisers taken from the whole global batch (features all-gathered with gradient). Summed
over ranks, the shares equal the single-process loss over the global batch, with the same
gradients on every input. (A data-parallel engine that averages gradients over ranks therefore
needs the loss multiplied by the world size; the trainer does that.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .collectives import gather, gather_with_grad, rank_and_world


def _tal_terms(scores: torch.Tensor, row_pids: torch.Tensor, col_pids: torch.Tensor, tau: float,
               margin: float) -> torch.Tensor:
    """Per-row TAL term of a [R, C] cosine-similarity matrix (rows: anchors, cols: candidates)."""
    positive = row_pids[:, None] == col_pids[None, :]
    logits = scores / tau
    # Weights of the positives: softmax over each row's positives, not differentiated (as the paper).
    alpha = torch.softmax(logits.masked_fill(~positive, float("-inf")), dim=1).detach()
    # tau * log sum over negatives of exp(s / tau), stably; -inf (hence no loss) when none.
    neg = tau * torch.logsumexp(logits.masked_fill(positive, float("-inf")), dim=1)
    return (-(alpha * scores).sum(1) + neg + margin).clamp(min=0)


def tal_rows(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor, tau: float = 0.015,
             margin: float = 0.1, rows: slice | None = None) -> torch.Tensor:
    """TAL terms of the pairs `rows` (all by default): text i against all images plus image i
    against all texts."""
    v = F.normalize(image_feats.float(), dim=-1)
    t = F.normalize(text_feats.float(), dim=-1)
    rows = rows if rows is not None else slice(None)
    return (_tal_terms(t[rows] @ v.T, pids[rows], pids, tau, margin)
            + _tal_terms(v[rows] @ t.T, pids[rows], pids, tau, margin))


def tal_loss(image_feats, text_feats, pids, tau: float = 0.015, margin: float = 0.1) -> torch.Tensor:
    """The triplet alignment loss summed over the batch, both directions."""
    return tal_rows(image_feats, text_feats, pids, tau, margin).sum()


def cosine(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """S[i, j] = cos(image i, text j)."""
    return F.normalize(image_feats.float(), dim=-1) @ F.normalize(text_feats.float(), dim=-1).T


@torch.no_grad()
def hard_negatives(sim: torch.Tensor, pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_neg, image_neg): for each i, the most similar text / image of another identity:
    text_neg[i] = argmax_{j: pid_j != pid_i} sim[i, j], image_neg[i] = argmax_{j: pid_j != pid_i} sim[j, i]."""
    other = pids[:, None] != pids[None, :]
    masked = sim.masked_fill(~other, float("-inf"))
    return masked.argmax(dim=1), masked.argmax(dim=0)


def cid_sum(head, image_feats, text_feats, pids, text_neg, image_neg, neg_class: int, rows: slice) -> torch.Tensor:
    """Sum over the 3 triplets of each pair in `rows` of the CID cross-entropy, averaged over both
    concatenation orders: (v_i, t_i, pid_i), (v_j', t_i, NEG), (v_i, t_j, NEG)."""
    idx = torch.arange(image_feats.shape[0], device=image_feats.device)[rows]
    v = torch.cat([image_feats[idx], image_feats[image_neg[idx]], image_feats[idx]])
    t = torch.cat([text_feats[idx], text_feats[idx], text_feats[text_neg[idx]]])
    labels = torch.cat([pids[idx], torch.full_like(idx, neg_class), torch.full_like(idx, neg_class)])
    dtype = next(head.parameters()).dtype  # the head may run in bf16; the loss is taken in fp32
    v, t = v.to(dtype), t.to(dtype)
    ce = (F.cross_entropy(head(v, t).float(), labels, reduction="sum")
          + F.cross_entropy(head(t, v).float(), labels, reduction="sum"))
    return ce / 2


def branch_losses(prefix: str, image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor, *,
                  tau: float, margin: float, cid_head=None, id_classifier=None, num_ids: int = 0) -> dict:
    """This rank's shares of TAL (sum), CID and ID (means over the global batch) for one branch."""
    rank, world = rank_and_world()
    n = image_feats.shape[0]
    V, T, P = gather_with_grad(image_feats.float()), gather_with_grad(text_feats.float()), gather(pids)
    mine = slice(rank * n, (rank + 1) * n)
    total = n * world
    out = {f"tal_{prefix}_loss": tal_rows(V, T, P, tau, margin, rows=mine).sum()}
    if cid_head is not None:
        text_neg, image_neg = hard_negatives(cosine(V, T).detach(), P)
        out[f"cid_{prefix}_loss"] = cid_sum(cid_head, V, T, P, text_neg, image_neg, num_ids, mine) / (3 * total)
    if id_classifier is not None:
        dtype = id_classifier.weight.dtype
        ce = (F.cross_entropy(id_classifier(image_feats.to(dtype)).float(), pids, reduction="sum")
              + F.cross_entropy(id_classifier(text_feats.to(dtype)).float(), pids, reduction="sum"))
        out[f"id_{prefix}_loss"] = ce / total
    return out


def total_loss(outputs: dict) -> torch.Tensor:
    """The training objective: the sum of every `*_loss` entry (the one place losses are summed)."""
    return sum(v for k, v in outputs.items() if k.endswith("_loss"))

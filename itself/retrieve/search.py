"""A saved index and the model that made it, answering text queries."""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from ..data import transforms as T
from ..model.export import load_exported
from .errors import RetrieveError
from .store import IndexDir
from .vectors import DEFAULT_CANDIDATES, DEFAULT_EF_SEARCH, VectorSearch, fused_scores, read_faiss


class Index:
    """`Index(dir).search(["a man in a grey coat"], top_k=10)`: ranked hits with exact fused scores.
    Safe to use from several threads (the model runs one call at a time)."""

    def __init__(self, index_dir: str, model_path: str | None = None):
        self.dir = IndexDir(index_dir)
        self.info = self.dir.info()
        self.model, self.cfg, _ = load_exported(model_path or self.info["model"])
        self._check_model()
        self.fusion_weight = self.info["fusion_weight"] if self.info["grab_dim"] else 1.0
        self.store = self.dir.embeddings(self.info)
        self.vectors = VectorSearch(read_faiss(self.dir.path / self.info["vectors"]), self.store, self.fusion_weight)
        self.tokenizer = T.Tokenizer(self.cfg.data.text_length)
        self.model_lock = threading.Lock()  # attention capture keeps per-call state on the model

    def _check_model(self) -> None:
        cfg, info = self.cfg, self.info
        dims = (self.model.backbone.embed_dim, 0 if cfg.model.global_only else cfg.model.grab_dim)
        if cfg.model.arch != info["arch"] or dims != (info["global_dim"], info["grab_dim"]):
            raise RetrieveError(
                f"model/index mismatch: the model is {cfg.model.arch} with embeddings {dims[0]} (global) / "
                f"{dims[1]} (GRAB), the index {self.dir.path} was built by {info['arch']} with {info['global_dim']} / "
                f"{info['grab_dim']}; rebuild the index with this model or pass the model that built it")

    def __len__(self) -> int:
        return len(self.store)

    @property
    def items(self) -> list[dict]:
        """Every gallery item {name, pid, locator} in row order (reads them all: small galleries)."""
        return self.store.items()

    def item(self, row: int) -> dict:
        return self.store.item(row)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """L2-normalised (global, GRAB or None) embeddings of texts."""
        tokens = torch.stack([self.tokenizer(t) for t in texts])
        with self.model_lock:
            g, l = self.model.encode_text(tokens)
        g = F.normalize(g, dim=-1).numpy()
        return g, (F.normalize(l, dim=-1).numpy() if l is not None and self.info["grab_dim"] else None)

    def scores(self, texts: list[str]) -> torch.Tensor:
        """Fused similarity [len(texts), gallery] of each text to every image, by brute force."""
        q_glob, q_grab = self.encode(texts)
        return torch.cat([fused_scores(q_glob, q_grab, g, l, self.fusion_weight) for _, g, l in self.store.blocks()],
                         dim=1)

    def search(self, texts: list[str], top_k: int = 10, ef_search: int = DEFAULT_EF_SEARCH,
               candidates: int = DEFAULT_CANDIDATES) -> list[list[dict]]:
        """Per text, the best top_k images: {rank, score, row, name, pid, locator}, best first."""
        q_glob, q_grab = self.encode(texts)
        found = self.vectors.search(q_glob, q_grab, top_k, ef_search, candidates)
        return [[{"rank": r + 1, "score": score, "row": row, **self.item(row)} for r, (row, score) in enumerate(hits)]
                for hits in found]

"""A saved index and the model that made it, answering text queries."""

from __future__ import annotations

import logging
import os
import stat
import threading

import numpy as np
import torch
import torch.nn.functional as F

from ..data import transforms as T
from ..errors import UserError
from ..model.export import load_exported
from ..safeio import file_sha256, printable, shown
from .errors import RetrieveError
from .gallery import read_image, stamp
from .store import IndexDir
from .vectors import (
    DEFAULT_CANDIDATES,
    DEFAULT_EF_SEARCH,
    IndexSpec,
    VectorSearch,
    fused_scores,
    read_faiss,
)

log = logging.getLogger(__name__)


def model_file(path: str | os.PathLike, what: str) -> str:
    """A model path as an absolute path to a regular file (never a FIFO or device that would hang
    the checksum); RetrieveError naming `what` otherwise."""
    path = os.path.abspath(path)
    target = os.path.join(path, "model.pt") if os.path.isdir(path) else path
    try:
        mode = os.stat(target).st_mode
    except OSError as e:
        raise RetrieveError(f"{what} {printable(target)}: {e.strerror.lower() if e.strerror else 'unreadable'}") from None
    if not stat.S_ISREG(mode):
        raise RetrieveError(f"{what} {printable(target)}: not a regular file")
    return target


def load_model(path: str, what: str):
    """load_exported, with any failure to read the file (truncated, not a model) as one error line."""
    try:
        return load_exported(path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: torch, zip and safetensors errors
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RetrieveError(f"{what} {path}: not a readable exported model ({first}); export it again "
                            "(itself/train.py writes model.pt)") from None


class Index:
    """`Index(dir).search(["a man in a grey coat"], top_k=10)`: ranked hits with exact fused scores.
    Safe to use from several threads (the model runs one call at a time).

    The model must be the one that built the index (same file checksum as index.json records;
    `model_path` None: the file index.json names): another model, even of the same shape, ranks
    the gallery's embeddings meaninglessly, so it is refused unless `allow_model_mismatch`."""

    def __init__(self, index_dir: str, model_path: str | None = None, allow_model_mismatch: bool = False):
        self.dir = IndexDir(index_dir)
        self._open()
        what = "--model" if model_path else f"the model {self.dir.info_file} names:"
        path = model_file(model_path or self.info["model"], what)
        if model_path is None:  # (a file the index names is not even loaded unless it is the right one)
            self._check_checksum(path, allow_model_mismatch)
        self.model, self.cfg, _ = load_model(path, what)
        self._check_model()
        if model_path is not None:
            self._check_checksum(path, allow_model_mismatch)
        self.tokenizer = T.Tokenizer(self.cfg.data.text_length)
        self.model_lock = threading.Lock()  # attention capture keeps per-call state on the model

    def _open(self) -> None:
        """index.json, the embeddings and the vector index. A writer that commits a new generation
        meanwhile removes the vector file just read about: then the new index.json is read again."""
        for attempt in range(3):
            self.info = self.dir.info()
            self.store = self.dir.embeddings(self.info)
            vectors = self.dir.vectors(self.info)
            if os.path.lexists(vectors) or attempt == 2:
                break
        spec = IndexSpec(**self.info["index"])
        self.vectors = VectorSearch(read_faiss(vectors, self.store, spec), self.store,
                                    self.info["fusion_weight"] if self.info["grab_dim"] else 1.0)
        self.fusion_weight = self.vectors.a

    def _check_checksum(self, path: str, allow: bool) -> None:
        if file_sha256(path) == self.info["model_sha256"]:
            return
        message = (f"model/index mismatch: {path} is not the model that built the index {self.dir.path} (its "
                   f"sha256 differs from the one index.json records): the gallery's embeddings come from "
                   f"{shown(self.info['model'])}, and another model's query embeddings rank them meaninglessly. "
                   "Pass the model that built the index, build an index with this model, or pass "
                   "--allow-model-mismatch to search anyway")
        if not allow:
            raise RetrieveError(message)
        log.warning("%s", message.replace(", or pass --allow-model-mismatch to search anyway", ": searching anyway"
                                          " (--allow-model-mismatch)"))

    def _check_model(self) -> None:
        cfg, info = self.cfg, self.info
        dims = (self.model.backbone.embed_dim, 0 if cfg.model.global_only else cfg.model.grab_dim)
        if cfg.model.arch != info["arch"] or dims != (info["global_dim"], info["grab_dim"]):
            raise RetrieveError(
                f"model/index mismatch: the model is {cfg.model.arch} with embeddings {dims[0]} (global) / "
                f"{dims[1]} (GRAB), the index {self.dir.path} was built by {shown(info['arch'])} with "
                f"{info['global_dim']} / {info['grab_dim']}; rebuild the index with this model or pass the model that "
                "built it")

    def __len__(self) -> int:
        return len(self.store)

    @property
    def items(self) -> list[dict]:
        """Every gallery item {name, pid, file | shard and key, sha256, bytes} in row order (reads
        them all: small galleries)."""
        return self.store.items()

    def item(self, row: int) -> dict:
        return self.store.item(row)

    def image(self, row: int) -> bytes:
        """The encoded image of gallery row `row`, read inside its gallery and checked against the
        digest recorded when it was indexed (GalleryChanged: another image is never shown)."""
        part, item = self.store.locate(row)
        return read_image(part.root, item, str(part.meta_file))

    def gallery_changes(self, most: int = 256) -> str | None:
        """None when the gallery files of the parts checked have the size and modification time they
        had when indexed (a cheap check: no image is read; every part of an index of up to `most`
        parts, an even sample of a larger one), else the first that changed, as text. (Every image
        shown is checked in full anyway: `image`.)"""
        parts = self.store.parts
        for part in (parts if len(parts) <= most else [parts[i] for i in np.linspace(0, len(parts) - 1, most).astype(int)]):
            meta = part.read_meta()
            if meta["stamp"] is not None and stamp(part.root, meta["items"]) != meta["stamp"]:
                first = meta["items"][0]
                return f"{part.root}: {shown(first.get('shard') or first.get('file'))} and the other images of part {part.meta_file.name}"
        return None

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
        """Per text, the best top_k images: {rank, score, row, name, pid, file | shard and key,
        sha256, bytes}, best first."""
        q_glob, q_grab = self.encode(texts)
        found = self.vectors.search(q_glob, q_grab, top_k, ef_search, candidates)
        return [[{"rank": r + 1, "score": score, "row": row, **self.item(row)} for r, (row, score) in enumerate(hits)]
                for hits in found]

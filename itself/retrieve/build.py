"""Embedding a gallery into an index, on one rank or many, resumably.

    python -m itself.retrieve index --model M --gallery G --out DIR               a world of one
    torchrun --nproc_per_node 4 -m itself.retrieve index --model M ...             one rank per process
    deepspeed --num_gpus 4 itself/retrieve/__main__.py index --model M ...
    python launch/index.py --nodes 2 [--profile P] -- index --model M ...          a SLURM job

Rank 0 plans the batch (the gallery's units, and which of them a previous attempt finished) and
tells the other ranks; the pending units are dealt round-robin, every rank embeds its own on its
device and writes each as one part (atomically). After a barrier, rank 0 merges the parts into
the vector index. A failed or killed build keeps its finished parts: the same command again, with
any number of ranks, embeds only the rest. `add` runs the same way and appends a new batch.

Ranks talk over torch.distributed (gloo) only to share the plan and to wait for each other, so a
rank that dies makes the others stop at the barrier instead of waiting forever.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shards.locking import FolderLock, LockBusy, LockUnavailable

from ..data import transforms as T
from ..dist import Process, start
from ..layout import batched
from ..safeio import file_sha256, shown
from .errors import RetrieveError
from .gallery import (
    DEFAULT_PART_SIZE,
    IMAGE_SUFFIXES,
    Gallery,
    Unit,
    is_remote,
    plan_digest,
    plan_gallery,
    stamp,
    unit_items,
)
from .search import load_model, model_file
from .store import FORMAT, LOCK_FILE, EmbeddingStore, IndexDir
from .vectors import (
    IndexSpec,
    add_to_faiss,
    build_faiss,
    import_faiss,
    read_faiss,
    write_faiss,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildRequest:
    """What `index` (add=False) or `add` (add=True) was asked to do."""

    gallery: str
    out: str
    model: str | None = None  # add: default the index's model
    split: str = "test"
    add: bool = False
    spec: IndexSpec | None = None  # index: None keeps an existing index's kind (flat for a new one)
    device: str = "auto"
    batch_size: int = 64
    part_size: int = DEFAULT_PART_SIZE
    workers: int = 0  # threads decoding images (0: in the embedding loop)
    progress: bool = True
    wait_timeout_min: float = 60.0  # how long a rank that finished waits for the slowest one


@dataclasses.dataclass
class Job:
    """The plan rank 0 shares: which batch, its units, which of them still need embedding."""

    batch: int
    units: list[Unit]
    pending: list[int]
    model: str
    plan: dict
    known: frozenset = frozenset()  # add: sha256 of the images already in the index (copies are skipped)
    already: int = 0  # add: images left out because their file or shard is already indexed
    refused: int = 0  # gallery files the builder's rules leave out (links leaving it, FIFOs, > 64 MiB)


def run_build(req: BuildRequest) -> dict | None:
    """Index (or add) a gallery with every rank of this job; the index info on rank 0, None elsewhere.
    Rank 0 holds the index folder's lock from the plan to the commit: one writer per folder."""
    if req.device.startswith("cuda") and not torch.cuda.is_available():
        raise RetrieveError("--device cuda: no CUDA device is visible; use --device cpu")
    proc = start("cuda" if req.device.startswith("cuda") else req.device, req.wait_timeout_min * 60)
    lock = FolderLock(Path(req.out) / LOCK_FILE) if proc.is_main else None
    created = not os.path.lexists(req.out)
    try:
        job = proc.decide(lambda: plan_job(req, lock))
        try:
            embed_pending(req, job, proc.rank, proc.world, proc.device)
        except BaseException:
            print(f"rank {proc.rank}: embedding stopped; the finished parts are kept in {req.out}: run the same "
                  "command again to embed only the rest", file=sys.stderr, flush=True)
            raise
        _wait_for_the_others(proc, req)
        return merge(req, job) if proc.is_main else None
    finally:
        if lock is not None:
            lock.release()
            if created and os.path.isdir(req.out) and not os.listdir(req.out):
                os.rmdir(req.out)  # (refused before anything was written: leave no empty folder)
        proc.close()


def _wait_for_the_others(proc: Process, req: BuildRequest) -> None:
    try:
        proc.barrier()
    except Exception as e:  # a dead rank (connection lost) or one slower than the timeout
        raise RuntimeError(
            f"rank {proc.rank}: another rank failed or did not finish within {req.wait_timeout_min:g} min "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the finished parts are kept "
            f"in {req.out}: run the same command again to embed only the rest") from None


# ----------------------------------------------------------------------------------- plan


def plan_job(req: BuildRequest, lock: FolderLock) -> Job:
    """Rank 0: the batch this run fills, checked against what the folder already holds."""
    if req.spec:
        req.spec.check()
    import_faiss()  # (missing FAISS is found before the embedding, not after it)
    gallery = plan_gallery(req.gallery, req.split, req.part_size)
    out = IndexDir(req.out)
    _lock(out, gallery, lock)
    info = out.info() if out.exists() or req.add else None  # (add: an error when there is no index)
    what = "--model" if req.model else f"the model {out.info_file} names:"
    model = model_file(req.model or info["model"], what)
    sha = file_sha256(model)
    if info is not None and info["model_sha256"] != sha:
        raise RetrieveError(f"{req.out} was built with another model ({shown(info['model'])}); its images and new ones "
                            "must come from the same model: pass that model, or build a new index with this one")
    units, known, already = gallery.units, frozenset(), 0
    if req.add:
        units, known, already = _not_yet_indexed(out, info, gallery, req)
    if not units:
        raise _nothing_readable(req)
    digest = plan_digest(units)
    number = len(info["batches"]) if req.add else 0
    if not req.add and info is not None and info["batches"][0]["digest"] != digest:
        raise RetrieveError(f"{req.out} already holds an index of another gallery ({shown(info['gallery'])}); use "
                            "`add` to add images to it, or choose another --out")
    for name, why in gallery.refused[:5]:
        log.warning("left out of the gallery: %s: %s (as the dataset builder would)", shown(name), why)
    if len(gallery.refused) > 5:
        log.warning("left out of the gallery: %d more files (links leaving it, non-regular or too large files)",
                    len(gallery.refused) - 5)
    batch = out.batch(number)
    plan = {"gallery": _absolute(req.gallery), "root": gallery.root, "split": req.split, "model": model,
            "model_sha256": sha, "digest": digest, "units": len(units)}
    existing = batch.read_plan()
    if existing is None:
        batch.write_plan(plan)
    elif (existing["digest"], existing["model_sha256"]) != (digest, sha):
        raise RetrieveError(f"{batch.dir} holds an unfinished {'add' if req.add else 'build'} of another gallery, "
                            f"model or --part-size ({shown(existing['gallery'])}): run that command again to finish "
                            f"it, or delete {batch.dir}")
    pending = [u for u in range(len(units)) if not batch.part(u).done()]
    if 0 < len(pending) < len(units):
        print(f"resuming: {len(units) - len(pending)} of {len(units)} parts already embedded", flush=True)
    return Job(number, units, pending, model, plan, known, already, len(gallery.refused))


def _lock(out: IndexDir, gallery: Gallery, lock: FolderLock) -> None:
    """Make the index folder (not inside the gallery, nor holding it) and take its lock."""
    if not is_remote(gallery.root):
        out.check_apart(gallery.root, "the gallery")
    if os.path.lexists(out.path) and not out.path.is_dir():
        raise RetrieveError(f"--out {out.path}: a file, not a folder")
    out.path.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(f"the index folder {out.path}", "wait for it to finish, or use another --out")
    except (LockBusy, LockUnavailable) as e:
        raise RetrieveError(str(e)) from None


def _not_yet_indexed(out: IndexDir, info: dict, gallery: Gallery, req: BuildRequest) -> tuple[list[Unit], frozenset, int]:
    """`add`: the gallery's units without the files and shards already in the index (the folder
    that gained two files embeds two), the digests of every indexed image (a copy under another
    name is skipped while embedding) and how many images were left out."""
    places: dict[tuple, int] = {}  # (root, file or shard) -> the batch that indexed it
    per_shard: dict[tuple, int] = {}
    digests = set()
    for b in info["batches"]:
        for part in out.batch(b["number"]).parts(len(b["part_images"]), b["root"]):
            for item in part.read_meta()["items"]:
                place = (b["root"], item.get("file") or item.get("shard"))
                places.setdefault(place, b["number"])
                per_shard[place] = per_shard.get(place, 0) + 1
                digests.add(item["sha256"])
    units, files, already, first = [], [], 0, None
    for unit in gallery.units:
        if unit.shard is not None:
            if (unit.root, unit.shard) in places:
                already += per_shard[(unit.root, unit.shard)]
                first = first if first is not None else places[(unit.root, unit.shard)]
            else:
                units.append(unit)
            continue
        for f in unit.files:
            if (unit.root, f) in places:
                already += 1
                first = first if first is not None else places[(unit.root, f)]
            else:
                files.append(f)
    units += [Unit(gallery.root, files=tuple(files[i:i + req.part_size]), images=len(files[i:i + req.part_size]))
              for i in range(0, len(files), req.part_size)]
    if not units and first is not None:
        raise RetrieveError(f"{req.gallery} (split {req.split}) is already in the index (batch {first}): all its "
                            f"{already} images are; nothing to add")
    return units, frozenset(digests), already


def _absolute(gallery: str) -> str:
    """A local folder or file as an absolute path (the index is used from other folders); a pattern as given."""
    return str(Path(gallery).resolve()) if Path(gallery).exists() else gallery


def _nothing_readable(req: BuildRequest) -> RetrieveError:
    return RetrieveError(f"the gallery {req.gallery} holds no readable image (split {req.split!r} for datasets; "
                         f"{', '.join(IMAGE_SUFFIXES)} files for folders)")


# ----------------------------------------------------------------------------------- embed


def embed_pending(req: BuildRequest, job: Job, rank: int, world: int, device: torch.device) -> None:
    """Embed this rank's share of the pending units, one part file per unit."""
    mine = job.pending[rank::world]
    if not mine:
        return
    from tqdm import tqdm

    model, cfg, _ = load_model(job.model, "--model")
    model.to(device)
    size = tuple(cfg.data.image_size)
    dims = (model.backbone.embed_dim, 0 if cfg.model.global_only else cfg.model.grab_dim)
    counts = [job.units[u].images for u in mine]
    total = sum(counts) if None not in counts else None
    batch = IndexDir(req.out).batch(job.batch)
    pool = ThreadPoolExecutor(req.workers) if req.workers > 0 else None
    images = 0
    with tqdm(total=total, desc=f"embedding (rank 0 of {world})" if world > 1 else "embedding", unit="img",
              disable=not (req.progress and rank == 0)) as bar:
        for u in mine:
            unit = job.units[u]
            glob, grab, items, skipped, duplicates = embed_unit(model, unit, size, dims, device, req.batch_size, pool,
                                                                bar, job.known)
            batch.part(u).write(glob, grab, items, skipped, duplicates, stamp(unit.root, items))
            images += len(items)
    if pool:
        pool.shutdown()
    if world > 1:
        print(f"rank {rank}: embedded {images} images in {len(mine)} parts", file=sys.stderr, flush=True)


def embed_unit(model, unit: Unit, size, dims, device, batch_size: int, pool, bar, known: frozenset = frozenset()):
    """(global [n, E], GRAB [n, G] or None, items, unreadable count, copies skipped) of one unit,
    L2-normalised; images whose sha256 is in `known` (already indexed) are skipped. Batches never
    cross units, so every part is the same whichever rank embeds it."""
    globs, grabs, items, skipped = [], [], [], 0
    duplicates = 0
    for chunk in batched(unit_items(unit), batch_size):
        bar.update(len(chunk))
        digests = [hashlib.sha256(it.data).hexdigest() for it in chunk]
        fresh = [(it, d) for it, d in zip(chunk, digests) if d not in known]
        duplicates += len(chunk) - len(fresh)
        images = (list(pool.map(lambda f: _prepare(f[0].data, size), fresh)) if pool
                  else [_prepare(it.data, size) for it, _ in fresh])
        keep = [(it, d, x) for (it, d), x in zip(fresh, images) if x is not None]
        skipped += len(fresh) - len(keep)
        if keep:
            g, l = model.encode_image(torch.stack([x for _, _, x in keep]).to(device))
            globs.append(F.normalize(g.float(), dim=-1).cpu().numpy())
            if l is not None:
                grabs.append(F.normalize(l.float(), dim=-1).cpu().numpy())
            items += [{"name": it.name, "pid": it.pid, **it.where, "sha256": d, "bytes": len(it.data)}
                      for it, d, _ in keep]
    glob = np.concatenate(globs) if globs else np.zeros((0, dims[0]), np.float32)
    grab = (np.concatenate(grabs) if grabs else np.zeros((0, dims[1]), np.float32)) if dims[1] else None
    return glob, grab, items, skipped, duplicates


def _prepare(data: bytes, size):
    try:
        return T.eval_image(T.decode(data, size), size)
    except Exception:  # noqa: BLE001 - an undecodable image is counted and skipped, not fatal
        return None


# ----------------------------------------------------------------------------------- merge


def merge(req: BuildRequest, job: Job) -> dict:
    """Rank 0, every part written: fold the batch into the vector index and commit index.json."""
    out = IndexDir(req.out)
    batch = out.batch(job.batch)
    root = job.plan["root"]
    metas = [p.read_meta() for p in batch.parts(len(job.units), root)]
    counts = [m["images"] for m in metas]
    if not sum(counts):
        shutil.rmtree(batch.dir)  # (nothing in it worth resuming: the next attempt plans anew)
        copies = sum(m["duplicates"] for m in metas)
        if copies:
            raise RetrieveError(f"{req.gallery}: nothing to add: its {copies + job.already} images are already in the "
                                "index (the new files are copies of indexed images)")
        raise _nothing_readable(req)
    entry = {"number": job.batch, "gallery": job.plan["gallery"], "root": root, "split": req.split,
             "digest": job.plan["digest"], "part_images": counts, "images": sum(counts),
             "skipped": sum(m["skipped"] for m in metas), "duplicates": sum(m["duplicates"] for m in metas),
             "already": job.already, "refused": job.refused}
    if req.add:
        info = out.info()
        spec = IndexSpec(**info["index"])
        index = read_faiss(out.vectors(info), out.embeddings(info), spec)
        new = out.batch_parts(batch, counts, root, (info["global_dim"], info["grab_dim"]))
        add_to_faiss(index, EmbeddingStore(new, counts).blocks(), info["fusion_weight"] if info["grab_dim"] else 1.0)
        info["batches"].append(entry)
    else:
        info = out.info() if out.exists() else new_info(job)
        spec = req.spec or IndexSpec(**info.get("index", {}))
        if out.exists() and dataclasses.asdict(spec) == info["index"]:
            return {**info, "unchanged": True}
        info["index"] = dataclasses.asdict(spec)
        info["batches"] = info.get("batches") or [entry]
        index = build_faiss(spec, out.embeddings(info), info["fusion_weight"] if info["grab_dim"] else 1.0)
    return commit(out, info, index)


def new_info(job: Job) -> dict:
    model, cfg, a = load_model(job.model, "--model")
    return {"format": FORMAT, "model": job.model, "model_sha256": job.plan["model_sha256"], "arch": cfg.model.arch,
            "image_size": list(cfg.data.image_size), "global_dim": model.backbone.embed_dim,
            "grab_dim": 0 if cfg.model.global_only else cfg.model.grab_dim, "fusion_weight": a,
            "gallery": job.plan["gallery"], "split": job.plan["split"]}


def commit(out: IndexDir, info: dict, index) -> dict:
    """Write the vector index under a new name, then index.json naming it (the commit point), then
    drop the previous vector file: a crash at any moment leaves a consistent index. The previous
    name was checked when index.json was read (this index's pattern, inside the folder): a changed
    index.json cannot make this delete anything else."""
    old = out.vectors(info) if info.get("vectors") else None
    info["generation"] = info.get("generation", 0) + 1
    write_faiss(index, out.vectors_file(info["generation"]))
    info["vectors"] = out.vectors_file(info["generation"]).name
    info["images"] = sum(b["images"] for b in info["batches"])
    info["skipped"] = sum(b["skipped"] for b in info["batches"])
    out.write_info(info)
    if old is not None and old.name != info["vectors"]:
        old.unlink(missing_ok=True)
    for stale in out.path.glob(".vectors-*.faiss.*.partial"):  # (left by a killed writer: ours, by their name)
        stale.unlink(missing_ok=True)
    return info

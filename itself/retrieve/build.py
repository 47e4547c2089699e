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
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import transforms as T
from ..dist import WorldInfo, ensure_process_env, world_info_from_env
from ..engine import resolve_device, share_cpu_threads
from ..errors import UserError
from ..model.export import load_exported
from .errors import RetrieveError
from .gallery import DEFAULT_PART_SIZE, IMAGE_SUFFIXES, Unit, plan_digest, plan_units, unit_items
from .store import FORMAT, EmbeddingStore, IndexDir
from .vectors import IndexSpec, add_to_faiss, build_faiss, import_faiss, read_faiss, write_faiss


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


def run_build(req: BuildRequest) -> dict | None:
    """Index (or add) a gallery with every rank of this job; the index info on rank 0, None elsewhere."""
    group = Group(world_info_from_env(), req.wait_timeout_min)
    try:
        job = group.share(lambda: plan_job(req))
        device = _device(req.device, group.where)
        try:
            embed_pending(req, job, group.rank, group.world, device)
        except BaseException:
            print(f"rank {group.rank}: embedding stopped; the finished parts are kept in {req.out}: run the same "
                  "command again to embed only the rest", file=sys.stderr, flush=True)
            raise
        group.barrier(req.out)
        return merge(req, job) if group.rank == 0 else None
    finally:
        group.close()


# ----------------------------------------------------------------------------------- ranks


class Group:
    """The ranks of an index job: a world of one needs nothing, more talk over gloo."""

    def __init__(self, where: WorldInfo, wait_timeout_min: float):
        self.where, self.rank, self.world = where, where.rank, where.world_size
        self.timeout_min = wait_timeout_min
        if self.world > 1:
            ensure_process_env()
            torch.distributed.init_process_group("gloo", timeout=timedelta(minutes=wait_timeout_min))

    def share(self, make):
        """make() run on rank 0, its value (or its error) on every rank."""
        box = [None]
        if self.rank == 0:
            try:
                box = [("ok", make())]
            except UserError as e:
                box = [("error", str(e))]
            except Exception as e:
                if self.world > 1:  # tell the others before failing here
                    torch.distributed.broadcast_object_list([("failed", f"{type(e).__name__}: {e}")], src=0)
                raise
        if self.world > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise RetrieveError(value)
        if status == "failed":
            raise RuntimeError(f"rank 0 failed while planning the index: {value}")
        return value

    def barrier(self, out: str) -> None:
        if self.world == 1:
            return
        try:
            torch.distributed.barrier()
        except Exception as e:  # a dead rank (connection lost) or one slower than the timeout
            raise RuntimeError(
                f"rank {self.rank}: another rank failed or did not finish within {self.timeout_min:g} min "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the finished parts are kept "
                f"in {out}: run the same command again to embed only the rest") from None

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _device(name: str, where: WorldInfo) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RetrieveError("--device cuda: no CUDA device is visible; use --device cpu")
    device = resolve_device("cuda" if name.startswith("cuda") else name, where.local_rank)
    if device.type == "cpu":
        share_cpu_threads(where.world_size)
    return device


# ----------------------------------------------------------------------------------- plan


def plan_job(req: BuildRequest) -> Job:
    """Rank 0: the batch this run fills, checked against what the folder already holds."""
    if req.spec:
        req.spec.check()
    import_faiss()  # (missing FAISS is found before the embedding, not after it)
    out = IndexDir(req.out)
    info = out.info() if out.exists() or req.add else None  # (add: an error when there is no index)
    model = str(Path(req.model or info["model"]).resolve())
    if not Path(model).is_file():
        raise RetrieveError(f"--model {model}: no such file")
    sha = file_sha256(model)
    units = plan_units(req.gallery, req.split, req.part_size)
    if not units:
        raise _nothing_readable(req)
    digest = plan_digest(units)
    if info is not None and info["model_sha256"] != sha:
        raise RetrieveError(f"{req.out} was built with another model ({info['model']}); its images and new ones "
                            "must come from the same model: pass that model, or build a new index with this one")
    number = 0
    if req.add:
        done = [b for b in info["batches"] if b["digest"] == digest]
        if done:
            raise RetrieveError(f"{req.gallery} (split {req.split}) is already in the index (batch {done[0]['number']})")
        number = len(info["batches"])
    elif info is not None and info["batches"][0]["digest"] != digest:
        raise RetrieveError(f"{req.out} already holds an index of another gallery ({info['gallery']}); use `add` "
                            "to add images to it, or choose another --out")
    batch = out.batch(number)
    plan = {"gallery": _absolute(req.gallery), "split": req.split, "model": model, "model_sha256": sha, "digest": digest,
            "units": len(units)}
    existing = batch.read_plan()
    if existing is None:
        batch.write_plan(plan)
    elif (existing["digest"], existing["model_sha256"]) != (digest, sha):
        raise RetrieveError(f"{batch.dir} holds an unfinished {'add' if req.add else 'build'} of another gallery, "
                            f"model or --part-size ({existing['gallery']}): run that command again to finish it, "
                            f"or delete {batch.dir}")
    pending = [u for u in range(len(units)) if not batch.part(u).done()]
    if 0 < len(pending) < len(units):
        print(f"resuming: {len(units) - len(pending)} of {len(units)} parts already embedded", flush=True)
    return Job(number, units, pending, model, plan)


def _absolute(gallery: str) -> str:
    """A local folder or file as an absolute path (the index is used from other folders); a pattern as given."""
    return str(Path(gallery).resolve()) if Path(gallery).exists() else gallery


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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

    model, cfg, _ = load_exported(job.model)
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
            glob, grab, items, skipped = embed_unit(model, job.units[u], size, dims, device, req.batch_size, pool, bar)
            batch.part(u).write(glob, grab, items, skipped)
            images += len(items)
    if pool:
        pool.shutdown()
    if world > 1:
        print(f"rank {rank}: embedded {images} images in {len(mine)} parts", file=sys.stderr, flush=True)


def embed_unit(model, unit: Unit, size, dims, device, batch_size: int, pool, bar):
    """(global [n, E], GRAB [n, G] or None, items, unreadable count) of one unit, L2-normalised.
    Batches never cross units, so every part is the same whichever rank embeds it."""
    globs, grabs, items, skipped = [], [], [], 0
    for chunk in _chunks(unit_items(unit), batch_size):
        images = list(pool.map(lambda it: _prepare(it.data, size), chunk)) if pool else [_prepare(it.data, size) for it in chunk]
        keep = [(it, x) for it, x in zip(chunk, images) if x is not None]
        skipped += len(chunk) - len(keep)
        if keep:
            g, l = model.encode_image(torch.stack([x for _, x in keep]).to(device))
            globs.append(F.normalize(g.float(), dim=-1).cpu().numpy())
            if l is not None:
                grabs.append(F.normalize(l.float(), dim=-1).cpu().numpy())
            items += [{"name": it.name, "pid": it.pid, "locator": it.locator} for it, _ in keep]
        bar.update(len(chunk))
    glob = np.concatenate(globs) if globs else np.zeros((0, dims[0]), np.float32)
    grab = (np.concatenate(grabs) if grabs else np.zeros((0, dims[1]), np.float32)) if dims[1] else None
    return glob, grab, items, skipped


def _prepare(data: bytes, size):
    try:
        return T.eval_image(T.decode(data, size), size)
    except Exception:  # noqa: BLE001 - an undecodable image is counted and skipped, not fatal
        return None


def _chunks(iterable, n: int):
    chunk = []
    for x in iterable:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------- merge


def merge(req: BuildRequest, job: Job) -> dict:
    """Rank 0, every part written: fold the batch into the vector index and commit index.json."""
    out = IndexDir(req.out)
    batch = out.batch(job.batch)
    metas = [p.read_meta() for p in batch.parts()]
    counts = [m["images"] for m in metas]
    if not sum(counts):
        raise _nothing_readable(req)
    entry = {"number": job.batch, "gallery": job.plan["gallery"], "split": req.split, "digest": job.plan["digest"],
             "part_images": counts, "images": sum(counts), "skipped": sum(m["skipped"] for m in metas)}
    if req.add:
        info = out.info()
        index = read_faiss(out.path / info["vectors"])
        add_to_faiss(index, EmbeddingStore(batch.parts(), counts).blocks(), info["fusion_weight"])
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
    model, cfg, a = load_exported(job.model)
    return {"format": FORMAT, "model": job.model, "model_sha256": job.plan["model_sha256"], "arch": cfg.model.arch,
            "image_size": list(cfg.data.image_size), "global_dim": model.backbone.embed_dim,
            "grab_dim": 0 if cfg.model.global_only else cfg.model.grab_dim, "fusion_weight": a,
            "gallery": job.plan["gallery"], "split": job.plan["split"]}


def commit(out: IndexDir, info: dict, index) -> dict:
    """Write the vector index under a new name, then index.json naming it (the commit point), then
    drop the previous vector file: a crash at any moment leaves a consistent index."""
    old = info.get("vectors")
    info["generation"] = info.get("generation", 0) + 1
    write_faiss(index, out.vectors_file(info["generation"]))
    info["vectors"] = out.vectors_file(info["generation"]).name
    info["images"] = sum(b["images"] for b in info["batches"])
    info["skipped"] = sum(b["skipped"] for b in info["batches"])
    out.write_info(info)
    if old and old != info["vectors"]:
        (out.path / old).unlink(missing_ok=True)
    return info

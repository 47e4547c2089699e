"""Person search for users: index a gallery, query it with text, and see why.

    python -m itself.retrieve index  --model model.pt --gallery SHARDS_OR_IMAGE_FOLDER --out INDEX_DIR
    python -m itself.retrieve query  --index INDEX_DIR --text "a man in a grey coat" [--top-k 10] [--json]
    python -m itself.retrieve report --index INDEX_DIR (--queries FILE | --sample-queries N) --out REPORT_DIR
                                     [--run RUN_DIR] [--top-k 5]

The gallery is a built dataset folder (its `--split`, default test), a shard pattern, or a plain
folder of images. Scores are the fused similarity a * S_global + (1 - a) * S_grab with the fusion
weight chosen on val during training. The report is a self-contained HTML folder: ranked
thumbnails per query (correct identity outlined green, wrong red, when identities are known), the
patches MARS kept overlaid on each shown image, and the run's training curves.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from shards import schema

from .model.export import load_exported
from .rundir import RunDir
from .data import transforms as T
from .data.catalog import image_member, iter_shard

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
INDEX_FILE = "index.json"


class RetrieveError(RuntimeError):
    """Bad input to the retrieval tools; the message says what and how to fix it."""


# ----------------------------------------------------------------------------------- gallery


def gallery_items(source: str, split: str = "test"):
    """(name, encoded bytes, pid or None, locator) for every image of a dataset split, shard list or folder.
    The locator ("<shard>#<key>" or a file path) finds the image again for the report."""
    path = Path(source)
    if path.is_dir() and (path / schema.DATASET_FILE).exists():
        info = json.loads((path / schema.DATASET_FILE).read_text())
        urls = [str(path / split / s["name"]) for s in info["splits"][split]["shards"]]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            yield str(f.relative_to(path)), f.read_bytes(), None, str(f.resolve())
        return
    else:
        from webdataset.shardlists import expand_urls

        urls = expand_urls(source)
    for url in urls:
        for sample in iter_shard(url):
            meta = json.loads(sample[schema.META_EXT])
            yield meta.get("source", sample["__key__"]), image_member(sample), meta.get("pid"), f"{url}#{sample['__key__']}"


def read_image(locator: str) -> bytes:
    if "#" in locator and not os.path.exists(locator):
        url, key = locator.rsplit("#", 1)
        for sample in iter_shard(url):
            if sample["__key__"] == key:
                return image_member(sample)
        raise RetrieveError(f"image {key} not found in {url}")
    return Path(locator).read_bytes()


# ----------------------------------------------------------------------------------- index


def build_index(model_path: str, gallery: str, out: str, split: str = "test", batch_size: int = 64,
                progress: bool = True) -> dict:
    from tqdm import tqdm

    model, cfg, a = load_exported(model_path)
    size = cfg.data.image_size
    names, pids, locators, glob, grab, batch = [], [], [], [], [], []

    def flush():
        if batch:
            g, l = model.encode_image(torch.stack(batch))
            glob.append(g)
            grab.append(l)
            batch.clear()

    skipped = 0
    for name, data, pid, locator in tqdm(gallery_items(gallery, split), desc="indexing", unit="img", disable=not progress):
        try:
            batch.append(T.eval_image(T.decode(data, size), size))
        except Exception:  # noqa: BLE001 - an undecodable image is reported, not fatal
            skipped += 1
            continue
        names.append(name)
        pids.append(pid)
        locators.append(locator)
        if len(batch) == batch_size:
            flush()
    flush()
    if not names:
        raise RetrieveError(f"the gallery {gallery} holds no readable image (split {split!r} for datasets; "
                            f"{', '.join(IMAGE_SUFFIXES)} files for folders)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "global.npy", F.normalize(torch.cat(glob), dim=-1).numpy())
    has_grab = grab[0] is not None
    if has_grab:
        np.save(out / "grab.npy", F.normalize(torch.cat(grab), dim=-1).numpy())
    with open(out / "items.jsonl", "w") as f:
        for n, p, loc in zip(names, pids, locators):
            f.write(json.dumps({"name": n, "pid": p, "locator": loc}) + "\n")
    info = {"model": str(Path(model_path).resolve()), "arch": cfg.model.arch, "image_size": list(size),
            "global_dim": int(glob[0].shape[1]), "grab_dim": int(grab[0].shape[1]) if has_grab else 0,
            "fusion_weight": a, "gallery": gallery, "split": split, "images": len(names), "skipped": skipped}
    (out / INDEX_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


class Index:
    """A saved index and the model that made it, ready to answer text queries."""

    def __init__(self, index_dir: str, model_path: str | None = None):
        self.dir = Path(index_dir)
        if not (self.dir / INDEX_FILE).exists():
            raise RetrieveError(f"{self.dir} is not an index (no {INDEX_FILE}); build one with `index`")
        self.info = json.loads((self.dir / INDEX_FILE).read_text())
        self.model, self.cfg, _ = load_exported(model_path or self.info["model"])
        self._check_model()
        self.glob = torch.from_numpy(np.load(self.dir / "global.npy"))
        self.grab = torch.from_numpy(np.load(self.dir / "grab.npy")) if self.info["grab_dim"] else None
        self.items = [json.loads(line) for line in (self.dir / "items.jsonl").read_text().splitlines()]
        self.fusion_weight = self.info["fusion_weight"] if self.grab is not None else 1.0

    def _check_model(self) -> None:
        cfg, info = self.cfg, self.info
        dims = (self.model.backbone.embed_dim, 0 if cfg.model.global_only else cfg.model.grab_dim)
        if cfg.model.arch != info["arch"] or dims != (info["global_dim"], info["grab_dim"]):
            raise RetrieveError(
                f"model/index mismatch: the model is {cfg.model.arch} with embeddings {dims[0]} (global) / "
                f"{dims[1]} (GRAB), the index {self.dir} was built by {info['arch']} with {info['global_dim']} / "
                f"{info['grab_dim']}; rebuild the index with this model or pass the model that built it")

    @torch.no_grad()
    def scores(self, texts: list[str]) -> torch.Tensor:
        """Fused similarity [len(texts), gallery] of each text to every gallery image."""
        tok = T.Tokenizer(self.cfg.data.text_length)
        g, l = self.model.encode_text(torch.stack([tok(t) for t in texts]))
        sim = F.normalize(g, dim=-1) @ self.glob.T
        if self.grab is not None:
            a = self.fusion_weight
            sim = a * sim + (1 - a) * (F.normalize(l, dim=-1) @ self.grab.T)
        return sim

    def search(self, texts: list[str], top_k: int = 10) -> list[list[dict]]:
        sim = self.scores(texts)
        values, idx = sim.topk(min(top_k, sim.shape[1]), dim=1)
        return [[{"rank": r + 1, "score": float(v), **self.items[i]} for r, (v, i) in enumerate(zip(vs.tolist(), ix.tolist()))]
                for vs, ix in zip(values, idx)]


# ----------------------------------------------------------------------------------- report


def overlay(model, data: bytes, size: tuple[int, int], scale: int = 2) -> Image.Image:
    """The image at the model's input size (x scale) with the patches MARS kept outlined and tinted."""
    img = T.decode(data, size)
    x = T.eval_image(img, size)
    _, keep = model.patch_selection(x[None])
    gh, gw = model.backbone.clip.visual.grid_size
    h, w = size
    ph, pw = h // gh * scale, w // gw * scale
    base = Image.fromarray((T.resize(img, size).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).resize((w * scale, h * scale))
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for i in keep[0].tolist():
        r, c = divmod(i, gw)
        draw.rectangle([c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1], fill=(255, 200, 0, 70), outline=(255, 140, 0, 200))
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def training_curves(run_dir: Path, out: Path) -> list[str]:
    """loss.png and val.png from a run's metrics.jsonl; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = RunDir(run_dir)
    train = run.records("train")
    evals = run.evals("val")
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(6, 3.2), constrained_layout=True)
        ax.plot([r["step"] for r in train], [r["loss"] for r in train])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        fig.savefig(out / "loss.png", dpi=90)
        plt.close(fig)
        written.append("loss.png")
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.2), constrained_layout=True)
        epochs = [r.epoch + 1 for r in evals]
        for key in ("R1", "mAP"):
            ax.plot(epochs, [r.fused[key] for r in evals], marker="o", label=f"val {key} (fused)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.legend()
        fig.savefig(out / "val.png", dpi=90)
        plt.close(fig)
        written.append("val.png")
    return written


IMAGE_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  const el = document.getElementById('image-check');
  el.textContent = `images: ${imgs.length} loaded: ${imgs.length - broken.length} broken: ${broken.length}`;
  el.dataset.broken = broken.length;
});
</script>"""


def write_report(index: Index, queries: list[dict], out: str, top_k: int = 5, run_dir: str | None = None) -> Path:
    """Write the HTML report folder; returns its index.html."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    size = tuple(index.cfg.data.image_size)
    results = index.search([q["text"] for q in queries], top_k)
    body = [f"<h1>Person search report</h1><p>Gallery: {html.escape(str(index.info['gallery']))} "
            f"({index.info['images']} images); fused score a={index.fusion_weight:g}. Highlighted patches: the "
            f"tokens MARS kept for GRAB. Outline: green = same identity as the query, red = another.</p>",
            '<p id="image-check">images: not checked</p>']
    cache: dict[str, str] = {}
    for qi, (q, hits) in enumerate(zip(queries, results)):
        body.append(f"<h2>Query {qi + 1}</h2><p class=q>{html.escape(q['text'])}"
                    + (f" <span class=pid>(identity {q['pid']})</span>" if q.get("pid") is not None else "") + "</p><div class=row>")
        for hit in hits:
            if hit["locator"] not in cache:
                name = f"img/g{len(cache):05d}.png"
                overlay(index.model, read_image(hit["locator"]), size).save(out / name)
                cache[hit["locator"]] = name
            known = q.get("pid") is not None and hit["pid"] is not None
            cls = ("hit" if hit["pid"] == q["pid"] else "miss") if known else "unknown"
            body.append(f'<figure class="{cls}"><img src="{cache[hit["locator"]]}" alt="rank {hit["rank"]}">'
                        f'<figcaption>#{hit["rank"]} {hit["score"]:.3f}<br>{html.escape(str(hit["name"]))}</figcaption></figure>')
        body.append("</div>")
    if run_dir:
        curves = training_curves(Path(run_dir), out)
        body.append("<h2>Training</h2>" + "".join(f'<img class=curve src="{c}" alt="{c}">' for c in curves))
    style = ("body{font-family:sans-serif;margin:20px} .row{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0;"
             "padding:3px;border:4px solid #ccc;font-size:11px;text-align:center} figure.hit{border-color:#1a9c3c}"
             " figure.miss{border-color:#d22} .q{font-style:italic} .curve{margin:6px}")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>ITSELF person search</title><style>{style}</style>"
            f"</head><body>{''.join(body)}{IMAGE_CHECK}</body></html>")
    (out / "index.html").write_text(page)
    return out / "index.html"


def sample_queries(gallery: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """n captions (with their identities) drawn from a dataset split's manifest."""
    import random

    import pyarrow.parquet as pq

    manifest = Path(gallery) / schema.MANIFEST_FILE
    if not manifest.exists():
        raise RetrieveError(f"--sample-queries needs a dataset gallery with {schema.MANIFEST_FILE}; use --queries FILE")
    rows = [r for r in pq.read_table(manifest, columns=["split", "pid", "captions"]).to_pylist() if r["split"] == split]
    pairs = [{"text": c, "pid": r["pid"]} for r in rows for c in r["captions"]]
    return random.Random(seed).sample(pairs, min(n, len(pairs)))


def read_queries(path: str) -> list[dict]:
    """One query per line: plain text, or JSON {"text": ..., "pid": ...}."""
    queries = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            queries.append(json.loads(line) if line.startswith("{") else {"text": line})
    if not queries:
        raise RetrieveError(f"--queries {path}: no queries in the file")
    return queries


# ----------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m itself.retrieve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("index", help="embed a gallery with an exported model")
    i.add_argument("--model", required=True, help="model.pt exported by itself/train.py")
    i.add_argument("--gallery", required=True, help="dataset folder, shard pattern, or folder of images")
    i.add_argument("--split", default="test", help="split of a dataset gallery (default test)")
    i.add_argument("--out", required=True)
    i.add_argument("--batch-size", type=int, default=64)
    q = sub.add_parser("query", help="rank the gallery for text queries")
    q.add_argument("--index", required=True)
    q.add_argument("--model", help="model.pt (default: the one that built the index)")
    q.add_argument("--text", action="append", help="a query (repeatable)")
    q.add_argument("--queries", help="file: one query per line")
    q.add_argument("--top-k", type=int, default=10)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    r = sub.add_parser("report", help="HTML report: ranked thumbnails, MARS patches, training curves")
    r.add_argument("--index", required=True)
    r.add_argument("--model")
    r.add_argument("--out", required=True)
    r.add_argument("--text", action="append")
    r.add_argument("--queries", help='file: one query per line (text, or JSON {"text", "pid"})')
    r.add_argument("--sample-queries", type=int, default=0, help="draw N captions of the indexed split as queries")
    r.add_argument("--run", help="a training run folder: adds its loss and val curves")
    r.add_argument("--top-k", type=int, default=5)
    args = p.parse_args(argv)
    try:
        if args.command == "index":
            info = build_index(args.model, args.gallery, args.out, args.split, args.batch_size)
            print(f"indexed {info['images']} images ({info['skipped']} unreadable skipped) into {args.out}")
            return 0
        index = Index(args.index, args.model)
        queries = [{"text": t} for t in (args.text or [])]
        if args.queries:
            queries += read_queries(args.queries)
        if args.command == "report" and args.sample_queries:
            queries += sample_queries(index.info["gallery"], index.info["split"], args.sample_queries)
        if not queries:
            raise RetrieveError("no queries: pass --text, --queries FILE" + (" or --sample-queries N" if args.command == "report" else ""))
        if args.command == "query":
            results = index.search([q["text"] for q in queries], args.top_k)
            if args.json:
                print(json.dumps([{"query": q["text"], "results": r} for q, r in zip(queries, results)], indent=2))
            else:
                for q, hits in zip(queries, results):
                    print(f"\n{q['text']}")
                    for h in hits:
                        print(f"  {h['rank']:>3}  {h['score']:.4f}  {h['name']}" + (f"  (id {h['pid']})" if h["pid"] is not None else ""))
            return 0
        page = write_report(index, queries, args.out, args.top_k, args.run)
        print(f"report: {page}")
        return 0
    except RetrieveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

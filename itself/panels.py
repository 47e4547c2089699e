"""Retrieval panels: a few queries with their top-k gallery images, the patches MARS kept.

Logged at every evaluation (`eval.panels`), so a run shows what it retrieves, not only how often
it is right. One panel per query: the caption, then the top-k images (outlined green when the
identity is the query's, red when not), each tinted where GRAB's tokens came from.
"""

from __future__ import annotations

import io
import textwrap

import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image, ImageDraw

from .data import catalog
from .data import transforms as T
from .metrics import fused_scores

RIGHT, WRONG = (26, 156, 60), (210, 34, 34)
BORDER = 4
TOP_K = 5  # retrievals shown per query


def pick(queries: dict, gallery: dict, selection: str, a: float, n: int, k: int = TOP_K) -> list[dict]:
    """n queries spread evenly over the split (the same ones at every evaluation) with their top-k
    gallery images under the fused score: [{"query": key, "pid", "hits": [{"image_id", "pid"}]}].
    `queries` / `gallery` as `evaluate.embed_split` assembles them (with "keys")."""
    if not len(queries["pids"]) or not len(gallery["pids"]):
        return []
    rows = torch.linspace(0, len(queries["pids"]) - 1, min(n, len(queries["pids"]))).round().long().unique()
    q = {"global": queries["global"][rows], "grab": queries["grab"].get(selection)}
    if q["grab"] is not None:
        q["grab"] = q["grab"][rows]
    g = {"global": gallery["global"], "grab": gallery["grab"].get(selection)}
    top = fused_scores(q, g, a).topk(min(k, len(gallery["pids"])), dim=1).indices
    return [{"query": int(queries["keys"][r]), "pid": int(queries["pids"][r]),
             "hits": [{"image_id": int(gallery["keys"][j]), "pid": int(gallery["pids"][j])} for j in hits]}
            for r, hits in zip(rows.tolist(), top.tolist())]


def read_samples(root: str, split: str, image_ids: set[int]) -> dict[int, tuple[bytes, list[str]]]:
    """{image_id: (encoded image, captions)} of a split's images, read by byte range when the
    manifest holds offsets (schema 2), else by scanning only the shards that hold them."""
    table = catalog.read_manifest(root, filters=[("split", "=", split)])
    table = table.filter(pc.is_in(table["image_id"], value_set=pa.array(sorted(image_ids), type=pa.int64())))
    out = {}
    ranged = "offset" in table.column_names
    for row in table.to_pylist():
        url = catalog.join(root, split, row["shard"])
        samples = (catalog.tar_samples(io.BytesIO(catalog.read_range(url, *catalog.sample_span(url, [row["offset"]], [row["size"]]))), url)
                   if ranged else (s for s in catalog.iter_shard(url) if s["__key__"] == row["key"]))
        for sample in samples:
            out[row["image_id"]] = (catalog.image_member(sample), row["captions"])
    return out


def overlay(model, data: bytes, size: tuple[int, int], scale: int = 2) -> Image.Image:
    """The image at the model's input size (x scale), the patches MARS kept tinted (none for a
    global-only model, which selects no patches)."""
    img = T.resize(T.decode(data, size), size)
    h, w = size
    base = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w * scale, h * scale))
    if model.cfg.global_only:
        return base
    with torch.no_grad():
        _, keep = model.patch_selection(T.eval_image(img, size)[None].to(_device(model)))
    gh, gw = model.backbone.clip.visual.grid_size
    ph, pw = h // gh * scale, w // gw * scale
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for i in keep[0].tolist():
        r, c = divmod(i, gw)
        draw.rectangle([c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1], fill=(255, 200, 0, 70),
                       outline=(255, 140, 0, 200))
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def render(model, picked: list[dict], samples: dict, size: tuple[int, int], scale: int = 2) -> list[tuple[Image.Image, str]]:
    """One (panel, caption) per picked query: the caption text above its ranked, outlined images.

    Runs the model (MARS's patch selection) on every hit, so under ZeRO-3 every rank must call it
    with the same `picked` (the forward passes gather parameters collectively)."""
    panels = []
    for p in picked:
        image_id, cap = divmod(p["query"], 1000)
        caption = samples[image_id][1][cap] if image_id in samples else "?"
        tiles = []
        for hit in (h for h in p["hits"] if h["image_id"] in samples):
            tile = overlay(model, samples[hit["image_id"]][0], size, scale)
            framed = Image.new("RGB", (tile.width + 2 * BORDER, tile.height + 2 * BORDER),
                               RIGHT if hit["pid"] == p["pid"] else WRONG)
            framed.paste(tile, (BORDER, BORDER))
            tiles.append(framed)
        panels.append((_compose(caption, tiles), caption))
    return panels


def _compose(caption: str, tiles: list[Image.Image]) -> Image.Image:
    lines = textwrap.wrap(caption, width=max(20, sum(t.width for t in tiles) // 7))[:4]
    text_h = 12 * len(lines) + 6
    width = sum(t.width for t in tiles) + 4 * (len(tiles) + 1)
    height = text_h + max((t.height for t in tiles), default=0) + 4
    panel = Image.new("RGB", (max(width, 1), height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, line in enumerate(lines):
        draw.text((4, 3 + 12 * i), line, fill=(0, 0, 0))
    x = 4
    for t in tiles:
        panel.paste(t, (x, text_h))
        x += t.width + 4
    return panel


def retrieval_panels(model, root: str, split: str, picked: list[dict], size: tuple[int, int]) -> list[tuple[Image.Image, str]]:
    """The panels of `picked` (see `pick`) from the split's shards under `root`."""
    needed = {p["query"] // 1000 for p in picked} | {h["image_id"] for p in picked for h in p["hits"]}
    return render(model, picked, read_samples(root, split, needed), size)

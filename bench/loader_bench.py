"""Training data throughput per CPU core: our shard pipeline (decode + paper augmentations +
tokenisation + identity-aware batching) against a map-style dataset over a folder of JPEGs with
the same transforms, with original and pre-resized shards; plus the JPEG decoders on their own.
One process, one thread, no workers: samples/s per core.

    python bench/loader_bench.py            # 60 identities x 4 images at 512x176, trained at 384x128
    python bench/loader_bench.py --quick    # tiny sizes (the test runs this)
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import shards  # noqa: E402
from itself.config import DataConfig  # noqa: E402
from itself.data.pipeline import train_loader  # noqa: E402
from itself.data import transforms as T  # noqa: E402
from shards.converters import convert  # noqa: E402
from shards.synthetic import SyntheticSpec  # noqa: E402


class FolderDataset(torch.utils.data.Dataset):
    """The research-code baseline: one (image file, caption) pair per item, Pillow decode."""

    def __init__(self, pairs, size):
        self.pairs, self.size, self.tok = pairs, size, T.Tokenizer()
        self.gen, self.rng = torch.Generator().manual_seed(0), random.Random(0)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        path, caption, pid = self.pairs[i]
        img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
        return T.train_image(img, self.size, self.gen), self.tok(caption, self.rng), pid


def prepare(work: Path, spec: SyntheticSpec, size) -> tuple[Path, Path, list]:
    raw = work / "raw"
    shards.build_synthetic(raw, spec, max_samples=20, progress=False)
    folder, lines, pairs = work / "folder", [], []
    for tar in sorted((raw / "train").glob("*.tar")):
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                path = folder / meta["source"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(members[name[:-4] + "jpg"])
                lines.append({"image": meta["source"], "captions": meta["captions"], "pid": meta["pid"], "split": "train"})
                pairs += [(path, c, meta["pid"]) for c in meta["captions"]]
    lines.append({**lines[0], "image": lines[0]["image"], "split": "test"})  # converters want every split non-empty
    (folder / "annotations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    resized = work / "resized"
    convert("jsonl", folder, resized, resize=size, workers=1, progress=False, max_samples=20)
    return raw, resized, pairs


def rate(fn, n_samples: int) -> float:
    start = time.perf_counter()
    fn()
    return n_samples / (time.perf_counter() - start)


def shard_rate(root: Path, size, batch: int) -> float:
    loader = train_loader(DataConfig(root=str(root), image_size=size, num_workers=0), rank=0, world_size=1,
                          micro_batch=batch)
    loader.set_epoch(0)
    n = len(loader) * batch
    return rate(lambda: [None for _ in loader], n)


def folder_rate(pairs, size, batch: int) -> float:
    loader = torch.utils.data.DataLoader(FolderDataset(pairs, size), batch_size=batch, shuffle=True, num_workers=0)
    return rate(lambda: [None for _ in loader], len(pairs))


def decoder_rates(data: bytes, size) -> dict:
    import simplejpeg

    def pil_full():
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def pil_draft():
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (size[1], size[0]))
        return np.asarray(im.convert("RGB"))

    out = {}
    for name, fn in (("Pillow, full size", pil_full), ("Pillow, DCT-scaled (draft)", pil_draft),
                     ("simplejpeg (libjpeg-turbo), full size", lambda: simplejpeg.decode_jpeg(data, colorspace="RGB")),
                     ("our decode()", lambda: T.decode(data, size))):
        fn()
        out[name] = rate(lambda: [fn() for _ in range(200)], 200)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        spec, size, batch = SyntheticSpec(num_ids=18, images_per_id=2, image_size=(96, 32)), (48, 16), 8
    else:
        spec, size, batch = SyntheticSpec(num_ids=60, images_per_id=4, image_size=(512, 176)), (384, 128), 32
    with tempfile.TemporaryDirectory() as tmp:
        raw, resized, pairs = prepare(Path(tmp), spec, size)
        print(f"{len(pairs)} train pairs, stored {spec.image_size[0]}x{spec.image_size[1]}, trained at {size[0]}x{size[1]}, "
              f"1 core, no workers")
        folder = folder_rate(pairs, size, batch)
        rows = {"map-style folder of JPEGs (Pillow), the baseline": folder,
                "our shards, original images": shard_rate(raw, size, batch),
                "our shards, pre-resized (--resize)": shard_rate(resized, size, batch)}
        for name, value in rows.items():
            print(f"  {name:<52} {value:8.0f} pairs/s/core  x{value / folder:.2f}")
        with tarfile.open(next((raw / "train").glob("*.tar"))) as t:
            jpeg = next(t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg"))
        print("JPEG decode alone:")
        for name, value in decoder_rates(jpeg, size).items():
            print(f"  {name:<52} {value:8.0f} images/s/core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

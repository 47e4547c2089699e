"""Per-process cost of planning an epoch, from 34k to 5M train images: what one DataLoader worker
of a 64-rank job does before its first batch (read the manifest's small columns into the identity
table, lay the epoch out, plan its own data slot), against planning every slot in one process
(what every process did before planning became per reader). Manifests are planted: metadata
only, shaped like the real ones (about 3 images of 2 captions per identity, 1,000-image shards).

    python bench/plan_bench.py              # 34k, 340k, 1.7M and 5M images
    python bench/plan_bench.py --quick      # 20k images (the test runs this)
    python bench/plan_bench.py --identity-order uniform   # batches drawn over the whole set

Each size runs in a fresh process, so memory is this work's own: the peak resident memory above
the process's level after imports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = (34_054, 340_000, 1_700_000, 5_000_000)
BASELINE_UP_TO = 1_700_000  # planning every slot in one process is minutes beyond


def plant(root: Path, images: int, seed: int = 0) -> list[str]:
    """A manifest.parquet + dataset.json of `images` train images (no shards); the shard names."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards import schema
    from shards.writer import SHARD_SAMPLES

    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, size=images // 3 + 1)  # 1-5 images per identity, about 3
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), images) + 1]
    sizes[-1] -= int(sizes.sum()) - images
    pid = np.repeat(np.arange(len(sizes)), sizes)
    first = np.cumsum(sizes) - sizes  # an identity never spans two shards: close one before it fills
    shard = np.zeros(images, np.int64)
    starts, count, current = [], 0, 0
    for i, n in enumerate(sizes):
        if count + n > SHARD_SAMPLES and count:
            current, count = current + 1, 0
        starts.append(current)
        count += n
    shard = np.repeat(np.array(starts), sizes)
    names = [schema.shard_name("train", i) for i in range(current + 1)]
    row_in_shard = np.arange(images) - np.repeat(np.searchsorted(shard, np.arange(current + 1)), np.bincount(shard))
    table = pa.table({
        "split": pa.DictionaryArray.from_arrays(np.zeros(images, np.int32), ["train"]),
        "shard": pa.DictionaryArray.from_arrays(shard.astype(np.int32), names),
        "key": pa.array(np.char.zfill(np.arange(images).astype(str), 9)),
        "pid": pid, "num_captions": np.full(images, 2, np.int32),
        "offset": row_in_shard * 20480, "size": np.full(images, 20480),
        # (each image's digest, as a real manifest holds: the reader checks the images it reads)
        "sha256": pa.array(np.char.zfill(np.arange(images).astype(str), 64)),
    })
    del first
    pq.write_table(table.replace_schema_metadata({schema.MANIFEST_VERSION_KEY: str(schema.SCHEMA_VERSION).encode()}),
                   root / schema.MANIFEST_FILE, row_group_size=16384)
    counts = np.bincount(shard)
    info = {"name": "planted", "schema_version": schema.SCHEMA_VERSION, "train_identities": len(sizes),
            "splits": {"train": {"images": images, "captions": 2 * images, "identities": len(sizes),
                                 "shards": [{"name": n, "samples": int(c)} for n, c in zip(names, counts)]}}}
    (root / schema.DATASET_FILE).write_text(json.dumps(info))
    return names


def measure(root: str, ranks: int, workers: int, batch: int, baseline: bool, order: str = "slots") -> dict:
    """In this (fresh) process: one reader's planning, and optionally every slot's."""
    from bench.common import PeakRSS
    from itself.data.catalog import TrainData, join
    from itself.data.plan import epoch_layout, plan_slot
    from itself.layout import data_layout

    import pyarrow.dataset  # noqa: F401 - the libraries' own import cost is not the planning's
    import pyarrow.parquet as pq

    pq.read_table(Path(root, "manifest.parquet"), columns=["pid"], filters=[("split", "=", "train")]).slice(0, 0)
    info = json.loads(Path(root, "dataset.json").read_text())
    urls = [join(root, "train", s["name"]) for s in info["splits"]["train"]["shards"]]
    lay = data_layout(batch, ranks, 1, 2, workers, 0)
    out = {"slots": lay.num_slots}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        data = TrainData([(root, urls, 1.0)])
        t1 = time.perf_counter()
        layout = epoch_layout(data.table, num_slots=lay.num_slots, slot_batch=lay.slot_batch, num_instance=2,
                              window_shards=16, seed=0, epoch=0, identity_order=order)
        t2 = time.perf_counter()
        slot = lay.num_slots // 2
        data.load_rows(data.table.shard[layout.order[layout.entries(slot)]])  # (as the slot's reader does)
        windows = plan_slot(data.table, layout, slot, data.captions_of, seed=0, epoch=0)
        t3 = time.perf_counter()
    out.update(table_s=t1 - t0, layout_s=t2 - t1, own_slot_s=t3 - t2, total_s=t3 - t0, extra_mb=mem.extra / 2**20,
               steps=layout.steps, own_batches=sum(len(w.batches) for w in windows),
               identities=len(data.table), unused=layout.stats["pairs_unused"],
               repeated=layout.stats["pairs_repeated"] / layout.stats["pairs_total"])
    if baseline:
        with PeakRSS() as mem:
            data.load_rows(range(data.table.num_shards))
            for s in range(lay.num_slots):
                plan_slot(data.table, layout, s, data.captions_of, seed=0, epoch=0)
        out.update(all_slots_s=mem.seconds, all_slots_extra_mb=mem.extra / 2**20)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch", type=int, default=8192, help="global batch (pretraining scale: 64 ranks x 8 workers)")
    p.add_argument("--identity-order", default="slots", choices=("slots", "uniform"), help="data.identity_order")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # (the child process)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.ranks, args.workers, args.batch, args.baseline,
                                 args.identity_order)))
        return
    sizes = [20_000] if args.quick else args.sizes
    print(f"one reader of {args.ranks} ranks x {args.workers} workers, global batch {args.batch}, identity order "
          f"{args.identity_order}; "
          "times in s, memory = peak above the process's level after imports")
    print(f"{'images':>10} {'ids':>9} {'slots':>6} {'table':>7} {'layout':>7} {'own slot':>9} {'total':>7} "
          f"{'MB':>6} {'all slots':>10} {'MB':>6} {'ratio':>6} {'unused':>7} {'repeated':>8}")
    for images in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            plant(Path(tmp), images)
            run = subprocess.run([sys.executable, __file__, "--measure", tmp, "--ranks", str(args.ranks),
                                  "--workers", str(args.workers), "--batch", str(args.batch),
                                  "--identity-order", args.identity_order]
                                 + (["--baseline"] if images <= BASELINE_UP_TO else []),
                                 capture_output=True, text=True, check=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        base = (f"{r['all_slots_s']:>10.2f} {r['all_slots_extra_mb']:>6.0f} {r['all_slots_s'] / r['own_slot_s']:>6.0f}"
                if "all_slots_s" in r else f"{'-':>10} {'-':>6} {'-':>6}")
        print(f"{images:>10} {r['identities']:>9} {r['slots']:>6} {r['table_s']:>7.2f} {r['layout_s']:>7.2f} "
              f"{r['own_slot_s']:>9.2f} {r['total_s']:>7.2f} {r['extra_mb']:>6.0f} {base} {r['unused']:>7} "
              f"{r['repeated']:>8.2%}")
        assert r["own_batches"] == r["steps"], "a slot must yield the epoch's step count"


if __name__ == "__main__":
    main()

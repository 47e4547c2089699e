"""Corpus conversion at scale: throughput (images/s per core) and peak memory (RSS of the whole
process tree) of `itself-shards build --dataset webperson` on a planted WebPerson-layout corpus of
tiny JPEGs, with 1 and 2 worker processes, and the memory at a tenth of the size (memory must not
grow with the corpus). The corpus is generated once and reused (`--cache`).

    python bench/convert_bench.py                         # 1,000,000 records, workers 1 and 2
    python bench/convert_bench.py --records 200000
    python bench/convert_bench.py --quick                 # 3,000 records (the test runs this)
"""

from __future__ import annotations

import argparse
import io
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_FILE = 100_000
DISTINCT = 4096  # distinct encoded images, cycled (decoding cost is what is measured, not variety)


def plant(root: Path, records: int, size=(16, 32)) -> None:
    """data/train-*.parquet as WebPerson's release (image struct, image_path, caption1, caption2)."""
    stamp = root / "records.txt"
    if stamp.exists() and stamp.read_text() == str(records):
        return
    shutil.rmtree(root, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    images = []
    for i in range(DISTINCT):
        buf = io.BytesIO()
        Image.new("RGB", size, (i % 256, (i // 256) * 16, 120)).save(buf, format="JPEG", quality=85)
        images.append(buf.getvalue())
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("image_path", pa.string()), ("caption1", pa.string()), ("caption2", pa.string())])
    files = -(-records // ROWS_PER_FILE)
    for k in range(files):
        lo, hi = k * ROWS_PER_FILE, min(records, (k + 1) * ROWS_PER_FILE)
        table = pa.table({
            "image": pa.array([{"bytes": images[i % DISTINCT], "path": f"{i}.jpg"} for i in range(lo, hi)],
                              schema.field("image").type),
            "image_path": [f"img/{i // 1000}/{i:08d}.jpg" for i in range(lo, hi)],
            "caption1": [f"a person number {i} wearing a dark coat and jeans" for i in range(lo, hi)],
            "caption2": [f"pedestrian {i} walking with a bag" for i in range(lo, hi)]}, schema=schema)
        pq.write_table(table, root / "data" / f"train-{k:05d}-of-{files:05d}.parquet", row_group_size=1000)
    stamp.write_text(str(records))


class TreeMemory:
    """Peak memory of a process and all its descendants, sampled every 50 ms: the sum of their RSS
    (forked workers' shared pages counted in each), and of their PSS (shared pages divided among
    the processes sharing them: what the tree really holds)."""

    def __init__(self, pid: int):
        self.proc, self.rss, self.pss = psutil.Process(pid), 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                info = [p.memory_full_info() for p in procs]
                self.rss = max(self.rss, sum(i.rss for i in info))
                self.pss = max(self.pss, sum(getattr(i, "pss", i.rss) for i in info))
            except psutil.Error:
                pass
            time.sleep(0.05)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.rss, self.pss


def convert(root: Path, out: Path, workers: int, chunk: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "shards", "build", "--dataset", "webperson", "--root", str(root),
                             "--out", str(out), "--workers", str(workers), "--chunk-size", str(chunk),
                             "--no-progress"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(proc.pid)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    rss, pss = memory.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # (the build and its workers, all waited for)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed:\n{stderr[-3000:]}")
    phase = {name: float(m.group(1)) for name, pattern in (("plan", r"planned .* in ([\d.]+) s"),
                                                            ("convert", r"converted .* in ([\d.]+) s"),
                                                            ("merge", r"merged .* in ([\d.]+) s"))
             if (m := re.search(pattern, stderr))}
    written = int(re.search(r"written (\d+)", stdout).group(1))
    return {"seconds": seconds, "cpu": cpu, "rss": rss, "pss": pss, "written": written, **phase}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--chunk-size", type=int, default=10_000)
    p.add_argument("--cache", default="/tmp/itself-convert-bench", help="where the planted corpus is kept")
    p.add_argument("--quick", action="store_true", help="3,000 records, chunks of 500")
    args = p.parse_args()
    records, chunk = (3000, 500) if args.quick else (args.records, args.chunk_size)
    cache = Path(args.cache) / ("quick" if args.quick else str(records))
    small = Path(args.cache) / f"{records // 10}"
    t = time.perf_counter()
    plant(cache / "raw", records)
    plant(small / "raw", records // 10)
    print(f"corpus: {records} records in WebPerson's layout ({time.perf_counter() - t:.0f} s to plant or find)")
    print(f"machine: {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}")
    results = {}
    for w in [int(x) for x in args.workers.split(",")]:
        results[w] = convert(cache / "raw", cache / f"out{w}", w, chunk)
    tenth = convert(small / "raw", small / "out1", 1, max(1, chunk // 10) if args.quick else chunk)
    # img/s/core: images per second per worker of wall time (what the machine gave us: with other jobs
    # running, less than a core); img/CPU-s: images per second of CPU the whole build used (the cost
    # per core, whatever else runs).
    print(f"\n{'workers':>7} {'records':>9} {'wall s':>8} {'plan s':>7} {'conv s':>7} {'merge s':>8} "
          f"{'img/s':>8} {'img/s/core':>10} {'CPU s':>7} {'img/CPU-s':>9} {'RSS MB':>7} {'PSS MB':>7}")
    rows = [(w, records, r) for w, r in results.items()] + [(1, records // 10, tenth)]
    for w, n, r in rows:
        print(f"{w:>7} {n:>9} {r['seconds']:>8.1f} {r.get('plan', 0):>7.1f} {r.get('convert', 0):>7.1f} "
              f"{r.get('merge', 0):>8.1f} {n / r['seconds']:>8.0f} {n / r['seconds'] / w:>10.0f} {r['cpu']:>7.0f} "
              f"{n / r['cpu']:>9.0f} {r['rss'] / 2**20:>7.0f} {r['pss'] / 2**20:>7.0f}")
    one = results.get(1)
    for w, r in results.items():
        if one is not None and w != 1:
            print(f"speed-up of the conversion step with {w} workers: {one['convert'] / r['convert']:.2f}x "
                  f"(whole build {one['seconds'] / r['seconds']:.2f}x); CPU per image {r['cpu'] / one['cpu']:.2f}x; "
                  f"peak memory (PSS) {r['pss'] / one['pss']:.2f}x")
    if one is not None:
        print(f"peak memory (PSS) at {records} vs {records // 10} records (1 worker): {one['pss'] / tenth['pss']:.2f}x")
    identical = len({(cache / f"out{w}" / "manifest.parquet").read_bytes() for w in results}) == 1
    print(f"same manifest for every worker count: {identical}")
    for w in results:
        shutil.rmtree(cache / f"out{w}", ignore_errors=True)
    shutil.rmtree(small / "out1", ignore_errors=True)


if __name__ == "__main__":
    main()

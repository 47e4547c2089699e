"""Does storing images pre-resized change accuracy? Pre-resized shards against the authors' resize.

    python bench/resize_effect.py [--out runs/resize-effect] [--seeds 0 1 2] [--epochs 5]

`python -m shards build --resize HxW` stores every image resized once with PIL bicubic and
re-saved as JPEG quality 95 (`shards.imaging.prepare_image`); the authors' code decodes the
original each time and resizes it bilinearly (torchvision `Resize`). This trains the synthetic
benchmark (the `synthetic` preset's tiny CLIP at 96x32, `--epochs` epochs) on two builds of the
same synthetic people, drawn at 144x48:

- `pre-resized`: every image through `prepare_image(data, resize=(96, 32))`, exactly what
  `--resize 96x32` stores (all splits, as the builder does);
- `on the fly`: the originals; the pipeline decodes them fully and resizes bilinearly with
  antialiasing, as the authors (the images are drawn at 1.5x the training size so that the
  decoder's reduced-scale JPEG path, taken from 2x on, stays out of the comparison).

Same seeds, same hyper-parameters (`data.identity_order=slots`, as when first recorded); only
the stored images differ. Prints test R@1 (fused) mean
+- sd per arm and writes <out>/resize_effect.json. Runs are reused when their results.json exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DRAWN, TRAINED = (144, 48), (96, 32)


def build(out: Path, pre_resize: bool) -> None:
    """The synthetic set drawn at DRAWN, its images stored as drawn or pre-resized to TRAINED."""
    if (out / "dataset.json").exists():
        return
    from shards.imaging import prepare_image
    from shards.synthetic import SyntheticSpec, synthetic_records
    from shards.writer import write_dataset

    spec = SyntheticSpec(image_size=DRAWN)
    records = synthetic_records(spec)
    if pre_resize:
        records = (_resized(r, prepare_image) for r in records)
    sizes = spec.split_sizes()
    write_dataset(records, out, "synthetic", total=sum(sizes.values()) * spec.images_per_id, progress=False,
                  extra={"builder": {"dataset": "synthetic", **dataclasses.asdict(spec),
                                     "resized": list(TRAINED) if pre_resize else None}})


def _resized(record, prepare_image):
    image = prepare_image(record.image_bytes, TRAINED)  # what `shards build --resize` stores
    return dataclasses.replace(record, image_bytes=image.data, image_ext=image.ext)


def train(out: Path, name: str, *args: str) -> dict:
    run_dir = out / name
    if not (run_dir / "results.json").exists():
        print(f"$ itself/train.py {' '.join(args)}", flush=True)
        started = time.time()
        with open(out / f"{name}.log", "w") as log:
            done = subprocess.run([sys.executable, "itself/train.py", *args, f"run_dir={run_dir}"], cwd=REPO,
                                  stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"failed (exit {done.returncode}); see {out / f'{name}.log'}")
        print(f"  done in {time.time() - started:.0f} s", flush=True)
    return json.loads((run_dir / "results.json").read_text())


def r1(results: dict) -> float:
    return results["test"].get("fused", results["test"]["global"])["R1"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/resize-effect")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args(argv)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    arms = {"pre-resized": out / "data-pre-resized", "on the fly": out / "data-original"}
    for arm, root in arms.items():
        build(root, arm == "pre-resized")
    table = {arm: {} for arm in arms}
    for seed in args.seeds:
        for arm, root in arms.items():
            name = f"{'pre' if arm == 'pre-resized' else 'fly'}-seed{seed}"
            results = train(out, name, f"data.root={root}", f"seed={seed}", f"train.epochs={args.epochs}",
                            f"model.t_small={max(1, args.epochs // 4)} epochs", "data.identity_order=slots")
            table[arm][seed] = r1(results)
    summary = {arm: {"mean": statistics.mean(v.values()),
                     "sd": statistics.stdev(v.values()) if len(v) > 1 else 0.0} for arm, v in table.items()}
    report = {"drawn": DRAWN, "trained": TRAINED, "epochs": args.epochs, "seeds": args.seeds, "test_R1": table,
              "summary": summary}
    (out / "resize_effect.json").write_text(json.dumps(report, indent=2) + "\n")
    for arm, s in summary.items():
        print(f"{arm:<12} test R@1 {s['mean']:.2f} +- {s['sd']:.2f}  (seeds "
              + ", ".join(f"{table[arm][k]:.2f}" for k in args.seeds) + ")")
    diff = summary["pre-resized"]["mean"] - summary["on the fly"]["mean"]
    print(f"pre-resized - on the fly: {diff:+.2f} R@1 points; written {out / 'resize_effect.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

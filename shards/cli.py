"""`python -m shards build ...`: pack a dataset into WebDataset shards."""

from __future__ import annotations

import argparse
import sys

from . import SHARD_BYTES, SHARD_SAMPLES, SYNTHETIC_SHARD_SAMPLES, BuildError, build_synthetic, summary_table
from .converters import FORMATS, ConvertError, convert
from .synthetic import SyntheticSpec
from .writer import StrictError

DATASETS = ("synthetic", *FORMATS)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shards", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write <out>/{train,val,test}/*.tar, manifest.parquet, dataset.json, rejects.jsonl")
    b.add_argument("--dataset", required=True, choices=DATASETS, help="which converter to run")
    b.add_argument("--out", required=True, help="output dataset directory")
    b.add_argument("--overwrite", action="store_true", help="rebuild a directory that already holds a dataset")
    b.add_argument("--shard-samples", type=int, default=None,
                   help=f"max images per shard (default {SHARD_SAMPLES}; synthetic {SYNTHETIC_SHARD_SAMPLES})")
    b.add_argument("--shard-bytes", type=int, default=SHARD_BYTES,
                   help=f"max image bytes per shard (default {SHARD_BYTES >> 20} MiB)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = b.add_argument_group("raw datasets (cuhk-pedes, icfg-pedes, rstpreid, jsonl)")
    r.add_argument("--root", help="the raw dataset folder (annotation file + images)")
    r.add_argument("--annotations", help="annotation file, if not the format's usual name in --root")
    r.add_argument("--resize", help="store images pre-resized to HxW (e.g. 384x128), recorded in dataset.json")
    r.add_argument("--workers", type=int, default=None, help="conversion processes (default: all cores)")
    r.add_argument("--val-fraction", type=float, default=0.05,
                   help="icfg-pedes (no val split): share of train identities held out as val (default 0.05)")
    r.add_argument("--strict", action="store_true", help="fail (exit 1, no dataset.json) if any record is rejected")
    s = b.add_argument_group("synthetic dataset")
    d = SyntheticSpec()
    s.add_argument("--num-ids", type=int, default=d.num_ids, help=f"identities over all splits (default {d.num_ids})")
    s.add_argument("--images-per-id", type=int, default=d.images_per_id, help=f"default {d.images_per_id}")
    s.add_argument("--captions-per-image", type=int, default=d.captions_per_image, help=f"default {d.captions_per_image}")
    s.add_argument("--image-size", default=f"{d.image_size[0]}x{d.image_size[1]}", help="HxW of drawn images")
    s.add_argument("--twin-fraction", type=float, default=d.twin_fraction,
                   help=f"share of near-twin identities (default {d.twin_fraction})")
    s.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed} (also picks the icfg-pedes val identities)")
    return p


def _hxw(text: str, flag: str = "--image-size") -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        assert h > 0 and w > 0
        return h, w
    except (ValueError, AssertionError):
        raise SystemExit(f"{flag}: expected HxW with positive integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.dataset == "synthetic":
            spec = SyntheticSpec(num_ids=args.num_ids, images_per_id=args.images_per_id,
                                 captions_per_image=args.captions_per_image, image_size=_hxw(args.image_size),
                                 twin_fraction=args.twin_fraction, seed=args.seed)
            spec.split_sizes()
            info = build_synthetic(args.out, spec, max_samples=args.shard_samples or SYNTHETIC_SHARD_SAMPLES,
                                   max_bytes=args.shard_bytes, overwrite=args.overwrite,
                                   progress=not args.no_progress)
        else:
            if not args.root:
                raise SystemExit(f"--root is required for --dataset {args.dataset}")
            info = convert(args.dataset, args.root, args.out, annotations=args.annotations,
                           resize=_hxw(args.resize, "--resize") if args.resize else None, workers=args.workers,
                           val_fraction=args.val_fraction, seed=args.seed, strict=args.strict,
                           max_samples=args.shard_samples or SHARD_SAMPLES, max_bytes=args.shard_bytes,
                           overwrite=args.overwrite, progress=not args.no_progress)
    except StrictError as e:
        print(summary_table(e.info))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (BuildError, ConvertError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(info))
    if "images_per_s" in info:
        print(f"{info['images_per_s']:.0f} images/s")
    print(f"wrote {args.out}" + (f" ({info['rejected']} records rejected: see rejects.jsonl)" if info["rejected"] else ""))
    return 0


def cli() -> None:
    """`itself-shards` and `python -m shards`."""
    raise SystemExit(main())

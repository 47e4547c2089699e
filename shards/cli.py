"""`python -m shards build ...`: pack a dataset into WebDataset shards."""

from __future__ import annotations

import argparse
import math
import signal
import sys

from . import SHARD_BYTES, SHARD_SAMPLES, SYNTHETIC_SHARD_SAMPLES, build_synthetic, summary_table
from .converters import FORMATS, convert
from .errors import BuildError, BuildFailed, Interrupted, RejectsError
from .synthetic import SyntheticSpec
from .writer import MAJORITY

DATASETS = ("synthetic", *FORMATS)

EXIT_CODES = f"""\
exit status:
  0  the dataset was written (rejected records, if any, are counted in the summary and listed in
     <out>/rejects.jsonl)
  1  error: the build failed while running (an I/O error such as a full disk, a worker process
     killed, interrupted)
  2  error: the build cannot be done as asked, and nothing was written: a bad argument, no
     usable annotation file, --out taken by another build, holding a dataset (without
     --overwrite) or holding other files; or the data refused: nothing to write, any reject
     with --strict, or one reason rejecting more than {MAJORITY:.0%} of the records (unless
     --allow-rejects). Refused builds keep their rejects in <out>.rejects.jsonl
A build never changes --out unless it succeeds: the new dataset is written beside it and
swapped in whole; the previous dataset stays as it was otherwise."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error: ...` line and exit 2, as every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m shards", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write <out>/{train,val,test}/*.tar, manifest.parquet, dataset.json, rejects.jsonl",
                       description="Pack a dataset into WebDataset shards.", epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--dataset", required=True, choices=DATASETS, help="which converter to run")
    b.add_argument("--out", required=True, help="output dataset directory (replaced whole, only when the build succeeds)")
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
    r.add_argument("--val-fraction", type=float, default=None,
                   help="icfg-pedes (no val split): share of train identities held out as val (default 0.05)")
    r.add_argument("--strict", action="store_true",
                   help="refuse the build (exit 2, nothing written) if any record is rejected")
    r.add_argument("--allow-rejects", action="store_true",
                   help=f"write the dataset even when one reason rejects more than {MAJORITY:.0%}% of the records "
                        "(by default such a build is refused: the input is likely wrong as a whole)")
    s = b.add_argument_group("synthetic dataset")
    d = SyntheticSpec()
    s.add_argument("--num-ids", type=int, default=None, help=f"identities over all splits (default {d.num_ids})")
    s.add_argument("--images-per-id", type=int, default=None, help=f"default {d.images_per_id}")
    s.add_argument("--captions-per-image", type=int, default=None, help=f"default {d.captions_per_image}")
    s.add_argument("--image-size", default=None, help=f"HxW of drawn images (default {d.image_size[0]}x{d.image_size[1]})")
    s.add_argument("--twin-fraction", type=float, default=None,
                   help=f"share of near-twin identities (default {d.twin_fraction})")
    s.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed} (also picks the icfg-pedes val identities)")
    return p


RAW_ONLY = ("root", "annotations", "resize", "workers", "val_fraction", "strict", "allow_rejects")
SYNTHETIC_ONLY = ("num_ids", "images_per_id", "captions_per_image", "image_size", "twin_fraction")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _hxw(text: str, flag: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        h = w = 0
    if not (0 < h <= 16384 and 0 < w <= 16384):
        raise BuildError(f"{flag}: expected HxW with integers in 1..16384 (e.g. 384x128), got {text!r}")
    return h, w


def _check_args(args) -> None:
    """Usage mistakes argparse does not catch (BuildError: exit 2)."""
    given = lambda dest: getattr(args, dest) not in (None, False)  # noqa: E731
    if args.dataset == "synthetic":
        wrong = [_flag(d) for d in RAW_ONLY if given(d)]
        if wrong:
            raise BuildError(f"{', '.join(wrong)}: only for the raw datasets ({', '.join(FORMATS)}), not "
                             "--dataset synthetic")
    else:
        wrong = [_flag(d) for d in SYNTHETIC_ONLY if given(d)]
        if wrong:
            raise BuildError(f"{', '.join(wrong)}: only for --dataset synthetic")
        if not args.root:
            raise BuildError(f"--root is required for --dataset {args.dataset} (the folder holding the annotation "
                             "file and the images)")
    if args.shard_samples is not None and args.shard_samples < 1:
        raise BuildError(f"--shard-samples: must be at least 1, got {args.shard_samples}")
    if args.shard_bytes < 1:
        raise BuildError(f"--shard-bytes: must be at least 1, got {args.shard_bytes}")
    if args.workers is not None and args.workers < 1:
        raise BuildError(f"--workers: must be at least 1, got {args.workers}")
    for name, value in (("--val-fraction", args.val_fraction), ("--twin-fraction", args.twin_fraction)):
        if value is not None and not (math.isfinite(value) and 0 <= value < 1 if name == "--val-fraction"
                                      else math.isfinite(value) and 0 <= value <= 1):
            raise BuildError(f"{name}: must be a share in [0, 1{')' if name == '--val-fraction' else ']'}, "
                             f"got {value}")


def _synthetic_spec(args) -> SyntheticSpec:
    d = SyntheticSpec()
    pick = lambda v, default: default if v is None else v  # noqa: E731
    spec = SyntheticSpec(num_ids=pick(args.num_ids, d.num_ids), images_per_id=pick(args.images_per_id, d.images_per_id),
                         captions_per_image=pick(args.captions_per_image, d.captions_per_image),
                         image_size=_hxw(args.image_size, "--image-size") if args.image_size else d.image_size,
                         twin_fraction=pick(args.twin_fraction, d.twin_fraction), seed=args.seed)
    try:
        spec.validate()
    except ValueError as e:
        raise BuildError(str(e)) from None
    return spec


def _on_sigterm(signum, frame):
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:  # a terminated build cleans up, as on Ctrl-C
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        _check_args(args)
        if args.dataset == "synthetic":
            info = build_synthetic(args.out, _synthetic_spec(args),
                                   max_samples=args.shard_samples or SYNTHETIC_SHARD_SAMPLES,
                                   max_bytes=args.shard_bytes, overwrite=args.overwrite, progress=not args.no_progress)
        else:
            info = convert(args.dataset, args.root, args.out, annotations=args.annotations,
                           resize=_hxw(args.resize, "--resize") if args.resize else None, workers=args.workers,
                           val_fraction=0.05 if args.val_fraction is None else args.val_fraction, seed=args.seed,
                           strict=args.strict, allow_rejects=args.allow_rejects,
                           max_samples=args.shard_samples or SHARD_SAMPLES, max_bytes=args.shard_bytes,
                           overwrite=args.overwrite, progress=not args.no_progress)
    except RejectsError as e:
        print(summary_table(e.info))
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (BuildFailed, OSError) as e:
        print(f"error: the build failed: {e}; {args.out} was left as it was", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print(f"error: interrupted; {args.out} was left as it was", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(summary_table(info))
    for split, s in info["splits"].items():
        if s["images"] == 0:
            print(f"warning: the {split} split is empty", file=sys.stderr)
    if "images_per_s" in info:
        print(f"{info['images_per_s']:.0f} images/s")
    print(f"wrote {args.out}"
          + (f" ({info['rejected']} records rejected: see rejects.jsonl)" if info["rejected"] else ""))
    return 0


def cli() -> None:
    """`itself-shards` and `python -m shards`."""
    raise SystemExit(main())

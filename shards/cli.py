"""`python -m shards build ...`: pack a dataset into WebDataset shards."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys

from . import SHARD_BYTES, SHARD_SAMPLES, SYNTHETIC_SHARD_SAMPLES, build_synthetic, summary_table
from .chunking import CHUNK_SIZE, VAL_FRACTION, VAL_MAX_IDENTITIES
from .converters import FORMATS, convert
from .corpora import CORPORA
from .corpus_build import CorpusOptions, convert_corpus
from .errors import BuildError, BuildFailed, Interrupted, RejectsError, error_line
from .pretrain import PretrainSpec, build_synthetic_pretrain
from .synthetic import SyntheticSpec
from .transaction import abort_open
from .writer import MAJORITY

DATASETS = ("synthetic", *FORMATS, *CORPORA, "synthetic-pretrain")

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
swapped in whole; the previous dataset stays as it was otherwise. A corpus conversion
(webperson, synth-pedes, mals, luperson-t, ham-pedes, pairs, synthetic-pretrain) that fails or is killed
keeps its plan and finished chunks in .<out>.convert beside --out: the same command again
converts only the rest."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error: ...` line and exit 2, as every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="itself-shards" if sys.argv[0].endswith("itself-shards") else "python -m shards",
                description=__doc__)
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
    r = b.add_argument_group(f"raw datasets ({', '.join(FORMATS)}) and corpora ({', '.join(CORPORA)})")
    r.add_argument("--root", help="the raw dataset folder (annotation files + images, as the release lays them out)")
    r.add_argument("--annotations", help="annotation file (or a folder of them), if not where the release puts it")
    r.add_argument("--resize", help="store images pre-resized to HxW (e.g. 384x128), recorded in dataset.json")
    r.add_argument("--workers", type=int, default=None, help="conversion processes (default: all cores)")
    r.add_argument("--val-fraction", type=float, default=None,
                   help="share of identities held out as val: icfg-pedes (no val split; default 0.05) and the "
                        f"corpora (default {VAL_FRACTION})")
    r.add_argument("--strict", action="store_true",
                   help="refuse the build (exit 2, nothing written) if any record is rejected")
    r.add_argument("--allow-rejects", action="store_true",
                   help=f"write the dataset even when one reason rejects more than {MAJORITY:.0%}% of the records "
                        "(by default such a build is refused: the input is likely wrong as a whole)")
    c = b.add_argument_group(f"corpora ({', '.join(CORPORA)}, synthetic-pretrain)")
    c.add_argument("--chunk-size", type=int, default=None,
                   help=f"records per chunk, the unit of parallel work and of resuming (default {CHUNK_SIZE})")
    c.add_argument("--val-max-identities", type=int, default=None,
                   help=f"at most this many val identities (default {VAL_MAX_IDENTITIES})")
    c.add_argument("--pairs", type=int, default=None,
                   help=f"synthetic-pretrain: image-caption pairs, two per image (default {PretrainSpec().pairs})")
    s = b.add_argument_group("synthetic dataset")
    d = SyntheticSpec()
    s.add_argument("--num-ids", type=int, default=None, help=f"identities over all splits (default {d.num_ids})")
    s.add_argument("--images-per-id", type=int, default=None, help=f"default {d.images_per_id}")
    s.add_argument("--captions-per-image", type=int, default=None, help=f"default {d.captions_per_image}")
    s.add_argument("--image-size", default=None, help=f"HxW of drawn images (default {d.image_size[0]}x{d.image_size[1]})")
    s.add_argument("--twin-fraction", type=float, default=None,
                   help=f"share of near-twin identities (default {d.twin_fraction})")
    s.add_argument("--seed", type=int, default=d.seed,
                   help=f"default {d.seed} (also picks the icfg-pedes and corpora val identities)")
    return p


RAW_ONLY = ("root", "annotations", "resize", "val_fraction", "strict", "allow_rejects")
SYNTHETIC_ONLY = ("num_ids", "images_per_id", "captions_per_image", "twin_fraction")
CORPUS_ONLY = ("chunk_size", "val_max_identities")
ONLY = {  # the flags of each kind of dataset (besides --out, --overwrite, shard sizes, progress)
    "synthetic": {*SYNTHETIC_ONLY, "image_size", "seed"},
    "raw": {*RAW_ONLY, "workers", "seed"},
    "corpus": {*RAW_ONLY, *CORPUS_ONLY, "workers", "seed"},
    "synthetic-pretrain": {"pairs", "image_size", "seed", "twin_fraction", "workers", "resize", "val_fraction",
                           *CORPUS_ONLY},
}


def _kind(dataset: str) -> str:
    if dataset in ("synthetic", "synthetic-pretrain"):
        return dataset
    return "corpus" if dataset in CORPORA else "raw"


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
    kind = _kind(args.dataset)
    every = {*RAW_ONLY, *SYNTHETIC_ONLY, *CORPUS_ONLY, "pairs", "image_size", "workers"}
    wrong = [_flag(d) for d in sorted(every - ONLY[kind]) if given(d)]
    if wrong:
        dests = {w[2:].replace("-", "_") for w in wrong}
        names = {"synthetic": "--dataset synthetic", "synthetic-pretrain": "--dataset synthetic-pretrain",
                 "raw": f"the raw datasets ({', '.join(FORMATS)})", "corpus": f"the corpora ({', '.join(CORPORA)})"}
        owners = [names[k] for k in ONLY if k != kind and dests <= ONLY[k]]
        raise BuildError(f"{', '.join(wrong)}: only for {' and '.join(owners) or 'other datasets'}, not --dataset "
                         f"{args.dataset}")
    if kind in ("raw", "corpus") and not args.root:
        raise BuildError(f"--root is required for --dataset {args.dataset} (the folder holding the annotation "
                         "files and the images)")
    if args.shard_samples is not None and args.shard_samples < 1:
        raise BuildError(f"--shard-samples: must be at least 1, got {args.shard_samples}")
    if args.shard_bytes < 1:
        raise BuildError(f"--shard-bytes: must be at least 1, got {args.shard_bytes}")
    for flag, value, lo in (("--workers", args.workers, 1), ("--chunk-size", args.chunk_size, 1),
                            ("--val-max-identities", args.val_max_identities, 0)):
        if value is not None and value < lo:
            raise BuildError(f"{flag}: must be at least {lo}, got {value}")
    for name, value in (("--val-fraction", args.val_fraction), ("--twin-fraction", args.twin_fraction)):
        if value is not None and not (math.isfinite(value) and 0 <= value < 1 if name == "--val-fraction"
                                      else math.isfinite(value) and 0 <= value <= 1):
            raise BuildError(f"{name}: must be a share in [0, 1{')' if name == '--val-fraction' else ']'}, "
                             f"got {value}")


def corpus_options(args) -> CorpusOptions:
    """The corpus conversion options of parsed `build` arguments."""
    pick = lambda v, default: default if v is None else v  # noqa: E731
    return CorpusOptions(annotations=args.annotations, resize=_hxw(args.resize, "--resize") if args.resize else None,
                         chunk_size=pick(args.chunk_size, CHUNK_SIZE), val_fraction=pick(args.val_fraction, VAL_FRACTION),
                         val_max_identities=pick(args.val_max_identities, VAL_MAX_IDENTITIES), seed=args.seed,
                         max_samples=args.shard_samples or SHARD_SAMPLES, max_bytes=args.shard_bytes)


def _build(args) -> dict:
    kind = _kind(args.dataset)
    progress = not args.no_progress
    if kind == "synthetic":
        return build_synthetic(args.out, _synthetic_spec(args), max_samples=args.shard_samples or SYNTHETIC_SHARD_SAMPLES,
                               max_bytes=args.shard_bytes, overwrite=args.overwrite, progress=progress)
    if kind == "synthetic-pretrain":
        d = PretrainSpec()
        spec = PretrainSpec(pairs=d.pairs if args.pairs is None else args.pairs,
                            image_size=_hxw(args.image_size, "--image-size") if args.image_size else d.image_size,
                            twin_fraction=d.twin_fraction if args.twin_fraction is None else args.twin_fraction,
                            seed=args.seed)
        return build_synthetic_pretrain(args.out, spec, workers=args.workers, options=corpus_options(args),
                                        overwrite=args.overwrite, progress=progress)
    if kind == "corpus":
        return convert_corpus(args.dataset, args.root, args.out, corpus_options(args), workers=args.workers,
                              strict=args.strict, allow_rejects=args.allow_rejects, overwrite=args.overwrite,
                              progress=progress)
    return convert(args.dataset, args.root, args.out, annotations=args.annotations,
                   resize=_hxw(args.resize, "--resize") if args.resize else None, workers=args.workers,
                   val_fraction=0.05 if args.val_fraction is None else args.val_fraction, seed=args.seed,
                   strict=args.strict, allow_rejects=args.allow_rejects,
                   max_samples=args.shard_samples or SHARD_SAMPLES, max_bytes=args.shard_bytes,
                   overwrite=args.overwrite, progress=progress)


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


def build_args(argv: list[str]):
    """The parsed and checked arguments of `build` (argv without the word build): BuildError when
    they cannot be used; argparse's own mistakes exit 2 with one error line."""
    args = _parser().parse_args(["build", *argv])
    _check_args(args)
    return args


def _on_sigterm(signum, frame):
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:  # (progress notes, e.g. what a resumed conversion kept)
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:  # a terminated build cleans up, as on Ctrl-C
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        _check_args(args)
        info = _build(args)
    except RejectsError as e:
        print(summary_table(e.info))
        print(error_line(e), file=sys.stderr)
        return 2
    except BuildError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except (BuildFailed, OSError) as e:
        print(error_line(f"the build failed: {e}; {args.out} was left as it was"), file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print(error_line(f"interrupted; {args.out} was left as it was"), file=sys.stderr)
        return 1
    finally:
        abort_open()  # (a build the signal caught before its own clean-up could start)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(summary_table(info))
    for split, s in info["splits"].items():
        if s["images"] == 0 and not (split == "test" and "identities" in info):  # (corpora have no test split)
            print(f"warning: the {split} split is empty", file=sys.stderr)
    if "images_per_s" in info:
        print(f"{info['images_per_s']:.0f} images/s")
    print(f"wrote {args.out}"
          + (f" ({info['rejected']} records rejected: see rejects.jsonl)" if info["rejected"] else ""))
    return 0


def cli() -> None:
    """`itself-shards` and `python -m shards`."""
    raise SystemExit(main())

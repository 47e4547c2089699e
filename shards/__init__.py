"""Raw datasets -> WebDataset tar shards + Parquet manifest (the lowest layer: imports nothing
of `itself`, `launch` or `tune`). See `shards.schema` for the format."""

import importlib

# The package's names, each from its module, imported when first used: `import shards.errors` (every
# command's error line) or `shards.locking` costs no image or Parquet library.
_EXPORTS = {
    "SCHEMA_VERSION": "schema", "BuildError": "errors", "BuildFailed": "errors", "ConvertError": "errors",
    "OutputBusy": "errors", "RejectsError": "errors", "to_rgb8": "imaging", "SHARD_BYTES": "writer",
    "SHARD_SAMPLES": "writer", "DatasetWriter": "writer", "Record": "writer", "Reject": "writer",
    "summary_table": "writer", "write_dataset": "writer",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

SYNTHETIC_SHARD_SAMPLES = 40
"""Images per synthetic train shard: 10 identities, so the default set has 16 train shards, which
split evenly over 1, 2, 4 or 8 ranks x workers (nothing dropped by the epoch plan)."""


def build_synthetic(out, spec=None, *, max_samples: int = SYNTHETIC_SHARD_SAMPLES,
                    max_bytes: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Build the embedded synthetic dataset into `out`; returns its dataset.json dict (`max_bytes`:
    per shard, default `SHARD_BYTES`)."""
    import dataclasses

    from .synthetic import SyntheticSpec, synthetic_records
    from .writer import SHARD_BYTES, write_dataset

    spec = spec or SyntheticSpec()
    spec.validate()
    sizes = spec.split_sizes()
    return write_dataset(
        synthetic_records(spec), out, "synthetic",
        total=sum(sizes.values()) * spec.images_per_id, progress=progress,
        max_samples=max_samples, max_bytes=SHARD_BYTES if max_bytes is None else max_bytes, overwrite=overwrite,
        extra={"builder": {"dataset": "synthetic", **dataclasses.asdict(spec)}},
    )


def build_synthetic_pretrain(out, pairs: int = 100_000, *, seed: int = 0, workers: int | None = None,
                             overwrite: bool = False, progress: bool = True) -> dict:
    """Build the synthetic person pre-training corpus (`shards.pretrain`) into `out`: `pairs`
    image-caption pairs, two per image, each image its own pseudo-identity; its dataset.json dict."""
    from .pretrain import PretrainSpec
    from .pretrain import build_synthetic_pretrain as build

    return build(out, PretrainSpec(pairs=pairs, seed=seed), workers=workers, overwrite=overwrite, progress=progress)

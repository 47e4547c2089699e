"""Raw datasets -> WebDataset tar shards + Parquet manifest (the lowest layer: imports nothing
of `itself`, `launch` or `tune`). See `shards.schema` for the format."""

from .schema import SCHEMA_VERSION  # noqa: F401
from .errors import BuildError, BuildFailed, ConvertError, OutputBusy, RejectsError  # noqa: F401
from .imaging import to_rgb8  # noqa: F401
from .writer import (  # noqa: F401
    SHARD_BYTES, SHARD_SAMPLES, DatasetWriter, Record, Reject, summary_table, write_dataset,
)

SYNTHETIC_SHARD_SAMPLES = 40
"""Images per synthetic train shard: 10 identities, so the default set has 16 train shards, which
split evenly over 1, 2, 4 or 8 ranks x workers (nothing dropped by the epoch plan)."""


def build_synthetic(out, spec=None, *, max_samples: int = SYNTHETIC_SHARD_SAMPLES,
                    max_bytes: int = SHARD_BYTES, overwrite: bool = False, progress: bool = True) -> dict:
    """Build the embedded synthetic dataset into `out`; returns its dataset.json dict."""
    import dataclasses

    from .synthetic import SyntheticSpec, synthetic_records

    spec = spec or SyntheticSpec()
    spec.validate()
    sizes = spec.split_sizes()
    return write_dataset(
        synthetic_records(spec), out, "synthetic",
        total=sum(sizes.values()) * spec.images_per_id, progress=progress,
        max_samples=max_samples, max_bytes=max_bytes, overwrite=overwrite,
        extra={"builder": {"dataset": "synthetic", **dataclasses.asdict(spec)}},
    )


def build_synthetic_pretrain(out, pairs: int = 100_000, *, seed: int = 0, workers: int | None = None,
                             overwrite: bool = False, progress: bool = True) -> dict:
    """Build the synthetic person pre-training corpus (`shards.pretrain`) into `out`: `pairs`
    image-caption pairs, two per image, each image its own pseudo-identity; its dataset.json dict."""
    from .pretrain import PretrainSpec
    from .pretrain import build_synthetic_pretrain as build

    return build(out, PretrainSpec(pairs=pairs, seed=seed), workers=workers, overwrite=overwrite, progress=progress)

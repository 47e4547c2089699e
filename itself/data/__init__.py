"""Data pipelines: identity-aware train batches and eval gallery/queries from WebDataset shards."""

from ..errors import DataError  # noqa: F401
from .catalog import TrainData, dataset_info, image_member, iter_shard  # noqa: F401
from .pipeline import (  # noqa: F401
    EvalImages, EvalTexts, TrainDataset, TrainLoader, ensure_dataset, eval_loaders, split_urls, train_loader,
    train_sources,
)
from .plan import EpochLayout, IdentityTable, epoch_layout, plan_slot  # noqa: F401

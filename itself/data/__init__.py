"""Data pipelines: identity-aware train batches and eval gallery/queries from WebDataset shards."""

from .pipeline import (  # noqa: F401
    EvalImages, EvalTexts, TrainDataset, TrainLoader, ensure_dataset, eval_loaders, load_train_index,
    split_urls, train_loader,
)
from ..errors import DataError  # noqa: F401
from .plan import EpochPlan, ShardIndex, plan_epoch  # noqa: F401

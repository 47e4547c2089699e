"""Data: identity-aware train batches and eval gallery/queries from WebDataset shards.

`sources` (which shards, how many steps an epoch makes), `catalog` (a built dataset: dataset.json,
the manifest, shard samples), `plan` (the epoch plan) and `locations` load no torch: the search
driver and the launchers read datasets through them. `pipeline` (the loaders) and `transforms`
do; the loaders' names below are imported from `pipeline` on first use, so that importing this
package stays torch-free.
"""

import importlib

from ..errors import DataError  # noqa: F401
from .catalog import TrainData, dataset_info, image_member, iter_shard  # noqa: F401
from .plan import EpochLayout, IdentityTable, epoch_layout, plan_slot  # noqa: F401
from .sources import ensure_dataset, split_urls, train_sources  # noqa: F401

_PIPELINE = {"EvalImages", "EvalTexts", "TrainDataset", "TrainLoader", "eval_loaders", "train_loader"}


def __getattr__(name: str):
    if name in _PIPELINE:
        return getattr(importlib.import_module(".pipeline", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

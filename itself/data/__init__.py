"""Data: identity-aware train batches and eval gallery/queries from WebDataset shards.

`sources` (which shards, how many steps an epoch makes), `catalog` (a built dataset: dataset.json,
the manifest, shard samples), `plan` (the epoch plan) and `locations` load no torch: the search
driver and the launchers read datasets through them. `pipeline` (the loaders) and `transforms`
do. Import from the module that defines a name; this package re-exports nothing.
"""

"""SLURM submission of `itself.train.train` with submitit (a thin layer: builds a job around it)."""

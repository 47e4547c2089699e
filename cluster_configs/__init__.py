"""Cluster-facing files, shipped with the package: DeepSpeed configs (`deepspeed/*.json`), SLURM
profiles (`slurm/*.yaml`) and Ray start scripts (`ray/`). Code finds them through `DIR`, so a
non-editable install uses its own copies; users may also pass paths of their own."""

from pathlib import Path

DIR = Path(__file__).resolve().parent
DEEPSPEED = DIR / "deepspeed"
SLURM = DIR / "slurm"

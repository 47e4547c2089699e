"""How many CPU threads a rank uses: the cores of this host shared among its ranks."""

from __future__ import annotations

import os


def apply_cpu_plan(where) -> None:
    """Split this host's cores among its ranks (oversubscription is ruinous); OMP_NUM_THREADS wins."""
    import torch

    local_world = where.local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) \
        or min(where.world_size, os.cpu_count() or 1)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1) // local_world
    torch.set_num_threads(max(1, threads))

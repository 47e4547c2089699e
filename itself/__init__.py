"""ITSELF training and person search."""

import os as _os

# OpenMP threads that spin while they wait burn the cores other jobs (and the rank's other
# threads) need: on a busy 2-core machine (load 9) a training step of the synthetic run took
# 4.5 s with spinning threads and 1.4 s with sleeping ones. libgomp reads the policy once, when
# torch loads it, so it is set on this package's import, before ours imports torch; a value in
# the environment wins. (BENCHMARKS.md, "Threads under load".)
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

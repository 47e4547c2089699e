"""The benchmarks run (--quick) and their comparisons hold: the naive references compute the same
results as ours (search: exact search returns the brute-force results). No timing is asserted
here; bench/README.md and BENCHMARKS.md hold the numbers."""

from __future__ import annotations

import pytest

from runs import run_script


@pytest.mark.parametrize("script,expected", [
    ("bench/eval_bench.py", ["outputs identical: True", "11 fusion weights: identical True"]),
    ("bench/step_bench.py", ["naive reference matches ours", "gradients equal: True", "naive ITSELF (per-sample loops)"]),
    ("bench/loader_bench.py", ["map-style folder of JPEGs", "our shards, pre-resized", "our decode()"]),
    ("bench/plan_bench.py", ["one reader of 64 ranks x 8 workers", "     20000 "]),
    ("bench/search_bench.py", ["exact == brute force: True", "hnsw ef=512 candidates=50", "recall@10 = "]),
])
def test_benchmark_quick_run(script, expected):
    run = run_script(script, ["--quick"])  # (in this process: the imports are paid once)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    for text in expected:
        assert text in run.stdout, text

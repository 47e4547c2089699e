"""The CPU thread policy: threads and loader workers from the cores a process may actually use."""

import os
import subprocess
import sys

import pytest

from itself.cpus import cgroup_quota, parse_cfs, parse_cpu_max, plan_cpus
from itself.layout import data_layout, loader_processes
from runs import REPO, small_run_args, train_env


def test_an_affinity_mask_bounds_the_threads_on_a_bigger_host():
    plan = plan_cpus(affinity={0, 1}, cpu_count=64)
    assert (plan.cores, plan.threads, plan.loader_workers) == (2, 2, 1)
    assert "affinity" in plan.source


def test_a_cgroup_quota_gives_whole_cores_never_fewer_than_one():
    assert parse_cpu_max("150000 100000") == 1.5
    assert parse_cpu_max("max 100000") is None
    assert parse_cfs("-1", "100000") is None and parse_cfs("400000", "100000") == 4
    assert plan_cpus(affinity=set(range(8)), cpu_count=8, quota=parse_cpu_max("150000 100000")).threads == 1
    assert plan_cpus(affinity=set(range(8)), cpu_count=8, quota=parse_cpu_max("50000 100000")).threads == 1
    assert plan_cpus(affinity=set(range(8)), cpu_count=8, quota=parse_cpu_max("max 100000")).threads == 8


def test_slurm_cpus_per_task_is_per_rank_and_not_shared_again():
    plan = plan_cpus(affinity=set(range(16)), cpu_count=16, env={"SLURM_CPUS_PER_TASK": "3"}, local_ranks=4)
    assert (plan.cores, plan.threads, plan.loader_workers) == (3, 3, 2)
    assert plan.source == "SLURM_CPUS_PER_TASK=3"


def test_local_ranks_share_the_cores():
    plan = plan_cpus(affinity={0, 1, 2, 3}, cpu_count=4, local_ranks=2)
    assert (plan.cores, plan.threads, plan.loader_workers) == (2, 2, 1)
    assert plan_cpus(affinity={0, 1, 2}, cpu_count=4, local_ranks=8).threads == 1  # never fewer than one


def test_the_user_overrides_config_first_then_omp_num_threads():
    env = {"OMP_NUM_THREADS": "5"}
    assert plan_cpus(affinity={0, 1}, cpu_count=8, env=env).threads == 5
    plan = plan_cpus(affinity={0, 1}, cpu_count=8, env=env, cpu_threads=7)
    assert (plan.threads, plan.cores, plan.loader_workers) == (7, 2, 1)  # workers still follow the cores
    assert plan.source.startswith("train.cpu_threads=7")
    assert plan_cpus(affinity={0}, cpu_count=8, env={"OMP_NUM_THREADS": ""}).threads == 1


def test_inter_op_threads_stay_few():
    assert plan_cpus(affinity=set(range(4)), cpu_count=4).interop == 1
    assert plan_cpus(affinity=set(range(32)), cpu_count=32).interop == 2


def test_cgroup_quota_read_from_v2_and_v1_files(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_quota(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path) == 3


def test_auto_loader_processes_do_not_change_the_slots():
    layout = data_layout(64, 1, 1, 2, -1, 32)  # auto workers, 32 fixed slots
    assert (layout.num_slots, layout.workers_per_rank) == (32, 8)
    assert [loader_processes(layout, 1, cap) for cap in (0, 1, 3, 7, 8, 64)] == [0, 1, 2, 4, 8, 8]
    default = data_layout(256, 2, 1, 2, -1, 0)  # auto, slots = ranks x 8 whatever the host
    assert default.num_slots == 16 and loader_processes(default, 2, 1) == 1


APPLY = """
import os, torch
from itself.cpus import apply_cpu_plan
os.sched_setaffinity(0, {next(iter(os.sched_getaffinity(0)))})
plan = apply_cpu_plan()
print(plan.threads, torch.get_num_threads(), plan.loader_workers)
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_a_process_pinned_to_one_core_runs_one_thread():
    env = {k: v for k, v in train_env().items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    run = subprocess.run([sys.executable, "-c", APPLY], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["1", "1", "0"]


@pytest.mark.slow
def test_train_cpu_threads_sets_the_threads_of_a_real_run(small_dataset, tmp_path):
    args = small_run_args(small_dataset, "train.cpu_threads=1", "train.epochs=1", "train.max_steps=1",
                          f"run_dir={tmp_path / 'run'}", "train.report_to=none")
    run = subprocess.run([sys.executable, "itself/train.py", *args], cwd=REPO, env=train_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CPU threads: 1 intra-op, 1 inter-op" in run.stdout and "(from train.cpu_threads=1 (" in run.stdout

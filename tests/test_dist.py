"""Rank and world size come from one helper that understands every launcher we support."""

from itself.dist import WorldInfo, world_info_from_env


def test_torchrun_and_deepspeed_launcher_env():
    assert world_info_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == WorldInfo(3, 8, 1)


def test_slurm_env_when_no_launcher_env():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}
    assert world_info_from_env(env) == WorldInfo(5, 16, 1)
    # A launcher inside a SLURM job wins: its RANK/WORLD_SIZE describe the processes it started.
    assert world_info_from_env({**env, "RANK": "0", "WORLD_SIZE": "2"}) == WorldInfo(0, 2, 0)


def test_plain_python_is_a_world_of_one():
    info = world_info_from_env({})
    assert info == WorldInfo(0, 1, 0) and info.is_main

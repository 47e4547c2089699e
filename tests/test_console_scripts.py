"""The installed commands introduce themselves by the names they were run as: `itself-slurm --help`
says `usage: itself-slurm`, while `python launch/slurm.py --help` says `usage: launch/slurm.py`.
Run from the environment's installed console scripts, with this checkout on PYTHONPATH."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from runs import REPO, train_env

SCRIPTS = {"itself-train": None, "itself-slurm": "launch/slurm.py", "itself-tune": "tune/search.py",
           "itself-retrieve": "python -m itself.retrieve", "itself-shards": "python -m shards"}
"""Console script -> how the same command says its name when run from the source (None: as itself)."""


def _help(*cmd: str) -> str:
    run = subprocess.run([*cmd, "--help"], cwd=REPO, env=train_env(PYTHONPATH=str(REPO)), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def _params(scripts):
    """Each command starts as a process of its own: slow, but for `itself-shards`, which starts in a
    second (the others load torch, DeepSpeed or Ray first)."""
    return [pytest.param(s, marks=[] if s == "itself-shards" else [pytest.mark.slow]) for s in scripts]


@pytest.mark.parametrize("script", _params(SCRIPTS))
def test_each_console_script_names_itself(script):
    path = shutil.which(script)
    if path is None:
        pytest.skip(f"{script} is not installed here (pip install -e . installs it)")
    assert _help(path).startswith(f"usage: {script} "), script


@pytest.mark.parametrize("script", _params(s for s, source in SCRIPTS.items() if source))
def test_run_from_the_source_a_command_names_what_was_typed(script):
    source = SCRIPTS[script]
    cmd = [sys.executable, *source.split()[1:]] if source.startswith("python ") else [sys.executable, source]
    out = _help(*cmd)
    assert out.startswith(f"usage: {source} ") and script not in out.splitlines()[0], out[:300]

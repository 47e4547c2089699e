"""The package as users install it: a wheel built from the tracked files, installed (no editable
paths) into a fresh virtual environment that reuses this machine's torch, run from outside the
source tree through its console scripts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from runs import REPO, small_run_args, train_env

SCRIPTS = ("itself-train", "itself-slurm", "itself-tune", "itself-retrieve", "itself-shards")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding only the built wheel; the system's packages (torch, DeepSpeed ...) are
    reachable through a plain path entry, which skips their .pth files and so the development
    checkout's editable-install hook: `import itself` can only find the wheel's copy."""
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, tracked.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(source)],
                   check=True, capture_output=True, timeout=600)
    wheel, = (tmp / "dist").glob("itself_at_scale-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "system-packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                   check=True, capture_output=True, timeout=600)
    return venv


def run_in(venv: Path, cwd: Path, *cmd, check: bool = True) -> subprocess.CompletedProcess:
    env = train_env(PATH=f"{venv / 'bin'}:{train_env()['PATH']}")
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert run.returncode == 0, f"{cmd} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


@pytest.mark.slow
def test_wheel_installs_commands_and_configs_that_train_outside_the_source_tree(installed, small_dataset, tmp_path):
    where = run_in(installed, tmp_path, installed / "bin" / "python", "-c",
                   "import itself, cluster_configs, shards; print(itself.__file__); print(cluster_configs.__file__)")
    assert all(str(installed) in line for line in where.stdout.split()), where.stdout
    for script in SCRIPTS:
        assert "usage" in run_in(installed, tmp_path, installed / "bin" / script, "--help").stdout.lower(), script
    # The packaged DeepSpeed config is the one a ZeRO-2 run reads (a non-editable install has no repo).
    run_dir = tmp_path / "run"
    run_in(installed, tmp_path, installed / "bin" / "itself-train", "--preset", "synthetic",
           *small_run_args(small_dataset, "train.max_steps=1", "train.deepspeed=zero2", f"run_dir={run_dir}"))
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["test"]) == {"global", "grab", "fused"} and (run_dir / "model.safetensors").exists()
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 2
    # Shards build from the installed command too (the embedded synthetic generator is package code).
    out = tmp_path / "built"
    run_in(installed, tmp_path, installed / "bin" / "itself-shards", "build", "--dataset", "synthetic", "--out", out, "--num-ids", "12",
           "--no-progress")
    assert json.loads((out / "dataset.json").read_text())["splits"]["train"]["identities"] == 8

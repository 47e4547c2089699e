"""One error convention for every command: a usage or configuration mistake prints one
`error: ...` line and exits 2, with no traceback and nothing written. (Runtime failures exit 1:
tests/faults/test_nonfinite.py for training, test_build_transactions.py for shard builds,
test_slurm.py for a job sbatch refuses, test_retrieve.py and test_tune.py for theirs.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from runs import REPO, run_main, train_env

COMMANDS = {
    "train": [sys.executable, str(REPO / "itself" / "train.py")],
    "slurm": [sys.executable, str(REPO / "launch" / "slurm.py"), "--dry-run"],
    "tune": [sys.executable, str(REPO / "tune" / "search.py")],
    "retrieve": [sys.executable, "-m", "itself.retrieve"],
    "shards": [sys.executable, "-m", "shards", "build"],
}


FIRST_ARGS = {"train": [], "slurm": ["--dry-run"], "tune": [], "retrieve": [], "shards": ["build"]}
"""What each command's script passes its `main` before the case's arguments."""


def _main(command: str):
    """The command's `main(argv)`: what the in-process cases call."""
    if command == "train":
        from itself.train import main
    elif command == "slurm":
        from launch.slurm import main
    elif command == "tune":
        from tune.search import main
    elif command == "retrieve":
        from itself.retrieve.cli import main
    else:
        from shards.cli import main
    return main


CASES = [
    ("train", ["--bogus"], "unrecognized arguments: --bogus"),
    ("train", ["train.batch_size=7", "--print-config"], "train.batch_size: 7 is not divisible"),
    ("train", ["--preset", "nosuch"], "nosuch"),
    ("train", ["data.root=/nonexistent/data"], "/nonexistent/data/dataset.json not found"),
    ("slurm", ["--bogus"], "unrecognized arguments: --bogus"),
    ("slurm", ["--nodes", "0"], "--nodes must be >= 1"),
    ("slurm", ["--gpus-per-node", "x"], "--gpus-per-node: invalid int value: 'x'"),
    ("slurm", ["train.lr=abc"], "train.lr"),
    ("slurm", ["--config", "/dev/zero"], "--config: /dev/zero is not a regular file"),
    ("slurm", ["train.deepspeed=BADJSON"], "train.deepspeed: BADJSON is not valid JSON"),
    ("slurm", ["--jobs-dir", "AFILE"], "--jobs-dir: AFILE is a file, not a folder"),
    ("slurm", ["run_dir=AFILE"], "run_dir: AFILE is a file, not a folder"),
    ("slurm", ["--profile", "DIRYAML"], "--profile DIRYAML: DIRYAML is not a regular file"),
    ("tune", ["--num-samples", "0"], "--num-samples must be >= 1"),
    ("tune", ["--bogus"], "unrecognized arguments: --bogus"),
    ("tune", ["--config", "/dev/zero"], "--config: /dev/zero is not a regular file"),
    ("tune", ["train.deepspeed=BADJSON"], "train.deepspeed: BADJSON is not valid JSON"),
    ("tune", ["--address", "FREEPORT"], "no Ray cluster answers at FREEPORT within 10 s"),
    ("train", ["--config", "/dev/zero"], "--config: /dev/zero is not a regular file"),
    ("retrieve", ["query", "--index", "/nonexistent/index", "--text", "a man"], "/nonexistent/index"),
    ("retrieve", ["query", "--index", "/nonexistent/index", "--bogus"], "unrecognized arguments: --bogus"),
    ("retrieve", ["index", "--model", "/nonexistent/m.pt", "--gallery", "pipe:touch x", "--out", "OUT"],
     "a command (pipe:) cannot be a gallery"),
    ("retrieve", ["serve", "--index", "/nonexistent/index", "--max-connections", "0"], "--max-connections must be >= 1"),
    ("shards", ["--dataset", "synthetic", "--out", "OUT", "--bogus"], "unrecognized arguments: --bogus"),
    ("shards", ["--dataset", "nope", "--out", "OUT"], "invalid choice: 'nope'"),
    ("shards", ["--dataset", "synthetic", "--out", "OUT", "--num-ids", "-3"], "--num-ids"),
]


def _inputs(tmp_path) -> dict[str, str]:
    """What the cases' placeholders stand for: an output folder that must not appear, a regular
    file where a folder is wanted, a DeepSpeed file that is not JSON, a folder named like a
    profile, and an address where nothing listens."""
    import socket

    (tmp_path / "a_file").write_text("x\n")
    (tmp_path / "bad.json").write_text("{not json\n")
    (tmp_path / "folder.yaml").mkdir()
    with socket.socket() as s:  # (bound, never listening, closed: nothing answers there)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"OUT": str(tmp_path / "out"), "AFILE": str(tmp_path / "a_file"), "BADJSON": str(tmp_path / "bad.json"),
            "DIRYAML": str(tmp_path / "folder.yaml"), "FREEPORT": f"127.0.0.1:{port}"}


def _filled(text: str, inputs: dict[str, str]) -> str:
    for placeholder, value in inputs.items():
        text = text.replace(placeholder, value)
    return text


def _params(cases):
    """The cases as parameters: those that start the script itself (`--bogus`) are slow, but for
    `shards`, which starts in a second (the others load torch, DeepSpeed or Ray first)."""
    return [pytest.param(c, a, m, id=f"{c}:{' '.join(a)[:40]}",
                         marks=[pytest.mark.slow] if "--bogus" in a and c != "shards" else [])
            for c, a, m in cases]


@pytest.mark.parametrize("command,args,message", _params(CASES))
def test_a_mistake_is_one_error_line_and_exit_2(command, args, message, tmp_path):
    inputs = _inputs(tmp_path)
    args, message = [_filled(a, inputs) for a in args], _filled(message, inputs)
    if "--bogus" in args:  # the script itself, as a user starts it (once per command: the rest in-process)
        run = subprocess.run(COMMANDS[command] + args, cwd=tmp_path,
                             env=train_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    else:
        run = run_main(_main(command), FIRST_ARGS[command] + args, env=train_env(PYTHONPATH=str(REPO)), cwd=tmp_path)
    assert run.returncode == 2, f"exit {run.returncode}:\n{run.stderr[-2000:]}"
    assert "Traceback" not in run.stderr and message in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") or ": error: " in last, last  # (argparse's own lines name the program)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("runs"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "bad.json", "folder.yaml"]
    assert (tmp_path / "a_file").read_text() == "x\n"

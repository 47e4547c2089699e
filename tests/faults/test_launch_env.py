"""The launcher's environment and the run directory: a mistake in RANK / WORLD_SIZE / MASTER_* is
one `error:` line within seconds, never a hang; a taken port is named with the fix; two trainings
into one run directory never mix (one writer per folder)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from itself.dist import LaunchError, WorldInfo, world_info_from_env
from runs import REPO, run_main, run_train, small_run_args, train_env, wait_until


@pytest.mark.parametrize("env,message", [
    ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 but WORLD_SIZE=2: ranks are 0..1"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 is out of range"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 is out of range"),
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 but LOCAL_WORLD_SIZE=2"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "SLURM_PROCID=4 but SLURM_NTASKS=4"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4x"}, "SLURM_NTASKS='4x' is not a whole number"),
], ids=["rank-beyond-world", "world-not-a-number", "rank-negative", "world-zero", "rank-alone",
        "local-rank-beyond", "slurm-procid-beyond", "slurm-ntasks-garbled"])
def test_inconsistent_launcher_variables_are_named(env, message):
    with pytest.raises(LaunchError) as info:
        world_info_from_env(env)
    assert message in str(info.value)


def test_consistent_variables_are_read_from_either_launcher():
    assert world_info_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == \
        WorldInfo(1, 4, 1, 2)
    assert world_info_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                "SLURM_NTASKS_PER_NODE": "4"}) == WorldInfo(5, 8, 1, 4)


def _train(args, timeout, **env):
    started = time.monotonic()
    run = subprocess.run([sys.executable, "itself/train.py", *args], cwd=REPO, env=train_env(**env),
                         capture_output=True, text=True, timeout=timeout)
    return run, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("env,message", [
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}, "RANK=3 but WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29999"},
     "MASTER_ADDR='no-such-host.invalid' does not resolve"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not set for a 2-process job"),
], ids=["rank-beyond-world", "port-not-a-number", "address-unresolvable", "no-master"])
def test_a_launch_mistake_fails_the_training_within_seconds(small_dataset, env, message):
    run, took = _train(small_run_args(small_dataset), 120, **env)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().count("\n") == 0 or run.stderr.strip().splitlines()[-1].startswith("error:")
    assert took < 60  # (no rendezvous was waited for: a hang guard, not a speed check)


@pytest.mark.slow
def test_a_taken_master_port_is_named_with_the_fix(small_dataset, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        run, _ = _train(small_run_args(small_dataset, f"run_dir={tmp_path / 'run'}"), 120, **env)
    assert run.returncode == 2 and f"MASTER_PORT {port}" in run.stderr and "is in use" in run.stderr
    assert "--master_port" in run.stderr and "Traceback" not in run.stderr


def test_a_single_process_run_takes_a_free_port_when_the_default_is_taken(small_dataset, tmp_path):
    # Two `deepspeed itself/train.py` on one machine both get MASTER_PORT=29500 from the launcher.
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = run_train(small_run_args(small_dataset, f"run_dir={tmp_path / 'run'}", "train.max_steps=1",
                                       "eval.selection=train"),
                        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert f"MASTER_PORT {port} is in use" in run.stdout + run.stderr
    assert (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_a_second_training_into_the_same_run_dir_is_refused_naming_the_first(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = small_run_args(small_dataset, f"run_dir={run_dir}", "train.epochs=2")
    first = subprocess.Popen([sys.executable, "itself/train.py", *args], cwd=REPO, env=train_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (run_dir / "train.log").exists() or first.poll() is not None, 300, "the first training")
        assert first.poll() is None, first.communicate()[1][-2000:]
        second, took = _train(args + ["train.resume=auto"], 120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"run_dir {run_dir} is in use by another process (pid {first.pid} on {socket.gethostname()}" \
            in second.stderr, second.stderr
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err[-2000:]
    # The first run's records are its own: one start, one test, every step once.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == sorted(set(steps)) and [r["type"] for r in records].count("test") == 1
    assert not (run_dir / ".itself-run.lock").exists()  # (released at the end)


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.slow
def test_ctrl_c_stops_with_the_resume_command_and_no_traceback(small_dataset, tmp_path):
    run_dir = tmp_path / "run"  # (20 epochs: it is interrupted after the first, long before the last)
    args = small_run_args(small_dataset, f"run_dir={run_dir}", "train.epochs=20")
    # Ctrl-C as in a terminal: SIGINT at its default and not blocked, even when the suite runs as a
    # background job of a shell (SIGINT ignored there: Python then never raises KeyboardInterrupt).
    process = subprocess.Popen([sys.executable, "itself/train.py", *args], cwd=REPO, env=train_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    try:  # (interrupted once its first checkpoint is written: the advice then names it)
        wait_until(lambda: (run_dir / "checkpoints" / "latest").exists() or process.poll() is not None, 600,
                   "the first checkpoint")
        running = process.poll() is None
        signals = [line for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
                   if line.startswith("Sig")] if running else []
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130, (f"exit {process.returncode}; running when signalled: {running}; {signals}\n"
                                       f"--- stdout ---\n{out[-1500:]}\n--- stderr ---\n{err[-3000:]}")
    assert "Traceback" not in err and err.strip().endswith("interrupted")
    assert f"rerun the same command with run_dir={run_dir} train.resume=latest" in err


class _SendsCtrlC:
    """Sends this process SIGINT from its finaliser: the KeyboardInterrupt is raised inside
    `__del__` (`raised` says it was), where Python drops it ("Exception ignored"), as when a
    Ctrl-C lands while a checkpoint save frees its objects."""

    raised: list[str] = []

    def __del__(self):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # (handled before os.kill returns)
        except KeyboardInterrupt:
            self.raised.append("in __del__")
            raise


def test_a_ctrl_c_dropped_inside_a_finaliser_still_stops_the_training_at_its_next_step(small_dataset, tmp_path):
    from itself.presets import resolve_config
    from itself.train import train

    dropped, unraisable = [], []

    def drop_a_ctrl_c() -> bool:  # (polled at every log interval: after step 2 here)
        if not dropped:
            dropped.append(_SendsCtrlC())
            dropped[0] = None  # (freed here: its __del__ raises, and Python drops, the KeyboardInterrupt)
        return False

    def main(argv: list[str]) -> int:
        train(resolve_config("synthetic", None, argv), should_stop=drop_a_ctrl_c)
        return 0

    run_dir = tmp_path / "run"
    handler, hook = signal.signal(signal.SIGINT, signal.default_int_handler), sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with pytest.raises(KeyboardInterrupt):
            run_main(main, small_run_args(small_dataset, f"run_dir={run_dir}"))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (the training's handler is gone)
    finally:
        signal.signal(signal.SIGINT, handler)
        sys.unraisablehook = hook
    assert dropped == [None] and _SendsCtrlC.raised == ["in __del__"]
    assert not [u for u in unraisable if isinstance(u.exc_value, KeyboardInterrupt)]  # (quiet: no "Exception ignored")
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "train"]
    assert steps == [2] and not (run_dir / "results.json").exists()  # (2 epochs of 8 steps, had it gone on)
    assert "training failed at step 2 (epoch 1): KeyboardInterrupt" in (run_dir / "train.log").read_text()



def test_keeping_ctrl_c_leaves_the_process_as_it_found_it():
    from itself import interrupts

    handler, hook = signal.signal(signal.SIGINT, signal.default_int_handler), sys.unraisablehook
    try:
        with pytest.raises(KeyboardInterrupt), interrupts.kept():
            os.kill(os.getpid(), signal.SIGINT)  # (raises at once, as Python's own handler does)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and sys.unraisablehook is hook
        interrupts.check()  # (nothing is remembered once it is over)

        def theirs(signum, frame) -> None:  # a caller's own handler: its SIGINT stays its business
            calls.append(signum)

        calls = []
        signal.signal(signal.SIGINT, theirs)
        with interrupts.kept():
            os.kill(os.getpid(), signal.SIGINT)
            interrupts.check()
        assert calls == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is theirs
    finally:
        signal.signal(signal.SIGINT, handler)
        sys.unraisablehook = hook

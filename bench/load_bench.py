"""The default CPU training run on a busy machine: the epoch time of the main job (the synthetic
preset, `itself/train.py` with no arguments) idle and with two CPU-bound processes running
beside it, with this repo's thread policy and with the old behaviour (torch's default thread
count, OpenMP's default spinning wait), in one process.

    python bench/load_bench.py               # 4 runs: policy / old x idle / loaded
    python bench/load_bench.py --busy 4      # four busy processes instead of two

Each run is a real training process on the embedded synthetic set; its first epoch is timed from
the end of step 1 (model built, first step's warm-up done) to the end of the epoch (the `data`
record of metrics.jsonl), then the run is stopped (no evaluation). The busy processes
(`while True: pass`) are started by the benchmark and stopped in a `finally`. "Idle" means
without them: the load average of the machine at the start of each run is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARGS = ["train.log_every=1", "train.report_to=none"]


def command(policy: bool, run_dir: Path) -> tuple[list[str], dict]:
    """The run, and its environment: with the policy, the package is imported first (its OpenMP
    wait policy and thread plan apply); the old way imports torch first with the host's thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if policy:
        return [sys.executable, "-m", "itself.train", *ARGS, f"run_dir={run_dir}"], env
    env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    return [sys.executable, str(REPO / "itself" / "train.py"), *ARGS, f"run_dir={run_dir}"], env


def first_epoch_seconds(policy: bool, timeout: float) -> tuple[float, int]:
    """(seconds of steps 2.. of epoch 0, steps timed) of one run, then the run is stopped."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd, env = command(policy, run_dir)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                records = _records(run_dir / "metrics.jsonl")
                first = next((r for r in records if r["type"] == "train" and r["step"] == 1), None)
                done = next((r for r in records if r["type"] == "data" and r["epoch"] == 0), None)
                if first and done:
                    return done["time"] - first["time"], done["steps"] - 1
                if proc.poll() is not None:
                    raise RuntimeError(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
                time.sleep(0.5)
            raise TimeoutError(f"no epoch within {timeout:.0f} s")
        finally:
            _stop(proc)


def _records(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process and its children (loader workers): its own session, so one killpg."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, default=2, help="CPU-bound processes beside the loaded runs")
    p.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    args = p.parse_args()
    print(f"{os.cpu_count()} cores, affinity {len(os.sched_getaffinity(0))}; synthetic preset, epoch 0 timed "
          f"from step 1's end; loaded = {args.busy} busy processes", flush=True)
    results = {}
    for policy in (True, False):
        name = "policy" if policy else "old"
        for loaded in (False, True):
            load = os.getloadavg()[0]
            hogs = busy(args.busy) if loaded else []
            try:
                seconds, steps = first_epoch_seconds(policy, args.timeout)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
            results[(name, loaded)] = seconds
            print(f"{name:6s} {'loaded' if loaded else 'idle':6s}: {seconds:7.1f} s for {steps} steps "
                  f"({seconds / steps:.2f} s/step; load average {load:.1f} at start)", flush=True)
    for name in ("policy", "old"):
        idle, loaded = results[(name, False)], results[(name, True)]
        print(f"{name:6s} loaded / idle = {loaded / idle:.2f}x")
    print(f"old / policy: idle {results[('old', False)] / results[('policy', False)]:.2f}x, "
          f"loaded {results[('old', True)] / results[('policy', True)]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`tune/search.py --address` against a real Ray cluster of two nodes on this machine (a head and a
worker, each `ray start` in its own process group with its own temp folder and a resource naming
it): trials run on both nodes and their results come back with the node; a trial whose node dies
is retried from its checkpoint on the other; a killed driver resumes with its finished trials kept."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from itself.dist import free_port
from itself.filenames import tag_for
from itself.rundir import RunDir
from runs import REPO, STEPS_PER_EPOCH, small_run_args, train_env, wait_until

pytestmark = pytest.mark.slow

NODES_SCRIPT = """
import json, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
print(json.dumps([{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]))
"""


class RayNodes:
    """Ray nodes started as processes on this host: `head` (1 CPU, resource node_head) and workers
    (1 CPU each, resource node_<name>), token-authenticated with a token of their own. Each node is
    `ray start --block` in a new process group: `kill(name)` ends one node at once (its raylet,
    workers and trials) as a machine failure would; `stop()` ends all of them."""

    def __init__(self, workers: tuple[str, ...] = ("w",)):
        self.root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths must fit
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = train_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
        self.address = f"127.0.0.1:{free_port()}"
        self.names = ("head", *workers)
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            ["ray", "start", "--block", "--num-cpus=1", f"--resources={json.dumps({f'node_{name}': 1})}",
             f"--temp-dir={self.root / name}", "--disable-usage-stats", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> "RayNodes":
        port = self.address.split(":")[1]
        self._start("head", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false")
        wait_until(lambda: self._ready(1), 180, "the Ray head", every=1)
        for name in self.names[1:]:
            self._start(name, f"--address={self.address}")
        wait_until(lambda: self._ready(len(self.names)), 180, "every Ray node to join", every=1)
        return self

    def nodes(self) -> list[dict]:
        try:
            run = subprocess.run([sys.executable, "-c", NODES_SCRIPT, self.address], env=self.env,
                                 capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:  # (the head not answering yet)
            return []
        return json.loads(run.stdout.splitlines()[-1]) if run.returncode == 0 else []

    def _ready(self, count: int) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"ray node {name} exited: {(self.root / f'{name}.log').read_text()[-3000:]}")
        return sum(n["alive"] for n in self.nodes()) >= count

    def node_ids(self) -> dict[str, str]:
        """name -> Ray node id of the live nodes."""
        return {name: n["id"] for n in self.nodes() if n["alive"] for name in self.names
                if f"node_{name}" in n["resources"]}

    def trial_dir(self, name: str, exp: Path) -> Path | None:
        """The folder of a trial of `exp` training on node `name`: of a training process descending
        from that node's `ray start` (its raylet starts the Ray workers that start the trials)."""
        ps = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        procs = {int(pid): (int(ppid), args) for pid, ppid, args in (line.split(None, 2) for line in ps.splitlines())}
        root = self.procs[name].pid
        for pid, (parent, args) in procs.items():
            if "-m itself.train --config" not in args:
                continue
            while parent not in (root, 0, 1) and parent in procs:
                parent = procs[parent][0]
            config = Path(args.split("--config", 1)[1].split()[0])  # <trial>/attempt<n>/seed<s>.yaml
            if parent == root and exp in config.parents:
                return config.parent.parent
        return None

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def cluster():
    """One 2-node cluster for this module's tests, in their order: the last kills its worker node."""
    with RayNodes() as nodes:
        yield nodes


def _search(cluster: RayNodes, tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "tune/search.py", "--address", cluster.address, "--storage-path",
                             str(tmp_path), *args], cwd=REPO, env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    return out


def _still_running(proc: subprocess.Popen) -> bool:
    """True while the search runs; its output as the error when it ended (a wait would be in vain)."""
    if proc.poll() is not None:
        raise AssertionError(f"the search ended (exit {proc.returncode}):\n{proc.stdout.read()[-5000:]}")
    return True


def _ran_on(table: pd.DataFrame, ids: dict[str, str]) -> list[list[str]]:
    """Per trial, the names of the nodes it ran on, in order (from the node ids in its `nodes`)."""
    by_prefix = {node_id[:8]: name for name, node_id in ids.items()}
    return [[by_prefix[place.split("(")[1].rstrip(")")] for place in row.split(" -> ")] for row in table["nodes"]]


def _reports(exp: Path) -> dict[str, list[dict]]:
    """Trial folder -> the results Tune recorded for it (its result.json lines)."""
    return {p.parent.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in exp.glob("run_trial_*/result.json")}


def test_a_killed_driver_resumes_with_its_finished_trials_kept(cluster, small_dataset, tmp_path):
    assert set(cluster.node_ids()) == {"head", "w"}, "the cluster lost a node (the dead-node test runs last)"
    exp = tmp_path / "r"
    args = ["--name", "r", "--num-samples", "3", "--searcher", "random",
            *small_run_args(small_dataset, "train.epochs=2")]
    proc = _search(cluster, tmp_path, *args)

    def finished() -> dict[str, list[dict]]:
        """Trials Tune has both evaluations of and whose run has ended (results.json written)."""
        return {t: rs for t, rs in _reports(exp).items() if rs and rs[-1]["training_iteration"] == 2
                and RunDir(exp / t / "attempt1" / "seed0").file(RunDir.RESULTS).exists()}

    try:
        wait_until(lambda: finished() or proc.poll() is not None, 600, "a finished trial", every=0.2)
        done = finished()
        assert done and proc.poll() is None, "the search ended before it could be killed"
        proc.kill()  # SIGKILL: no chance to save anything
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = _finish(_search(cluster, tmp_path, "--resume", "--name", "r"))
    assert f"resuming: {exp}" in out
    table = pd.read_csv(exp / "results.csv")
    # (2 epochs: the derived first rung is the last evaluation, so ASHA stops nobody)
    assert len(table) == 3 and (table["evaluations"] == 2).all() and table["val_R1_mean"].notna().all()
    after = _reports(exp)
    for trial, reports in done.items():
        # (Tune may report an evaluation again that it had logged but not yet saved: never a new one)
        assert sorted({r["epoch"] for r in after[trial]}) == [r["epoch"] for r in reports], trial
        for attempt in sorted((exp / trial).glob("attempt*"))[1:]:  # its run had ended: no process again
            assert not (attempt / "seed0").exists() and not (attempt / "seed0.log").exists(), f"{trial} ran again"


def test_trials_run_on_both_nodes_and_one_whose_node_dies_is_retried_from_its_checkpoint(cluster, small_dataset,
                                                                                       tmp_path):
    # (The last test of this module: it kills the cluster's worker node.) One trial starts on each
    # node (1 CPU each); the worker node dies under its trial, which finishes on the head.
    epochs = 4  # room to kill the node mid-run once Tune has a report (and its checkpoint) from it
    ids = cluster.node_ids()
    assert set(ids) == {"head", "w"}, ids
    exp = tmp_path / "die"
    proc = _search(cluster, tmp_path, "--name", "die", "--num-samples", "2", "--max-failures", "2",
                   *small_run_args(small_dataset, f"train.epochs={epochs}"))
    try:
        wait_until(lambda: _still_running(proc) and cluster.trial_dir("w", exp), 600,
                   "a trial training on the worker node", every=0.25)
        victim = cluster.trial_dir("w", exp)
        wait_until(lambda: _still_running(proc) and victim.name in _reports(exp) and _reports(exp)[victim.name],
                   600, "Tune to record its first report", every=0.2)
        cluster.kill("w")  # the node dies with its trial running
        out = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    table = pd.read_parquet(exp / "results.parquet")
    assert len(table) == 2 and (table["evaluations"] == epochs).all() and (table["error"] == "").all(), out[-3000:]
    assert table["val_R1_mean"].notna().all() and sorted(places[0] for places in _ran_on(table, ids)) == ["head", "w"]
    moved, stayed = table[table["failures"] > 0], table[table["failures"] == 0]
    assert len(moved) == 1 and _ran_on(moved, ids) == [["w", "head"]] and _ran_on(stayed, ids) == [["head"]]
    assert "(retried)" in moved["failure"].iloc[0]
    trial_id = moved["trial_id"].iloc[0]
    assert victim.name.startswith(f"run_trial_{trial_id}_")
    assert f"trial {trial_id} failed on " in out and "retrying from its last checkpoint" in out
    (failure,) = [json.loads(line) for line in (exp / "failures.jsonl").read_text().splitlines()]
    assert failure["trial_id"] == trial_id and failure["retried"] and failure["after_evaluation"] >= 1, failure
    reports = _reports(exp)[victim.name]
    assert [r["epoch"] for r in reports] == list(range(1, epochs + 1)), "an evaluation was lost or repeated"
    first = [r for r in reports if r["attempt"] == 1]  # (a report in flight when the node died may still count)
    assert 1 <= len(first) < epochs and {r["node_id"] for r in first} == {ids["w"]}
    assert {r["node_id"] for r in reports[len(first):]} == {ids["head"]}
    (resumed,) = [line for line in (victim / "attempt2" / "seed0" / "train.log").read_text().splitlines()
                  if "resumed from" in line]
    checkpoint = victim / "attempt2" / "seed0" / "checkpoints" / tag_for(len(first) * STEPS_PER_EPOCH)
    assert f"resumed from {checkpoint}:" in resumed, "not from the checkpoint of its last recorded evaluation"

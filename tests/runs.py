"""Helpers shared by the tests that run `itself/train.py` as real processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from shards.synthetic import SyntheticSpec as _spec

REPO = Path(__file__).resolve().parents[1]

# The small test dataset: 48 identities -> 32 train / 8 val / 8 test; 2 images x 2 captions = 4 pairs (2 groups of 2) per
# identity; 8 images (4 identities) per shard -> 8 train shards: one per slot at 4 ranks x 2 workers.
SMALL = _spec(num_ids=48, images_per_id=2, captions_per_image=2, image_size=(48, 16), seed=3)
SMALL_SHARD_SAMPLES = 8
STEPS_PER_EPOCH = 8  # 128 train pairs of the small dataset / batch 16


def small_run_args(root, *extra: str) -> list[str]:
    """A CPU-small synthetic run on the small test dataset (fixed data slots: world-size invariant),
    then `extra` overrides (later ones win)."""
    return [f"data.root={root}", "data.image_size=[48,16]", "data.num_workers=0", "data.num_slots=4",
            "model.grab_dim=32", "train.batch_size=16", "train.epochs=2", "train.warmup_epochs=1",
            "eval.batch_size=32", "train.log_every=2", *extra]


def train_env(**extra) -> dict:
    """This environment without a launcher's rank variables (each test sets its own)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.update(extra)
    return env


def wait_until(condition, timeout: float, what: str, every: float = 0.02) -> None:
    """Poll `condition` every `every` seconds until it holds; TimeoutError naming `what` if it
    never does (a hang guard, not a speed check). A condition that starts a process polls seldom:
    the suite's CPUs are its bottleneck."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def run_train(args: list[str], launcher: list[str] | None = None, check: bool = True,
              **env) -> subprocess.CompletedProcess:
    """`itself/train.py ARGS` under `launcher` (`[sys.executable]`: a plain process of its own), or,
    when none is given, run by this process with `env` added to its environment (the same `main`,
    its output captured; the test suite's interpreter and imports are paid once), unless
    ITSELF_TESTS_SUBPROCESS=1 asks for real processes."""
    if launcher is None and os.environ.get("ITSELF_TESTS_SUBPROCESS") != "1":
        run = train_in_process(args, train_env(**env))
        if check:
            assert run.returncode == 0, f"train {' '.join(args)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
        return run
    cmd = (launcher or [sys.executable]) + ["itself/train.py", *args]
    run = subprocess.run(cmd, cwd=REPO, env=train_env(**env), capture_output=True, text=True, timeout=600)
    if check:
        assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return run


@contextlib.contextmanager
def _environment(env: dict):
    """os.environ replaced by `env` for the duration."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_main(main, argv: list[str], env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """A command's `main(argv)` run by this process as its script would run: the environment
    `env` (default: `train_env()`), the folder `cwd` (default: the repository), exit code, stdout
    and stderr as a process's (an exception that escapes is exit 1 with its traceback on stderr,
    as the interpreter would print it; argparse's exits keep their codes)."""
    import io
    import traceback
    from contextlib import redirect_stderr, redirect_stdout

    from itself import logs

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    with _environment(train_env() if env is None else env), redirect_stdout(out), redirect_stderr(err):
        os.chdir(cwd or REPO)
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - reported as the process would report it
            traceback.print_exc()
            code = 1
        finally:
            os.chdir(here)
            logs.reset()
    return subprocess.CompletedProcess([getattr(main, "__module__", "main"), *map(str, argv)], code,
                                       out.getvalue(), err.getvalue())


def run_script(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGV` (a path under the repository) run by this process, as `__main__` with
    its `sys.argv`, through `run_main`."""
    import runpy

    path = str(REPO / script)

    def main(args: list[str]) -> int:
        saved = sys.argv
        sys.argv = [path, *args]
        try:
            runpy.run_path(path, run_name="__main__")
        finally:
            sys.argv = saved
        return 0

    return run_main(main, argv)


def train_in_process(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`python itself/train.py ARGS` run by this process (in `env`, default: `train_env()`)."""
    from itself.train import main

    return run_main(main, args, env=env)


def plant_undecodable_image(root: Path, split: str, shard_name: str, index: int) -> int:
    """Overwrite the image bytes of a shard's index-th sample with an undecodable JPEG of the same
    length, and record its digest in the manifest, as if the build had written it so (the shard's
    layout, hence the manifest's byte ranges, stay valid); returns its image_id."""
    import hashlib
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards import schema

    path = Path(root) / split / shard_name
    with tarfile.open(path) as t:
        member = [m for m in t.getmembers() if m.name.endswith(".jpg")][index]
    garbage = b"\xff\xd8\xff\xe0" + bytes(member.size - 4)
    data = bytearray(path.read_bytes())
    data[member.offset_data:member.offset_data + member.size] = garbage
    path.write_bytes(bytes(data))
    key = member.name.split(".")[0]
    manifest = pq.read_table(Path(root) / schema.MANIFEST_FILE)
    digests = [hashlib.sha256(garbage).hexdigest() if k == key else d
               for k, d in zip(manifest["key"].to_pylist(), manifest["sha256"].to_pylist())]
    manifest = manifest.set_column(manifest.schema.get_field_index("sha256"), "sha256", pa.array(digests))
    pq.write_table(manifest, Path(root) / schema.MANIFEST_FILE)
    return int(key)


# Credentials a user's environment may hold; runs get them and must not write them anywhere.
SECRETS = {"AWS_SECRET_ACCESS_KEY": "itself-test-secret-aws-7f3a", "HF_TOKEN": "itself-test-secret-hf-91c2",
           "WANDB_API_KEY": "itself-test-secret-wandb-5d08"}


def assert_no_secrets(folder: Path) -> None:
    """No file under `folder` (text or binary, pickles included) holds a value of SECRETS."""
    files = [p for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink()]
    assert files, f"nothing written under {folder}"
    for path in files:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{path} holds ${name}"


class RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint would do): it touches `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))

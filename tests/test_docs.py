"""The docs name what exists: every repository path, test, module path, command-line flag, config
key and output file name that README.md, RELIABILITY.md and docs/*.md cite in backticks is found in
the code. (A newcomer follows them literally; a renamed flag or file must fail here, not there.)"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import re
from pathlib import Path

import pytest

from runs import REPO

DOCS = [REPO / "README.md", REPO / "RELIABILITY.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted(REPO.glob("cluster_configs/*/README.md")), REPO / "bench" / "README.md"]
PACKAGES = ("itself", "shards", "launch", "tune", "cluster_configs")
TOP = ("itself/", "shards/", "launch/", "tune/", "tests/", "bench/", "cluster_configs/", "docs/", ".ci/")
PLACEHOLDER = re.compile(r"<|>|\*|\{|\.\.\.|\bNAME\b|NNN|UUU|\bN\b")

EXAMPLES = {"cluster_configs/slurm/mycluster.yaml"}
"""Paths the docs ask the user to create."""
OTHER_TOOLS_FLAGS = {
    "--num_gpus", "--hostfile", "--nproc_per_node", "--log_level", "--master_port",  # deepspeed, torchrun
    "--requeue", "--signal",  # sbatch
    "--index-url", "--logdir", "--inspect", "--head", "--port", "--object-store-memory",  # pip, tensorboard, ray
    "--resolution", "--extra", "--python",  # uv
    "--only_global",  # the reference code's run.sh
    "--help", "--bogus",  # argparse's own; the docs' example of an unknown option
    "--dist", "--maxprocesses", "--durations",  # pytest and pytest-xdist
}
"""Flags of the other programs the docs show (DeepSpeed's and torchrun's launchers, sbatch, pip ...)."""
NOT_MODULES = {"itself.schema_version"}
"""Dotted names that are not Python paths: the manifest's Parquet metadata key."""
THIRD_PARTY_FILES = {"ViT-B-16.pt", "mp_rank_00_model_states.pt", "tuner.pkl"}
"""File names other software writes: OpenAI's CLIP weights, DeepSpeed's checkpoint, Tune's state."""


@functools.lru_cache(maxsize=None)
def spans() -> list[tuple[str, str, int, str]]:
    """(doc name, line number, line, span) for every backticked span outside code blocks."""
    found = []
    for doc in DOCS:
        fenced = False
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                found += [(doc.name, number, line, m.group(1)) for m in re.finditer(r"`([^`\n]+)`", line)]
    return found


@functools.lru_cache(maxsize=None)
def code_text() -> str:
    """Every Python file of the packages and the benchmarks, concatenated (not the tests: a test
    may name what the code no longer writes, such as an old format's files)."""
    files = [p for d in (*PACKAGES, "bench") for p in sorted((REPO / d).rglob("*.py"))]
    return "\n".join(p.read_text() for p in files)


def _where(doc: str, number: int) -> str:
    return f"{doc}:{number}"


def test_repository_paths_exist():
    missing = []
    for doc, number, _, span in spans():
        path = span.split()[0].split("::")[0]
        if not path.startswith(TOP) or PLACEHOLDER.search(path) or path in EXAMPLES:
            continue
        if not (REPO / path).exists():
            missing.append(f"{_where(doc, number)}: {path}")
    assert not missing, "\n".join(missing)


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_cited_tests_exist():
    missing, checked = [], 0
    for doc, number, line, span in spans():
        for file, name in re.findall(r"(?:((?:faults/)?test_\w+\.py)|^)::(test_\w+)(?!\w*\.\.\.)", span):
            if not file:  # `::name` continues the file named before it on the same line
                before = re.findall(r"((?:faults/)?test_\w+\.py)::", line[: line.index(span)])
                file = before[-1] if before else ""
            path = REPO / "tests" / file
            checked += 1
            if not file or not path.exists() or name not in _test_names(path):
                missing.append(f"{_where(doc, number)}: {file}::{name}")
    assert checked > 50 and not missing, "\n".join(missing)


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
                if attr not in fields:
                    return False
                return True
            obj = getattr(obj, attr)
        return True
    return False


def test_module_paths_resolve():
    missing = []
    for doc, number, _, span in spans():
        for dotted in re.findall(r"(?<![\w/.])((?:itself|shards|launch|tune)(?:\.\w+)+)", span):
            if dotted not in NOT_MODULES and not dotted.endswith(".py") and not _resolves(dotted):
                missing.append(f"{_where(doc, number)}: {dotted}")
    assert not missing, "\n".join(missing)


def test_command_line_flags_are_ours_or_named_as_another_programs():
    missing = []
    for doc, number, _, span in spans():
        for flag in re.findall(r"(?:^|[\s\[(])(--[a-z][\w-]*)", span):
            name = flag.removeprefix("--no-") if flag.startswith("--no-") else flag
            if name in OTHER_TOOLS_FLAGS or f'"{name}"' in code_text() or f'"--{name[2:]}"' in code_text():
                continue
            missing.append(f"{_where(doc, number)}: {flag}")
    assert not missing, "\n".join(missing)


def _config_fields() -> dict[str, set[str]]:
    from itself.config import Config

    cfg = Config()
    return {s: {f.name for f in dataclasses.fields(getattr(cfg, s))} for s in ("data", "model", "train", "eval")}


def test_config_keys_exist():
    fields, missing = _config_fields(), []
    for doc, number, _, span in spans():
        for section, key in re.findall(r"(?<![\w/.-])(data|model|train|eval)\.(\w+)(?![\w(])", span):
            if key not in fields[section] and key not in ("pt", "log", "py", "safetensors"):  # (model.pt ...)
                missing.append(f"{_where(doc, number)}: {section}.{key}")
    assert not missing, "\n".join(missing)


OUTPUT = re.compile(r"^[\w.-]+\.(?:json|jsonl|yaml|parquet|csv|png|pt|safetensors|log|faiss|npy|lock|pkl)$")


def test_file_names_are_written_or_read_by_the_code():
    missing = []
    for doc, number, _, span in spans():
        name = span.strip()
        if not OUTPUT.match(name) or PLACEHOLDER.search(name) or name in THIRD_PARTY_FILES:
            continue
        if name not in code_text():
            missing.append(f"{_where(doc, number)}: {name}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("check", [test_repository_paths_exist, test_file_names_are_written_or_read_by_the_code])
def test_the_checks_fail_on_a_wrong_name(check, monkeypatch):
    # The checks themselves: a doc citing a path or file that does not exist is caught.
    wrong = [("README.md", 1, "`tune/nosuch.py` `nosuch_results.json`", "tune/nosuch.py"),
             ("README.md", 1, "`tune/nosuch.py` `nosuch_results.json`", "nosuch_results.json")]
    monkeypatch.setattr(__import__(__name__), "spans", lambda: wrong)
    with pytest.raises(AssertionError, match="nosuch"):
        check()

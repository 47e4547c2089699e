"""Every third-party import is declared in pyproject.toml, where its code needs it: training, the
data tools and evaluation with the core dependencies alone; `launch/` with [slurm], `tune/` with
[tune]; the tests and benchmarks with [dev]. The floors themselves are checked by installing them
(docs/DEPENDENCIES.md)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from runs import REPO

tomllib = pytest.importorskip("tomllib")  # (Python >= 3.11)

# Import name -> distribution name, where they differ.
DISTRIBUTION = {"open_clip": "open_clip_torch", "PIL": "pillow", "yaml": "pyyaml", "faiss": "faiss-cpu",
                "tensorboardX": "tensorboardx", "websocket": "websocket-client"}
OURS = {"itself", "shards", "launch", "tune", "bench", "cluster_configs"}
# Where each folder's code may reach: the core, plus these extras.
EXTRAS_OF = {"itself": ("search", "wandb"), "shards": (), "launch": ("slurm",), "tune": ("tune",),
             "tests": ("dev",), "bench": ("dev",)}
# The library's function-level imports of an extra, each where one feature needs it: a module, or
# a package (its own .py or any file under its folder) -> the extra its functions may import.
OPTIONAL = {"itself/rundir.py": "wandb", "itself/retrieve": "search"}


def _optional_extra(rel: str) -> str | None:
    """The extra that the functions of the file `rel` (POSIX, from the repository root) may import."""
    for prefix, extra in OPTIONAL.items():
        if rel == prefix or rel.startswith(prefix.removesuffix(".py") + "/") or rel == prefix + ".py":
            return extra
    return None


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared() -> dict[str, set[str]]:
    """Extra ("" for the core) -> distribution names it installs (self-references expanded)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    raw = {"": project["dependencies"], **project["optional-dependencies"]}
    out: dict[str, set[str]] = {}

    def expand(extra: str) -> set[str]:
        if extra not in out:
            names = set()
            for req in raw[extra]:
                if _name(req) == _name(project["name"]):
                    for sub in re.search(r"\[(.*)\]", req).group(1).split(","):
                        names |= expand(sub.strip())
                else:
                    names.add(_name(req))
            out[extra] = names
        return out[extra]

    for extra in raw:
        expand(extra)
    return out


def third_party_imports(path: Path, local: set[str]) -> dict[str, bool]:
    """Top-level third-party module -> whether some import of it is at module level."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        for name in (n.split(".")[0] for n in names):
            if name and name not in sys.stdlib_module_names and name not in OURS and name not in local:
                found[name] = found.get(name, False) or id(node) not in nested
    return found


def sources(folder: str):
    return sorted((REPO / folder).rglob("*.py"))


def test_every_import_is_declared_where_its_code_runs():
    deps = declared()
    core = deps[""]
    test_helpers = {p.stem for p in (REPO / "tests").rglob("*.py")}
    missing = []
    for folder, extras in EXTRAS_OF.items():
        allowed = core.union(*(deps[e] for e in extras))
        for path in sources(folder):
            for module in third_party_imports(path, test_helpers):
                if DISTRIBUTION.get(module, module).lower().replace("_", "-") not in allowed:
                    missing.append(f"{path.relative_to(REPO)}: {module}")
    assert not missing, "imported but not declared for that code: " + ", ".join(missing)


def test_training_and_the_data_tools_need_only_the_core():
    deps = declared()
    core = deps[""]
    outside = []
    for path in [*sources("itself"), *sources("shards")]:
        rel = path.relative_to(REPO).as_posix()
        extra = _optional_extra(rel)
        for module, top_level in third_party_imports(path, set()).items():
            distribution = DISTRIBUTION.get(module, module).lower().replace("_", "-")
            if distribution in core:
                continue
            if top_level or extra is None or distribution not in deps[extra]:
                outside.append(f"{rel}: {module}{' (module level)' if top_level else ''}")
    assert not outside, "the library imports beyond the core dependencies: " + ", ".join(outside)


def test_every_declared_dependency_has_a_floor():
    for extra, reqs in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"].items():
        for req in reqs:
            assert ">=" in req or req.startswith("itself-at-scale["), f"[{extra}] {req}: no floor"
    for req in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        assert ">=" in req, f"{req}: no floor"


def test_optional_imports_are_matched_by_module_or_package():
    assert _optional_extra("itself/rundir.py") == "wandb"
    assert _optional_extra("itself/retrieve.py") == "search"  # a module today,
    assert _optional_extra("itself/retrieve/index.py") == "search"  # or a package
    assert _optional_extra("itself/retrieve/__init__.py") == "search"
    assert _optional_extra("itself/retriever.py") is None
    assert _optional_extra("itself/train.py") is None
    assert _optional_extra("itself/rundir/x.py") == "wandb"

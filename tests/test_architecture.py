"""The shape of the code: imports only go down (shards <- itself <- launch, tune), with no cycle
inside a package, not even through function-level imports, and every module imports first."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from runs import REPO, STEPS_PER_EPOCH, small_run_args, train_env

PACKAGES = ("shards", "itself", "launch", "tune")
LAYER = {"shards": 0, "itself": 1, "launch": 2, "tune": 2}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """The project modules `name` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from . import x` imports the module x when there is one, else names of the package
            candidates = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known] or [base]
        else:
            continue
        for target in candidates:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_anywhere():
    # A package's __init__ re-exporting its own modules is how a package works, not a cycle: its
    # modules must simply not import the package back.
    edges = graph()
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_check_finds_a_function_level_cycle(tmp_path):
    # The check itself: the cycle this project once had (config -> model -> checkpoint -> config),
    # hidden in function-level imports, is found.
    known = {"p.config": tmp_path / "config.py", "p.model": tmp_path / "model.py", "p.checkpoint": tmp_path / "ck.py"}
    known["p.config"].write_text("def f():\n    from .model import M\n")
    known["p.model"].write_text("from .checkpoint import safe_load\n")
    known["p.checkpoint"].write_text("def g():\n    from . import config\n")
    edges = {n: imports_of(n, p, known) for n, p in known.items()}
    assert find_cycle(edges) == ["p.checkpoint", "p.config", "p.model", "p.checkpoint"]


def test_imports_only_go_down_the_layers():
    for name, targets in graph().items():
        for target in targets:
            a, b = name.split(".")[0], target.split(".")[0]
            assert LAYER[b] <= LAYER[a] and (LAYER[b] < LAYER[a] or a == b), f"{name} imports {target}"
    for path in (REPO / "itself").rglob("*.py"):  # the library never needs the launchers' stacks
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not names & {"ray", "submitit", "launch", "tune"}, path


# Inside `itself/`, lowest first (docs/ARCHITECTURE.md's table): a module imports only modules of
# lower layers, or of its own group (the modules of one subpackage: data/, model/, retrieve/).
ITSELF_LAYERS = [
    {"errors"},
    {"logs", "safeio", "archs", "cpus", "filenames", "fusion", "interrupts"},
    {"dist", "layout", "paths"},
    {"config", "metrics", "collectives"},
    {"records", "losses", "data"},
    {"checkpoint", "model"},
    {"rundir", "engine", "evaluate", "panels", "meter", "nonfinite"},
    {"presets", "outcome", "resume"},
    {"train"},
    {"retrieve"},
]


def itself_group(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "itself" and len(parts) > 1 else None


def test_inside_itself_imports_only_go_down_the_layer_table():
    layer = {group: i for i, groups in enumerate(ITSELF_LAYERS) for group in groups}
    groups = {itself_group(m) for m in modules()} - {None}
    assert groups == set(layer), f"modules missing from ITSELF_LAYERS: {sorted(groups - set(layer))}; " \
                                 f"listed but gone: {sorted(set(layer) - groups)}"
    for name, targets in graph().items():
        source = itself_group(name)
        for target in targets:
            to = itself_group(target)
            if source is None or to is None or to == source:
                continue
            assert layer[to] < layer[source], f"{name} (layer {layer[source]}) imports {target} (layer {layer[to]})"


# One interpreter checks both, in this order: first what loads without torch (nothing has loaded it
# yet), then every module imported first (torch, once loaded, stays; our modules are forgotten).
FRESH_INTERPRETER = """
import importlib, sys
tmp, names, light = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
for name in light:
    importlib.import_module(name)
from launch import slurm
code = slurm.main(["--nodes", "4", "--dry-run", "--jobs-dir", tmp])  # (the whole check a submission makes, config to sbatch script)
print("dry run exit", code, "torch loaded:", "torch" in sys.modules)
from itself.presets import resolve_config
from tune import rungs
cfg = resolve_config("synthetic", None, sys.argv[4].split("\\n"))  # (what a search's driver counts)
print("steps per epoch", rungs.steps_per_epoch(cfg, 1), "torch loaded:", "torch" in sys.modules)
from itself.config import ModelConfig
from itself.data.transforms import Tokenizer
from itself.model import ITSELF
models = [ITSELF(ModelConfig(arch=arch, pretrained="", mars_layers=(1, 3)), num_ids=4, image_size=(64, 32))
          for arch in ("tiny", "ViT-S-32")]
ids = Tokenizer()("A man in a blue shirt")
print("built; loaded:", sorted({m.split(".")[0] for m in sys.modules} & {"open_clip", "torchvision", "timm"}), int(ids[0]))
ours = lambda m: m.split(".")[0] in ("shards", "itself", "launch", "tune")
for name in names:  # (ours are all forgotten before each: the order of `names` cannot matter)
    for loaded in [m for m in sys.modules if ours(m)]:
        del sys.modules[loaded]
    importlib.import_module(name)
print("imported", len(names), "modules, each first")
"""
LIGHT = ["launch.slurm", "launch.job", "launch.convert", "tune.search", "tune.trial", "itself.rundir",
         "itself.presets", "itself.records"]


def every_module() -> list[str]:
    return sorted(m for m in modules() if not m.endswith(".__main__"))  # (those run a command)


@pytest.fixture(scope="module")
def fresh_interpreter(tmp_path_factory, small_dataset) -> subprocess.CompletedProcess:
    """FRESH_INTERPRETER's run (the two tests below share an xdist group, hence one run)."""
    return subprocess.run([sys.executable, "-c", FRESH_INTERPRETER, str(tmp_path_factory.mktemp("jobs")),
                           ",".join(every_module()), ",".join(LIGHT), "\n".join(small_run_args(small_dataset))],
                          cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.xdist_group("fresh_interpreter")
def test_every_module_imports_first(fresh_interpreter):
    assert fresh_interpreter.returncode == 0, fresh_interpreter.stderr[-3000:]
    assert f"imported {len(every_module())} modules" in fresh_interpreter.stdout


@pytest.mark.xdist_group("fresh_interpreter")
def test_a_submission_and_tunes_workers_start_without_torch_and_a_model_without_open_clip(fresh_interpreter):
    # Importing torch costs seconds of CPU: a submission, a dry run, a search's driver (it counts an
    # epoch's steps from the manifest) and each Ray worker of a search read configs, datasets and
    # run folders, and load none of it (BENCHMARKS.md: the dry run went from 3.3 s to 0.6 s).
    # Importing open_clip loads torchvision and timm, ~4 CPU-s more in every process that builds a
    # model or tokenises: the backbone and the tokenizer read open_clip's files instead.
    assert "dry run exit 0 torch loaded: False" in fresh_interpreter.stdout, (
        fresh_interpreter.stdout[-2000:] + fresh_interpreter.stderr[-3000:])
    assert f"steps per epoch {STEPS_PER_EPOCH} torch loaded: False" in fresh_interpreter.stdout, (
        fresh_interpreter.stdout[-2000:] + fresh_interpreter.stderr[-3000:])
    assert "built; loaded: [] 49406" in fresh_interpreter.stdout, fresh_interpreter.stdout[-2000:]

"""The typed records that cross module boundaries: an evaluation, one evaluation as metrics.jsonl
holds it, the results of a run (results.json, written and read through `Results` only), and an
interrupted run. Plain data, nothing that runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import ConfigError
from .fusion import fused_at


def _from_dict(cls, values: dict):
    """An instance of the dataclass `cls` from the known keys of `values` (unknown ones ignored:
    files written by newer or older versions stay readable)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclasses.dataclass
class Counts:
    """The sizes of an evaluated split."""

    gallery: int
    """Gallery images embedded."""
    queries: int
    """Caption queries embedded."""
    gallery_skipped: int = 0
    """Gallery images listed in dataset.json but undecodable (skipped, never silently)."""


@dataclasses.dataclass
class Evaluation:
    """What `itself.evaluate.evaluate` returns on rank 0: per GRAB token choice evaluated, its
    metrics ({"global", "grab", "fused@a" ...}, see `itself.metrics.fused_metrics`)."""

    counts: Counts
    selections: dict[str, dict]
    embeddings: tuple | None = None
    """(queries, gallery) embeddings, when asked for (the retrieval panels read them)."""


@dataclasses.dataclass
class EvalRecord:
    """One evaluation as metrics.jsonl holds it."""

    split: str
    epoch: int
    """0-based epoch after which it ran."""
    step: int
    """Optimizer steps taken when it ran (the checkpoint of that step holds the evaluated weights)."""
    fusion_weight: float
    """The weight a chosen on this evaluation (on val) or carried from val (on test)."""
    metrics: dict
    """{"global", "grab", "fused@a" ...} of the chosen selection (`itself.metrics.fused_metrics`)."""
    selection: str = "train"
    """Which tokens GRAB embedded (`train` or `last_layer@<ratio>`), chosen on val."""
    candidates: dict = dataclasses.field(default_factory=dict)
    """Per selection evaluated: its best fused R1 / mAP and weight (how the choice was made)."""
    counts: dict = dataclasses.field(default_factory=dict)
    """Gallery and query sizes, and gallery images skipped as undecodable."""

    @property
    def fused(self) -> dict:
        """The metrics at the chosen fusion weight (the global ones for a global-only model)."""
        return fused_at(self.metrics, self.fusion_weight)

    @property
    def score(self) -> tuple[float, float]:
        """(R1, mAP) at the chosen weight: what "best" compares."""
        return self.fused["R1"], self.fused["mAP"]

    @property
    def branches(self) -> dict:
        """{"global", "grab", "fused"} rows at the chosen weight (as results.json reports them)."""
        return branches(self.metrics, self.fusion_weight)

    @classmethod
    def from_record(cls, record: dict) -> "EvalRecord":
        return _from_dict(cls, record)

    def to_record(self) -> dict:
        return dataclasses.asdict(self)


def branches(metrics: dict, a: float) -> dict:
    """{"global", "grab", "fused"} rows of a selection's results at fusion weight a."""
    return {"global": metrics["global"], **({"grab": metrics["grab"], "fused": fused_at(metrics, a)}
                                           if "grab" in metrics else {})}


@dataclasses.dataclass
class Results:
    """results.json: what a finished run reports. The keys are the field names."""

    run_dir: str = ""
    best_epoch: int | None = None
    """1-based epoch of the evaluation chosen on val."""
    checkpoint: str = ""
    """The checkpoint folder that evaluation's weights are in (checkpoints/<it>)."""
    fusion_weight: float = 1.0
    selection: str = "train"
    selection_candidates: dict = dataclasses.field(default_factory=dict)
    val: dict = dataclasses.field(default_factory=dict)
    """{"global", "grab", "fused"} on val at the chosen weight and selection."""
    test: dict = dataclasses.field(default_factory=dict)
    """The same on test, computed with the exported weights (model.pt)."""
    test_counts: dict = dataclasses.field(default_factory=dict)
    test_chance_R1: float | None = None
    """R@1 of a random ranking of the test gallery (None: data.root has no test split, as a
    pre-training corpus; its tests are `test_datasets`)."""
    test_datasets: dict = dataclasses.field(default_factory=dict)
    """{data root: {"metrics", "counts"}} of `eval.test_roots` (cross-dataset or zero-shot tables)."""
    model: str = ""
    """The exported model file."""
    init_from: dict | None = None
    """Where the weights started (`model.init_from`): {"path", "sha256"}; None for a fresh start."""
    zero_shot: dict | None = None
    """With `model.init_from`: test metrics of the initial weights before any fine-tuning step."""
    best_step: int | None = None
    """Optimizer steps taken at the chosen evaluation."""

    FILE = "results.json"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "results.json") -> "Results":
        try:
            values = json.loads(text)
            if not isinstance(values, dict):
                raise ValueError("not a JSON object")
            return _from_dict(cls, values)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: not a results file of a finished run ({e})") from None

    @classmethod
    def read(cls, path: str | Path) -> "Results":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: the run {path.parent} has not finished") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
        return cls.from_json(text, str(path))


@dataclasses.dataclass
class Interrupted:
    """What `train` returns when a stop was requested (pre-emption): the checkpoint it saved."""

    run_dir: str
    global_step: int
    checkpoint: str
    interrupted: bool = True

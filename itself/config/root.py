"""The whole config: its sections, `name`, `run_dir`, `seed`, and the checks across sections."""

from __future__ import annotations

import dataclasses
import math

from ..errors import ConfigError
from ..layout import DataLayout, data_layout
from .data_section import DataConfig
from .model_section import ModelConfig
from .train_section import EvalConfig, TrainConfig
from .values import NAME, short_repr, spec_or_error

SECTIONS = ("data", "model", "train", "eval")


@dataclasses.dataclass
class Config:
    name: str = "synthetic"
    """Run name (the preset's name by default); the run directory is named after it."""
    run_dir: str = ""
    """Where this run writes; "" = runs/<name>-<timestamp>."""
    seed: int = 0
    """Seeds model initialisation, data order and augmentation."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def layout(self, world_size: int) -> DataLayout:
        """How the global batch splits over `world_size` ranks (a ConfigError if it cannot)."""
        t, d = self.train, self.data
        return data_layout(t.batch_size, world_size, t.grad_accum, d.num_instance, d.num_workers, d.num_slots)

    def validate(self, world_size: int = 1) -> None:
        """Check every field and the combinations that would fail later; the message names the field."""
        for section in SECTIONS:
            for f in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{section}.{f.name}: must be a finite number, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed: must be in [0, 2^63), got {self.seed}")
        if not NAME.fullmatch(self.name) or len(self.name) > 200:
            raise ConfigError(f"name: must be letters, digits, '.', '_' or '-' not starting with '.' or '-' "
                              f"(it names the run folder and jobs), got {short_repr(self.name)}")
        self.data.validate()
        self.model.validate()
        spec = spec_or_error(self.model.arch)
        if self.data.text_length > spec.context_length:
            raise ConfigError(f"data.text_length: must be <= {spec.context_length}, the text context of model.arch "
                              f"{self.model.arch}, got {self.data.text_length}")
        if min(self.data.image_size) < spec.patch_size:
            raise ConfigError(f"data.image_size: must be at least {spec.patch_size} x {spec.patch_size}, the patch "
                              f"size of model.arch {self.model.arch}, got {self.data.image_size}")
        if not 0 <= self.model.patch_stride <= spec.patch_size:
            raise ConfigError(f"model.patch_stride: must be in 0..{spec.patch_size} (0 = the patch size of model.arch "
                              f"{self.model.arch}; a larger stride leaves pixels unseen), got {self.model.patch_stride}")
        self.train.validate()
        self.layout(world_size)
        self.eval.validate()

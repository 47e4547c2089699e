"""Typed configuration. Each field's docstring is its documentation; `validate()` names the field
at fault. The dataclass defaults are the paper's settings (the `synthetic` preset changes what a
CPU needs); every default lives here once.

One module per section (`data_section`, `model_section`, `train_section`: train and eval), the
whole `Config` (`root`), the values fields accept (`values`), and files and overrides in and out
(`files`). This package sits low in the import graph: it knows the names the model and the
trainer accept (selection strategies, ATS modes, architectures) but imports neither.
"""

from ..errors import ConfigError
from .data_section import DataConfig
from .files import (apply_dict, apply_overrides, config_yaml, deepspeed_file, describe, field_docs, from_dict,
                    load_yaml, read_config_text, set_value, to_dict)
from .model_section import ModelConfig
from .root import SECTIONS, Config
from .train_section import EvalConfig, TrainConfig
from .values import (ATS_MODES, DEEPSPEED_CONFIGS, EVAL_SELECTIONS, MAX_ITEMS, NAME, NONFINITE_POLICIES, REPORT_TO,
                     SCHEDULES, SELECTION_STRATEGIES, T_SMALL)

__all__ = ["ATS_MODES", "DEEPSPEED_CONFIGS", "EVAL_SELECTIONS", "MAX_ITEMS", "NAME", "NONFINITE_POLICIES", "REPORT_TO",
           "SCHEDULES", "SECTIONS", "SELECTION_STRATEGIES", "T_SMALL", "Config", "ConfigError", "DataConfig",
           "EvalConfig", "ModelConfig", "TrainConfig", "apply_dict", "apply_overrides", "config_yaml", "deepspeed_file", "describe",
           "field_docs", "from_dict", "load_yaml", "read_config_text", "set_value", "to_dict"]

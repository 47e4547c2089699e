"""Configs in and out: YAML files and `key=value` overrides into a Config, a Config into YAML, every
field's documentation."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

from ..errors import ConfigError
from .root import SECTIONS, Config
from .values import DEEPSPEED_CONFIGS, MAX_ITEMS, short_repr


def read_config_text(path: str | os.PathLike, what: str) -> str:
    """The text of a small YAML / JSON file a user named (`what`: the flag or field), or a
    ConfigError saying why not: missing, not a regular file (a folder, /dev/zero, a FIFO: never
    opened), over 1 MiB, unreadable or not UTF-8."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what}: {path} is not a regular file; give a YAML or JSON file")
        if info.st_size > 1 << 20:
            raise ConfigError(f"{what}: {path} is {info.st_size} bytes; a config is at most 1 MiB")
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def deepspeed_file(deepspeed: str) -> dict:
    """The cluster file `train.deepspeed` names (a name in cluster_configs/deepspeed/, or a .json
    path): a ConfigError naming it when it is missing, unreadable or not a JSON object. Launchers
    call it before submitting, so a bad file is found on the login node."""
    path = Path(deepspeed) if deepspeed.endswith(".json") else DEEPSPEED_CONFIGS / f"{deepspeed}.json"
    if not path.exists():  # (names are checked by Config.validate; a path may be missing)
        raise ConfigError(f"train.deepspeed: {path} not found")
    try:
        ds = json.loads(read_config_text(path, "train.deepspeed"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON ({e}); fix it, or use one of "
                          f"cluster_configs/deepspeed/ (zero0 .. zero3)") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed: {path} must hold a JSON object (DeepSpeed config keys)")
    return ds


def load_yaml(text: str, what: str):
    """YAML as plain data, refusing what a config never needs and an attacker uses to make a tiny
    file expand into gigabytes: aliases (`*name`), and files over a megabyte."""
    import yaml

    if len(text) > 1 << 20:
        raise ConfigError(f"{what}: {len(text)} bytes; a config is at most 1 MiB")

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise ConfigError(f"{what}: YAML aliases (*name) are not allowed in configs")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliases)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: not valid YAML: {short_repr(str(e))}") from None


def to_dict(cfg) -> dict:
    """Nested plain dict (tuples as lists), the form written to config.yaml."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def config_yaml(cfg) -> str:
    """The config as YAML (sections in field order): what config.yaml holds, and what `--config` reads."""
    import yaml

    return yaml.safe_dump(cfg if isinstance(cfg, dict) else to_dict(cfg), sort_keys=False)


def _coerce(value, hint, key: str):
    """`value` (from YAML) as the field's type, or a ConfigError naming `key`."""
    import typing

    too_big = False
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(items) > MAX_ITEMS:
            raise ConfigError(f"{key}: {len(items)} values; at most {MAX_ITEMS}")
        types = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(types) != len(items):
            raise ConfigError(f"{key}: cannot use {short_repr(value)}: expected a list of {len(types)} values")
        return tuple(_coerce(v, t, key) for v, t in zip(items, types))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise TypeError("expected true or false")
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError("expected an integer")
            if -2**63 <= int(value) < 2**63:
                return int(value)
            too_big = True
        if hint is float:
            if isinstance(value, bool):
                raise TypeError("expected a number")
            return float(value)
        if hint is str:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
                raise TypeError("expected a string")
            return "" if value is None else str(value)
    except (TypeError, ValueError, OverflowError) as e:
        expected = {int: "expected an integer", float: "expected a number"}.get(hint, str(e))
        raise ConfigError(f"{key}: cannot use {short_repr(value)}: {expected}") from None
    if hint is int and too_big:
        raise ConfigError(f"{key}: {short_repr(value)} does not fit in 64 bits")
    return value


def set_value(cfg: Config, key: str, value) -> None:
    """Set a dotted key (`train.lr`) from a YAML-typed value; unknown keys are errors."""
    import difflib
    import typing

    parts = key.split(".")
    target = cfg
    for part in parts[:-1]:
        sub = getattr(target, part, None)
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"unknown config key {short_repr(key)} (no section {short_repr(part)}; sections: {', '.join(SECTIONS)})")
        target = sub
    hints = typing.get_type_hints(type(target))
    name = parts[-1]
    if name in hints and dataclasses.is_dataclass(getattr(target, name)):
        fields = ", ".join(f.name for f in dataclasses.fields(getattr(target, name)))
        raise ConfigError(f"{key}: is a section, not a value; set its fields as {key}.<field>=value ({fields})")
    if name not in hints:
        prefix = "".join(f"{p}." for p in parts[:-1])
        close = [prefix + f for f in difflib.get_close_matches(name, list(hints), n=3)]
        raise ConfigError(f"unknown config key {short_repr(key)}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    setattr(target, name, _coerce(value, hints[name], key))


def apply_dict(cfg: Config, values: dict, prefix: str = "") -> None:
    """Apply a nested dict (a YAML config file) onto cfg."""
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            apply_dict(cfg, v, key + ".")
        else:
            set_value(cfg, key, v)


def from_dict(values: dict) -> Config:
    """A Config from its dict form (config.yaml, a checkpoint's or a job's copy)."""
    cfg = Config()
    apply_dict(cfg, values)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    """Apply `key=value` strings; values are parsed as YAML (1e-4, true, [4, 11])."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {short_repr(item)}: expected key=value, e.g. train.lr=1e-4")
        set_value(cfg, key.strip(), load_yaml(text, f"override {short_repr(item)}"))


# --------------------------------------------------------------------------- documentation


def field_docs() -> dict[str, str]:
    """{"section.field": docstring} of every config field, read from the classes' source (the
    string literal under each field is its documentation)."""
    import ast
    import inspect
    import textwrap

    docs = {}
    for prefix, cls in (("", Config), *((f"{s}.", type(getattr(Config(), s))) for s in SECTIONS)):
        for node in ast.parse(textwrap.dedent(inspect.getsource(cls))).body:
            body = node.body
            for field, doc in zip(body, body[1:]):
                if (isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr)
                        and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                    docs[prefix + field.target.id] = " ".join(doc.value.value.split())
    return docs


def describe(cfg: Config | None = None) -> str:
    """Every config field with its type, value (the defaults, or `cfg`'s) and documentation."""
    import textwrap
    import typing

    cfg, docs, lines = cfg or Config(), field_docs(), []
    for prefix, obj in (("", cfg), *((f"{s}.", getattr(cfg, s)) for s in SECTIONS)):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if f.name in SECTIONS:
                continue
            key, hint = prefix + f.name, hints[f.name]
            kind = getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint).replace("typing.", "")
            lines.append(f"{key}: {kind} = {short_repr(getattr(obj, f.name))}")
            lines += textwrap.wrap(docs.get(key, "(undocumented)"), 96, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)

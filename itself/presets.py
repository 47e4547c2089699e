"""Named configurations.

The dataset presets are the config's defaults (the paper's settings) with their data; `synthetic`
(the default) and `baseline` are CPU-sized. The ablation
presets reproduce the supplementary's tables on RSTPReid (change `data.root` for another set):
Tab. 1 `ats-none` / `ats-epoch` / `ats-step`; Tab. 2 `vit-b32-baseline` / `vit-b32` /
`vit-b16-baseline` / `vit-b16`; Tab. 3 `select-a` .. `select-d` / `select-mars`. `baseline` is the
synthetic run with the global branch only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable

from .config import Config, ConfigError, apply_dict, apply_overrides, load_yaml, read_config_text


def synthetic() -> Config:
    """CPU-sized: a tiny random CLIP on the embedded synthetic data (minutes on 2 cores)."""
    cfg = Config(name="synthetic")
    cfg.data.root, cfg.data.build_synthetic = "data/synthetic", True
    cfg.data.image_size = (96, 32)
    cfg.data.num_workers = 1
    cfg.data.num_slots = 32  # results do not depend on the world size: 1 to 32 ranks (4 nodes x 8 GPUs)
    m = cfg.model
    m.arch, m.pretrained, m.grab_dim = "tiny", "", 256
    m.mars_layers = (1, 3)  # middle + late of 4 layers
    m.t_small = "6 epochs"
    t = cfg.train
    t.epochs, t.batch_size = 24, 64
    t.lr, t.grab_lr, t.head_lr_mult, t.adam_eps = 1e-3, 1e-3, 1.0, 1e-6  # trained from scratch
    t.warmup_epochs, t.deepspeed = 2.0, "zero0"
    cfg.eval.batch_size = 64
    return cfg


def _paper(name: str, root: str) -> Config:
    """The paper's settings are the config's defaults; only the data differs between datasets."""
    cfg = Config(name=name)
    cfg.data.root = root
    return cfg


def cuhk_pedes() -> Config:
    return _paper("cuhk-pedes", "data/cuhk-pedes")


def icfg_pedes() -> Config:
    return _paper("icfg-pedes", "data/icfg-pedes")


def rstpreid() -> Config:
    return _paper("rstpreid", "data/rstpreid")


def _pretrain(name: str, root: str, num_instance: int = 2) -> Callable[[], Config]:
    """Person pre-training on a large image-caption corpus: identity-free (no CID or ID classifier:
    at millions of pseudo-identities one would hold billions of parameters), TAL over the gathered
    global batch on both branches, MARS and ATS as in the paper; a step schedule (the corpus is
    too large for epochs to be the unit). Fine-tune after with `--preset cuhk-pedes
    model.init_from=<this run>`."""
    def preset() -> Config:
        cfg = Config(name=name)
        cfg.data.root, cfg.data.num_instance = root, num_instance
        cfg.data.identity_order = "slots"  # (millions of pseudo-identities: I/O per shard, not per identity)
        cfg.model.cid, cfg.model.id_loss = False, False
        cfg.model.t_small = "2000 steps"
        t = cfg.train
        t.schedule, t.max_steps, t.warmup_steps, t.checkpoint_every = "steps", 40000, 2000, 2000
        cfg.eval.every_steps = 2000
        return cfg
    preset.__doc__ = f"pre-training on {root} (identity-free, {num_instance} pairs per identity per batch)"
    return preset


def synthetic_pretrain() -> Config:
    """Pre-training, CPU-sized: the tiny CLIP of `synthetic` on the synthetic pre-training corpus
    (pseudo-identities, other people and phrasings than the embedded benchmark)."""
    cfg = synthetic()
    cfg.name = "pretrain-synthetic"
    cfg.data.root, cfg.data.build_synthetic = "data/synthetic-pretrain", False
    cfg.data.identity_order = "slots"  # (as the corpus presets)
    cfg.model.cid, cfg.model.id_loss, cfg.model.t_small = False, False, "200 steps"
    t = cfg.train
    t.schedule, t.max_steps, t.warmup_steps, t.checkpoint_every = "steps", 1500, 100, 500
    cfg.eval.every_steps = 500
    return cfg


def _ablation(name: str, **model) -> Callable[[], Config]:
    def preset() -> Config:
        cfg = rstpreid()
        cfg.name = name
        cfg.model = dataclasses.replace(cfg.model, **model)
        return cfg
    preset.__doc__ = f"RSTPReid with model settings {model}"
    return preset


def baseline() -> Config:
    """The synthetic run with the global branch only."""
    cfg = synthetic()
    cfg.name = "baseline"
    cfg.model.global_only = True
    return cfg


PRESETS: dict[str, Callable[[], Config]] = {
    "synthetic": synthetic,
    "cuhk-pedes": cuhk_pedes,
    "icfg-pedes": icfg_pedes,
    "rstpreid": rstpreid,
    "baseline": baseline,
    # Person pre-training on the published corpora (itself-shards build --dataset <corpus>), then
    # fine-tune with a benchmark preset and model.init_from=<the pre-training run>
    "pretrain-webperson": _pretrain("pretrain-webperson", "data/webperson"),
    "pretrain-synth-pedes": _pretrain("pretrain-synth-pedes", "data/synth-pedes"),
    "pretrain-mals": _pretrain("pretrain-mals", "data/mals"),
    "pretrain-luperson-t": _pretrain("pretrain-luperson-t", "data/luperson-t"),
    "pretrain-ham-pedes": _pretrain("pretrain-ham-pedes", "data/ham-pedes"),
    "pretrain-synthetic": synthetic_pretrain,
    # Supplementary Tab. 1: the token scheduler
    # (without ATS the reference code keeps its `select_ratio`, 0.4: the config's fixed_ratio)
    "ats-none": _ablation("ats-none", ats="fixed", fixed_ratio=0.4),
    "ats-epoch": _ablation("ats-epoch", ats="epoch"),
    "ats-step": _ablation("ats-step", ats="step"),
    # Tab. 2: backbones, baseline (global only) and full
    # (32-pixel patches every 16 pixels, 23x7 at 384x128: the reference code's stride_size 16)
    "vit-b32-baseline": _ablation("vit-b32-baseline", arch="ViT-B-32", patch_stride=16, global_only=True),
    "vit-b32": _ablation("vit-b32", arch="ViT-B-32", patch_stride=16),
    "vit-b16-baseline": _ablation("vit-b16-baseline", global_only=True),
    "vit-b16": _ablation("vit-b16"),
    # Tab. 3: selection strategies A-D against MARS
    "select-a": _ablation("select-a", selection="mean_min"),
    "select-b": _ablation("select-b", selection="mean_max"),
    "select-c": _ablation("select-c", selection="std_min"),
    "select-d": _ablation("select-d", selection="std_max"),
    "select-mars": _ablation("select-mars", selection="mars"),
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def resolve_config(preset: str = "synthetic", config_file: str | None = None, overrides: list[str] = ()) -> Config:
    """preset, then a YAML file, then `key=value` overrides (later wins)."""
    cfg = get_preset(preset)
    default_root, explicit = cfg.data.root, set()
    if config_file:
        values = load_yaml(read_config_text(config_file, "--config"), f"--config: {config_file}") or {}
        if not isinstance(values, dict):
            raise ConfigError(f"--config: {config_file} must hold a mapping of sections (data, model, train, eval)")
        try:
            apply_dict(cfg, values)
        except ConfigError as e:
            raise ConfigError(f"{config_file}: {e}") from None
        explicit |= {"data.build_synthetic"} if "build_synthetic" in (values.get("data") or {}) else set()
    apply_overrides(cfg, list(overrides))
    explicit |= {o.partition("=")[0].strip() for o in overrides}
    if cfg.data.root != default_root and "data.build_synthetic" not in explicit:
        # A data.root of one's own is data to read, never a place to build the synthetic set in:
        # a mistyped path must be an error, not a synthetic run.
        if cfg.data.build_synthetic:
            logging.getLogger(__name__).warning(
                f"note: data.root={cfg.data.root} is read as a built dataset; the synthetic set is not built "
                "there (data.build_synthetic=true to build it)")
        cfg.data.build_synthetic = False
    resolve_references(cfg)
    return cfg


def resolve_references(cfg: Config) -> None:
    """Values that point at another run: `model.t_small=from:RUN_DIR` becomes that (baseline) run's
    best val epoch, the paper's rule for ATS's horizon T."""
    from .rundir import RunDir

    source = cfg.model.init_from
    if source and Path(source).is_dir():  # a run directory: its exported model
        model = RunDir(source).file(RunDir.MODEL)
        if not model.is_file():
            raise ConfigError(f"model.init_from={source}: no {RunDir.MODEL} there: not a finished training run")
        cfg.model.init_from = str(model)
    ref = str(cfg.model.t_small)
    if ref.startswith("from:"):
        run = RunDir(ref.removeprefix("from:"))
        try:
            best = run.results().best_epoch
            if best is None:
                raise ValueError("no best_epoch in its results.json")
        except (ConfigError, KeyError, ValueError) as e:
            raise ConfigError(f"model.t_small={ref}: {run} is not a finished training run ({e})") from None
        check_t_small_source(cfg, run, ref)
        cfg.model.t_small = f"{best} epochs"


def check_t_small_source(cfg: Config, run, ref: str) -> None:
    """The paper's rule takes T from the epoch at which the *global-only baseline* peaks *on the
    same data*: a ConfigError naming which of the two the run `ref` points at is not (read from
    its config.yaml: model.global_only; data.root and data.mix, compared by the datasets' content
    digests where both are readable, else by path)."""
    saved = run.config()
    if saved is None:
        raise ConfigError(f"model.t_small={ref}: {run} has no {run.CONFIG}: cannot check that it is a global-only "
                          "baseline on the same data")
    model, data = saved.get("model") or {}, saved.get("data") or {}
    if model.get("global_only") is not True:
        raise ConfigError(f"model.t_small={ref}: {run} is not a global-only baseline (its model.global_only is "
                          f"{model.get('global_only')}: it trained GRAB and MARS); T is the epoch at which the "
                          "global-only baseline peaks: point at a run with model.global_only=true")
    theirs = [str(data.get("root", "")), *(str(m) for m in data.get("mix") or ())]
    ours = [cfg.data.root, *cfg.data.mix]
    (digest_a, paths_a), (digest_b, paths_b) = _data_identity(theirs), _data_identity(ours)
    if (digest_a != digest_b) if digest_a and digest_b else paths_a != paths_b:
        raise ConfigError(f"model.t_small={ref}: {run} was trained on other data ({' + '.join(theirs)}, this run: "
                          f"{' + '.join(ours)}); T is the epoch at which the baseline peaks on the same data: "
                          "train the baseline on this run's data.root")


def _data_identity(roots: list[str]) -> tuple[str | None, list[str]]:
    """(the datasets' content digest, None where a dataset.json is not readable; their absolute
    paths): digests say whether two runs trained on the same data wherever it lies, paths where
    the data cannot be read."""
    from .checkpoint import dataset_fingerprint
    from .data.catalog import dataset_info

    try:
        digest = dataset_fingerprint([dataset_info(root) for root in roots])
    except (OSError, ValueError):  # (DataError: not a built dataset, or not readable from here)
        digest = None
    return digest, [root if "://" in root else os.path.abspath(root) for root in roots]

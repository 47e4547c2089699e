"""Typed configuration. Each field's docstring is its documentation; `validate()` names the field
at fault. The dataclass defaults are the paper's settings (the `synthetic` preset changes what a
CPU needs); every default lives here once.

This module sits low in the import graph: it knows the names the model and the trainer accept
(selection strategies, ATS modes, architectures) but imports neither.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from pathlib import Path

import cluster_configs

from .archs import ACTIVATIONS, arch_spec, known_archs, tag_quick_gelu, use_quick_gelu
from .errors import ConfigError
from .layout import DataLayout, data_layout

__all__ = ["Config", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "TrainConfig"]

NONFINITE_POLICIES = ("skip", "stop")
SCHEDULES = ("epochs", "steps")
"""Learning-rate and evaluation schedules: per epoch (the paper), or per step (pre-training)."""
ATS_MODES = ("step", "epoch", "fixed")
"""Token schedulers: ATS per step (the paper's best), ATS per epoch, or a fixed keep ratio."""
SELECTION_STRATEGIES = ("mars", "mean_max", "mean_min", "std_max", "std_min")
"""Saliency strategies for GRAB's top-k, besides `layer:<i>` (one layer's attention)."""
REPORT_TO = ("tensorboard", "wandb", "none")
"""Where a run's metrics and retrieval images go besides train.log and metrics.jsonl."""
EVAL_SELECTIONS = ("both", "train", "last_layer")
"""GRAB selections at evaluation (see EvalConfig.selection)."""
MAX_ITEMS = 1000
"""Most values a list field takes (bounded work for any input)."""
T_SMALL = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(steps?|epochs?)?\s*")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""Run and job names: they name folders and SLURM jobs, so no path separators or shell syntax."""
DEEPSPEED_CONFIGS = cluster_configs.DEEPSPEED


@dataclasses.dataclass
class DataConfig:
    root: str = "data/synthetic"
    """Dataset written by `python -m shards build` (dataset.json, manifest.parquet, train/ val/
    test/): a local folder or a URL (`https://`, `s3://`, `gs://`: anything fsspec opens)."""
    mix: tuple[str, ...] = ()
    """Further built datasets (folders or URLs) whose train splits are trained on with `root`'s
    (joint training). Their identities stay apart (labels offset); val and test are `root`'s."""
    mix_weights: tuple[float, ...] = ()
    """Per dataset, `root` first, then each of `mix`: how many times its train pairs are used per
    epoch on average (1: once; 0.5: half of its identities, drawn anew each epoch; 2: twice).
    Empty: 1 for every dataset."""
    build_synthetic: bool = False
    """Build the embedded synthetic dataset at `root` when it is missing (the synthetic presets).
    Switched off, with a note, when `data.root` is overridden and this is not set too."""
    train_shards: str = ""
    """Train shard URLs overriding `<root>/train/*.tar`: a brace pattern (`dir/train-{000000..000009}.tar`),
    several joined by `::`, or any URL webdataset opens (`pipe:`, `https://`). Shards are matched
    to the manifest by file name, so they may live elsewhere than the manifest."""
    image_size: tuple[int, int] = (384, 128)
    """Height x width the images are resized to (paper: 384x128, a 24x8 grid of 16-pixel patches)."""
    text_length: int = 77
    """Tokens per caption, including start and end tokens (CLIP: 77)."""
    num_instance: int = 2
    """(image, caption) pairs of each identity in a batch (paper: 2). Holds for the global batch."""
    num_workers: int = 8
    """DataLoader worker processes per rank (at most: a worker adds at least one identity to each
    step, so a rank uses no more than micro-batch / num_instance, and a divisor of its data slots).
    Each reads its slots' identities."""
    num_slots: int = 0
    """Data slots: runs of whole identities (not whole shards), each an equal share of every global batch.
    0 = ranks x workers. A fixed value (a multiple of the world size, at most the number of train
    identities) makes the batches, and so the results, independent of the world size."""
    window_shards: int = 16
    """Shards a worker pools before forming batches: bigger mixes identities from more shards,
    smaller bounds memory (at most about this many shards of encoded images per worker)."""
    identity_order: str = "uniform"
    """How a batch's identities are drawn. `uniform`: uniformly from the whole train set, as the
    reference code's sampler (identities permuted each epoch, then dealt to data slots). `slots`:
    from the shards of the batch's data slot and window (shards permuted each epoch, identities in
    shard order: a batch's identities are neighbours in the shard layout, typically close person
    ids). Both use every pair once per epoch and keep batches independent of the world size.
    `uniform` costs I/O that grows with identities rather than shards: each reader loads the
    manifest rows of every shard (not only its own) and reads one byte range per identity instead
    of one per shard. That is cheap on local disks and servers answering HTTP ranges (the synthetic
    benchmark's loader runs as fast either way), hence the default; over streamed sources (`pipe:`,
    servers without ranges) each window streams every shard it touches: use `slots` there, and for
    corpora of millions of pseudo-identities (the pre-training presets do)."""
    image_aug: bool = True
    """Paper image augmentation: flip, pad 10 + random crop, random erasing."""
    text_aug: bool = True
    """Paper text augmentation: each real token with probability 0.2 is masked (60%), replaced by a
    random token (20%) or removed (20%)."""

    def validate(self) -> None:
        if not self.root:
            raise ConfigError(f"data.root: must be a non-empty dataset directory, got {_short(self.root)}")
        h, w = self.image_size
        if h < 1 or w < 1:
            raise ConfigError(f"data.image_size: expected positive height x width, got {self.image_size}")
        if self.text_length < 3:
            raise ConfigError(f"data.text_length: must be at least 3 (start, one token, end), got {self.text_length}")
        if self.num_instance < 1:
            raise ConfigError(f"data.num_instance: must be >= 1, got {self.num_instance}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if self.num_slots < 0:
            raise ConfigError(f"data.num_slots: must be >= 0 (0 = ranks x workers), got {self.num_slots}")
        if self.identity_order not in ("slots", "uniform"):
            raise ConfigError(f"data.identity_order: must be slots or uniform, got {_short(self.identity_order)}")
        if self.window_shards < 1:
            raise ConfigError(f"data.window_shards: must be >= 1, got {self.window_shards}")
        if self.mix_weights and len(self.mix_weights) != 1 + len(self.mix):
            raise ConfigError(f"data.mix_weights: need one weight per dataset (data.root, then each of data.mix: "
                              f"{1 + len(self.mix)}), got {len(self.mix_weights)}")
        if any(w < 0 for w in self.mix_weights) or (self.mix_weights and not any(self.mix_weights)):
            raise ConfigError(f"data.mix_weights: each must be >= 0 and one > 0, got {self.mix_weights}")
        if not all(self.mix):
            raise ConfigError(f"data.mix: every entry must be a dataset folder or URL, got {self.mix}")


@dataclasses.dataclass
class ModelConfig:
    arch: str = "ViT-B-16"
    """Backbone: `ViT-B-16` (paper), `ViT-B-32` (supplementary Tab. 2), any open_clip ViT name, or the
    CPU-sized random `tiny` / `tiny-deep`."""
    pretrained: str = "openai"
    """CLIP weights: "" for random, a local state-dict file, or an open_clip pretrained tag
    (e.g. `openai`; downloaded by open_clip). Position embeddings are interpolated to the image grid."""
    activation: str = "auto"
    """Transformer MLP activation: `auto` (what the weights were trained with: QuickGELU for OpenAI's
    weights, the `openai` tag or a local file in OpenAI's layout; the architecture's own otherwise),
    `quick_gelu` or `gelu`. A choice that contradicts the weights is refused."""
    patch_stride: int = 0
    """Stride of the image patches in pixels; 0 = the patch size (non-overlapping patches, as
    open_clip builds them). The reference code's `--stride_size` defaults to 16 whatever the
    backbone, so its ViT-B/32 runs overlapping 32-pixel patches every 16 pixels (a 23x7 grid at
    384x128 instead of 12x4): the `vit-b32` presets set 16 to match the reference. At most the
    patch size (a larger stride leaves pixels unseen). The position embedding follows the grid."""
    global_only: bool = False
    """Baseline: train the global branch only (no GRAB, no attention capture)."""
    grab_dim: int = 4096
    """Output size of the GRAB embedding (paper: 4096; the MLP's hidden layer is half of it)."""
    selection: str = "mars"
    """Saliency strategy for top-k: `mars`, `mean_max` (Tab. 3 B), `mean_min` (A), `std_max` (D),
    `std_min` (C) or `layer:<i>` (one layer)."""
    mars_layers: tuple[int, ...] = (4, 11)
    """Layers MARS rolls out, ascending (paper: middle + late = 4 and 11 of 12)."""
    discard_ratio: float = 0.25
    """Fraction of each rolled-out layer's lowest attention entries set to zero (paper: 0.25)."""
    ats: str = "step"
    """Token scheduler: `step` (ATS per step, the paper's best), `epoch` (ATS per epoch) or `fixed`."""
    p_start: float = 0.65
    """ATS keep ratio at the start (paper: 0.65)."""
    p_end: float = 0.5
    """ATS keep ratio from t_small on, and at inference (paper: 0.5)."""
    t_small: str = "1450 steps"
    """ATS decay length T: `<n> epochs` (the paper's rule: the epoch at which the baseline peaks),
    `<n> steps`, or `from:RUN_DIR` (the best val epoch of a finished baseline run, read from its
    results.json when the config is resolved). A bare number is epochs. Default: the reference
    code's 1450 steps, used there for every dataset (10 epochs of RSTPReid at batch 256)."""
    fixed_ratio: float = 0.4
    """Keep ratio when `ats` is `fixed` (the reference code's `select_ratio` without ATS: 0.4)."""
    tau: float = 0.015
    """TAL temperature (paper: 0.015)."""
    margin: float = 0.1
    """TAL margin (paper: 0.1)."""
    cid: bool = True
    """Train with the CID loss (cross-modal identity classification with hard negatives)."""
    id_loss: bool = True
    """Train with the ID loss (identity classification of image and text embeddings)."""
    init_from: str = ""
    """Start from another run's exported weights: a run directory (its model.pt), a model.pt or a
    model.safetensors. The towers and GRAB (where their shapes match) are loaded, the classifier
    heads start fresh, `pretrained` is not read; results.json records the source and its test
    metrics before fine-tuning (`zero_shot`). The pre-train -> fine-tune step."""

    def _check_pretrained_tag(self) -> None:
        """An open_clip tag must exist for `arch` and agree with `activation` (files are checked when
        loaded: that reads them)."""
        from .archs import TINY_ARCHS

        if not self.pretrained or Path(self.pretrained).is_file():
            return
        if "/" in self.pretrained or Path(self.pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"):
            raise ConfigError(f"model.pretrained: file {self.pretrained} not found (a local weights file must be "
                              "readable where training runs: on a cluster, a shared file system)")
        if self.arch in TINY_ARCHS:
            raise ConfigError(f"model.pretrained: {self.arch} has no pretrained weights; use \"\" (random) or a "
                              f"local file, got {_short(self.pretrained)}")
        try:
            use_quick_gelu(self.arch, self.activation, tag_quick_gelu(self.arch, self.pretrained))
        except KeyError:
            import open_clip

            tags = ", ".join(open_clip.list_pretrained_tags_by_model(self.arch)) or "none"
            raise ConfigError(f"model.pretrained: {_short(self.pretrained)} is neither a file nor an open_clip tag of "
                              f"{self.arch} (tags: {tags})") from None
        except ValueError as e:
            raise ConfigError(f"model.activation: {e}") from None

    def t_small_parsed(self) -> tuple[float, str]:
        """(T, `steps` or `epochs`) of `t_small`; a ConfigError if it is not a number with a unit."""
        m = T_SMALL.fullmatch(str(self.t_small))
        if not m or float(m.group(1)) <= 0:
            raise ConfigError(f"model.t_small: expected a positive number of epochs or steps (`10 epochs`, "
                              f"`1450 steps`) or from:RUN_DIR, got {_short(self.t_small)}")
        unit = m.group(2) or "epochs"
        return float(m.group(1)), unit if unit.endswith("s") else unit + "s"

    def selection_layer(self) -> int | None:
        """The layer of a `layer:<i>` selection, None for the other strategies."""
        return int(self.selection.split(":", 1)[1]) if self.selection.startswith("layer:") else None

    def validate(self, num_layers: int | None = None) -> None:
        """`num_layers`: of the built model's shallower tower; by default looked up from `arch`."""
        if num_layers is None:
            num_layers = _spec(self.arch).layers
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation: must be one of {', '.join(ACTIVATIONS)}, got {_short(self.activation)}")
        self._check_pretrained_tag()
        if self.ats not in ATS_MODES:
            raise ConfigError(f"model.ats: must be one of {', '.join(ATS_MODES)}, got {_short(self.ats)}")
        if not 0 < self.p_end <= self.p_start <= 1:
            raise ConfigError(f"model.p_start / model.p_end: need 0 < p_end <= p_start <= 1, "
                              f"got p_start={self.p_start}, p_end={self.p_end}")
        if not 0 < self.fixed_ratio <= 1:
            raise ConfigError(f"model.fixed_ratio: must be in (0, 1], got {self.fixed_ratio}")
        if not str(self.t_small).startswith("from:"):  # (resolved with resolve_t_small before a run)
            self.t_small_parsed()
        if not 0 <= self.discard_ratio < 1:
            raise ConfigError(f"model.discard_ratio: must be in [0, 1), got {self.discard_ratio}")
        if self.grab_dim < 2 or self.grab_dim % 2:
            raise ConfigError(f"model.grab_dim: must be a positive even number, got {self.grab_dim}")
        if self.init_from and not (Path(self.init_from).is_file() or Path(self.init_from).is_dir()):
            raise ConfigError(f"model.init_from: {_short(self.init_from)} is neither a run directory nor a model file")
        if self.tau <= 0:
            raise ConfigError(f"model.tau: must be > 0, got {self.tau}")
        if self.margin < 0:
            raise ConfigError(f"model.margin: must be >= 0, got {self.margin}")
        layers = list(self.mars_layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < 0:
            raise ConfigError(f"model.mars_layers: need ascending distinct layer indices >= 0, got {self.mars_layers}")
        if self.selection not in SELECTION_STRATEGIES and not self.selection.startswith("layer:"):
            raise ConfigError(f"model.selection: must be one of {', '.join(SELECTION_STRATEGIES)} or layer:<i>, "
                              f"got {_short(self.selection)}")
        try:
            single = self.selection_layer()
        except ValueError:
            raise ConfigError(f"model.selection: layer:<i> needs an integer, got {_short(self.selection)}") from None
        used = layers if self.selection == "mars" else [single] if single is not None else []
        bad = [i for i in used if not 0 <= i < num_layers]
        if bad:
            field = "model.mars_layers" if self.selection == "mars" else "model.selection"
            raise ConfigError(f"{field}: layer {bad[0]} does not exist; {self.arch} has {num_layers} layers "
                              f"(0..{num_layers - 1})")


def _spec(arch: str):
    """The architecture's spec, or a ConfigError listing what the backbone can build."""
    spec = arch_spec(arch)
    if spec is None:
        raise ConfigError(f"model.arch: must be one of {', '.join(known_archs())}, got {_short(arch)}")
    return spec


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 60
    """Training epochs (paper: 60)."""
    batch_size: int = 256
    """Global batch in (image, caption) pairs over all ranks and accumulation steps (paper: 256).
    Per-rank micro-batch = batch_size / (world_size x grad_accum)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (batch-level losses see world x micro-batch pairs)."""
    lr: float = 1e-5
    """Learning rate of the CLIP backbone (paper: 1e-5, Adam)."""
    grab_lr: float = 1e-3
    """Learning rate of the new GRAB embedding layers (reference code: 1e-3)."""
    head_lr_mult: float = 5.0
    """Multiplier of `lr` for the new CID / ID classifier heads (reference code: 5)."""
    bias_lr_mult: float = 2.0
    """Multiplier of `lr` for backbone biases (reference code: 2), which get no weight decay."""
    weight_decay: float = 4e-5
    """Adam (L2) weight decay (paper: 4e-5)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates (reference code: 0.9, 0.999)."""
    adam_eps: float = 1e-3
    """Adam epsilon (reference code: 1e-3)."""
    warmup_epochs: float = 5.0
    """Linear warm-up length (paper: 5 epochs), from `warmup_factor` x lr; cosine decay after."""
    warmup_factor: float = 0.1
    """Learning rate at the start of the warm-up, as a share of each group's lr (reference code: 0.1)."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the cosine decay, as a share of each group's lr."""
    precision: str = "auto"
    """`fp32`, `bf16`, or `auto` (bf16 on GPU, fp32 on CPU)."""
    grad_clip: float = 0.0
    """Gradient-norm clipping (0 = none)."""
    deepspeed: str = "zero1"
    """DeepSpeed config: a name in cluster_configs/deepspeed/ (zero0, zero1, zero2, zero3,
    zero2-offload) or a JSON path. Batch sizes, precision and clipping are filled in from here."""
    device: str = "auto"
    """`auto` (CUDA when available), `cuda` or `cpu`."""
    compile: bool = False
    """torch.compile the two towers (inductor, on CPU and GPU; the first steps compile)."""
    grad_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them: less activation memory (a larger micro-batch fits), about a third more compute."""
    checkpoint_every: int = 0
    """Also checkpoint every this many optimizer steps (0 = at epoch ends only)."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    resume: str = ""
    """`latest` (newest complete checkpoint of run_dir; an error when there is none), `auto` (the
    newest complete checkpoint if there is one, else start: what SLURM jobs use), a checkpoint
    directory, or "" to start fresh (refused when run_dir already holds checkpoints)."""
    log_every: int = 10
    """Optimizer steps between training log lines in metrics.jsonl."""
    report_to: str = "tensorboard"
    """Where metrics and retrieval images go besides train.log and metrics.jsonl: `tensorboard`
    (the run's tensorboard/), `wandb` (Weights & Biases; WANDB_MODE=offline writes the run under
    the run directory for `wandb sync`) or `none`."""
    wandb_project: str = "itself"
    """The W&B project of `report_to=wandb` runs."""
    max_steps: int = 0
    """Stop training after this many optimizer steps (0 = all epochs); evaluation still runs. With
    `schedule=steps`, the length of the run."""
    schedule: str = "epochs"
    """`epochs`: warm-up over `warmup_epochs`, cosine to the end of `epochs`, evaluation every
    `eval.every` epochs (the paper). `steps`: for corpora of millions of pairs (pre-training): warm-up
    over `warmup_steps`, cosine to `max_steps`, evaluation every `eval.every_steps`; the data is
    cycled epoch after epoch until `max_steps` (`epochs` is not read); resumable mid-epoch."""
    warmup_steps: int = 0
    """Warm-up length in optimizer steps with `schedule=steps`."""
    nonfinite: str = "skip"
    """What a step with a non-finite loss or gradient does: `skip` (the update is dropped, the
    weights and optimizer state stay as they were, the skip is counted) or `stop` (save a
    checkpoint of the last finite state and stop with an error). Never applied to the weights."""
    max_skipped_steps: int = 20
    """With `nonfinite=skip`: stop (with a checkpoint) after this many consecutive skipped steps,
    a diverged run rather than a bad batch (0 = never)."""
    collective_timeout_s: int = 600
    """Seconds a collective (all-reduce, barrier) waits for the other ranks before this rank fails:
    a dead or stalled rank ends the job instead of hanging it."""

    def validate(self) -> None:
        for field in ("epochs", "batch_size", "grad_accum", "keep_last", "log_every"):
            if getattr(self, field) < 1:
                raise ConfigError(f"train.{field}: must be >= 1, got {getattr(self, field)}")
        for field in ("lr", "grab_lr", "head_lr_mult", "bias_lr_mult", "adam_eps"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"train.{field}: must be > 0, got {getattr(self, field)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule: must be one of {', '.join(SCHEDULES)}, got {_short(self.schedule)}")
        if self.schedule == "steps" and not self.max_steps:
            raise ConfigError("train.max_steps: train.schedule=steps needs the run's length in optimizer steps (> 0)")
        if self.schedule == "steps" and self.warmup_steps >= self.max_steps:
            raise ConfigError(f"train.warmup_steps: must be below train.max_steps={self.max_steps}, got {self.warmup_steps}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"train.nonfinite: must be one of {', '.join(NONFINITE_POLICIES)}, "
                              f"got {_short(self.nonfinite)}")
        for field in ("weight_decay", "grad_clip", "warmup_epochs", "max_skipped_steps", "checkpoint_every",
                      "max_steps", "warmup_steps"):
            if getattr(self, field) < 0:
                raise ConfigError(f"train.{field}: must be >= 0, got {getattr(self, field)}")
        if not 1 <= self.collective_timeout_s <= 7 * 86400:
            raise ConfigError(f"train.collective_timeout_s: must be 1 second to 7 days (604800), got "
                              f"{self.collective_timeout_s}")
        if not 0 < self.warmup_factor <= 1:
            raise ConfigError(f"train.warmup_factor: must be in (0, 1], got {self.warmup_factor}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas: each must be in [0, 1), got {self.adam_betas}")
        for field, allowed in (("precision", ("auto", "fp32", "bf16")), ("device", ("auto", "cpu", "cuda")),
                               ("report_to", REPORT_TO)):
            if getattr(self, field) not in allowed:
                raise ConfigError(f"train.{field}: must be one of {', '.join(allowed)}, got {_short(getattr(self, field))}")
        names = sorted(p.stem for p in DEEPSPEED_CONFIGS.glob("*.json"))
        if names and not self.deepspeed.endswith(".json") and self.deepspeed not in names:
            raise ConfigError(f"train.deepspeed: must be one of {', '.join(names)} or a .json path, "
                              f"got {_short(self.deepspeed)}")


@dataclasses.dataclass
class EvalConfig:
    batch_size: int = 256
    """Images or captions per embedding batch on each rank."""
    fusion_weights: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    """Candidate weights a of the fused similarity a * S_global + (1 - a) * S_grab, chosen on val."""
    every: int = 1
    """Evaluate on val every this many epochs (and after the last) with `train.schedule=epochs`."""
    every_steps: int = 0
    """With `train.schedule=steps`: evaluate on val (and checkpoint) every this many optimizer steps
    (and after the last); 0 = after the last only."""
    block_mb: int = 256
    """Working memory of the blocked ranking, in MiB."""
    test_roots: tuple[str, ...] = ()
    """Further built datasets (folders or URLs) whose test splits the final model is evaluated on,
    each reported separately in results.json (`test_datasets`): cross-dataset evaluation."""
    selection: str = "both"
    """GRAB tokens at evaluation: `train` (the training strategy at the final ATS keep ratio: MARS at
    p_end), `last_layer` (the reference code's evaluation: the last layer's attention at `keep_ratio`),
    or `both` (both evaluated on val, the better kept for test and the exported model; results.json
    records which)."""
    keep_ratio: float = 0.4
    """Keep ratio of the `last_layer` selection (reference code: 0.4, i.e. 76 of 192 patches and 30
    of 75 text positions)."""
    panels: int = 4
    """Val queries logged as images at every evaluation (`train.report_to`), each with its top-5
    retrievals outlined green (right identity) or red and the patches MARS kept; 0 = none."""

    def validate(self) -> None:
        if not self.fusion_weights or any(not 0 <= a <= 1 for a in self.fusion_weights):
            raise ConfigError(f"eval.fusion_weights: need one or more weights, each in [0, 1], "
                              f"got {self.fusion_weights}")
        if self.every_steps < 0:
            raise ConfigError(f"eval.every_steps: must be >= 0, got {self.every_steps}")
        for field in ("batch_size", "every", "block_mb"):
            if getattr(self, field) < 1:
                raise ConfigError(f"eval.{field}: must be >= 1, got {getattr(self, field)}")
        if not 0 <= self.panels <= 64:
            raise ConfigError(f"eval.panels: must be in [0, 64], got {self.panels}")
        if not all(self.test_roots):
            raise ConfigError(f"eval.test_roots: every entry must be a dataset folder or URL, got {self.test_roots}")
        if self.selection not in EVAL_SELECTIONS:
            raise ConfigError(f"eval.selection: must be one of {', '.join(EVAL_SELECTIONS)}, got {_short(self.selection)}")
        if not 0 < self.keep_ratio <= 1:
            raise ConfigError(f"eval.keep_ratio: must be in (0, 1], got {self.keep_ratio}")


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
                              f"(it names the run folder and jobs), got {_short(self.name)}")
        self.data.validate()
        self.model.validate()
        spec = _spec(self.model.arch)
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


# --------------------------------------------------------------------------- dict <-> config


def _short(value) -> str:
    """A bounded repr for messages: a hostile value (a deep or huge structure) never floods them."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxstring, r.maxother = 3, 8, 8, 8, 80, 80
    return r.repr(value)


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
        raise ConfigError(f"{what}: not valid YAML: {_short(str(e))}") from None


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
            raise ConfigError(f"{key}: cannot use {_short(value)}: expected a list of {len(types)} values")
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
        raise ConfigError(f"{key}: cannot use {_short(value)}: {expected}") from None
    if hint is int and too_big:
        raise ConfigError(f"{key}: {_short(value)} does not fit in 64 bits")
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
            raise ConfigError(f"unknown config key {_short(key)} (no section {_short(part)}; sections: {', '.join(SECTIONS)})")
        target = sub
    hints = typing.get_type_hints(type(target))
    name = parts[-1]
    if name in hints and dataclasses.is_dataclass(getattr(target, name)):
        fields = ", ".join(f.name for f in dataclasses.fields(getattr(target, name)))
        raise ConfigError(f"{key}: is a section, not a value; set its fields as {key}.<field>=value ({fields})")
    if name not in hints:
        prefix = "".join(f"{p}." for p in parts[:-1])
        close = [prefix + f for f in difflib.get_close_matches(name, list(hints), n=3)]
        raise ConfigError(f"unknown config key {_short(key)}" + (f"; did you mean {', '.join(close)}?" if close else ""))
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
            raise ConfigError(f"override {_short(item)}: expected key=value, e.g. train.lr=1e-4")
        set_value(cfg, key.strip(), load_yaml(text, f"override {_short(item)}"))


# --------------------------------------------------------------------------- documentation


def field_docs() -> dict[str, str]:
    """{"section.field": docstring} of every config field, read from this module's source (the
    string literal under each field is its documentation)."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    section_of = {"Config": "", "DataConfig": "data.", "ModelConfig": "model.", "TrainConfig": "train.",
                  "EvalConfig": "eval."}
    docs = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in section_of:
            body = node.body
            for field, doc in zip(body, body[1:]):
                if (isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr)
                        and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                    docs[section_of[node.name] + field.target.id] = " ".join(doc.value.value.split())
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
            lines.append(f"{key}: {kind} = {_short(getattr(obj, f.name))}")
            lines += textwrap.wrap(docs.get(key, "(undocumented)"), 96, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)

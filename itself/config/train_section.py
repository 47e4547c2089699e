"""The `train` and `eval` sections: optimisation, precision, checkpoints, logging; evaluation."""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .values import NONFINITE_POLICIES, SCHEDULES, REPORT_TO, EVAL_SELECTIONS, DEEPSPEED_CONFIGS, short_repr


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
    cpu_threads: int = 0
    """CPU (intra-op) threads of each rank. 0 = auto: OMP_NUM_THREADS when set, else the cores this
    process may use (affinity, cgroup quota, SLURM_CPUS_PER_TASK) shared among the host's ranks."""
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
            raise ConfigError(f"train.schedule: must be one of {', '.join(SCHEDULES)}, got {short_repr(self.schedule)}")
        if self.schedule == "steps" and not self.max_steps:
            raise ConfigError("train.max_steps: train.schedule=steps needs the run's length in optimizer steps (> 0)")
        if self.schedule == "steps" and self.warmup_steps >= self.max_steps:
            raise ConfigError(f"train.warmup_steps: must be below train.max_steps={self.max_steps}, got {self.warmup_steps}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"train.nonfinite: must be one of {', '.join(NONFINITE_POLICIES)}, "
                              f"got {short_repr(self.nonfinite)}")
        for field in ("weight_decay", "grad_clip", "warmup_epochs", "max_skipped_steps", "checkpoint_every",
                      "max_steps", "warmup_steps", "cpu_threads"):
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
                raise ConfigError(f"train.{field}: must be one of {', '.join(allowed)}, got {short_repr(getattr(self, field))}")
        names = sorted(p.stem for p in DEEPSPEED_CONFIGS.glob("*.json"))
        if names and not self.deepspeed.endswith(".json") and self.deepspeed not in names:
            raise ConfigError(f"train.deepspeed: must be one of {', '.join(names)} or a .json path, "
                              f"got {short_repr(self.deepspeed)}")


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
            raise ConfigError(f"eval.selection: must be one of {', '.join(EVAL_SELECTIONS)}, got {short_repr(self.selection)}")
        if not 0 < self.keep_ratio <= 1:
            raise ConfigError(f"eval.keep_ratio: must be in (0, 1], got {self.keep_ratio}")

"""Every invalid config value fails before any work with a one-line message that starts with the
dotted field name and states what is allowed (and what was given)."""

from __future__ import annotations

import dataclasses

import pytest

from itself.config import SECTIONS, Config, ConfigError
from itself.presets import resolve_config
from runs import run_train

# (override on the synthetic preset, what the message starts with, fragments it contains). The
# synthetic preset: tiny arch (4 layers, 8-pixel patches), 96x32 images, batch 64, 8 data slots.
CASES = [
    ("seed=abc", "seed", "cannot use 'abc': expected an integer"),
    ("name=../escape", "name", ("letters, digits, '.', '_' or '-'", "got '../escape'")),
    ("name=a b;c", "name", "got 'a b;c'"),
    # data
    ("data.root=", "data.root", "must be a non-empty dataset directory, got ''"),
    ("data.build_synthetic=maybe", "data.build_synthetic", "cannot use 'maybe': expected true or false"),
    ("data.image_size=[0, 32]", "data.image_size", "expected positive height x width, got (0, 32)"),
    ("data.image_size=[96]", "data.image_size", "expected a list of 2 values"),
    ("data.image_size=[96, a]", "data.image_size", "cannot use 'a': expected an integer"),
    ("data.image_size=[4, 4]", "data.image_size",
     "must be at least 8 x 8, the patch size of model.arch tiny, got (4, 4)"),
    ("data.text_length=2", "data.text_length", "must be at least 3 (start, one token, end), got 2"),
    ("data.text_length=78", "data.text_length", "must be <= 77, the text context of model.arch tiny, got 78"),
    ("data.num_instance=0", "data.num_instance", "must be >= 1, got 0"),
    ("data.num_workers=-2", "data.num_workers", "must be >= 0, or -1 (auto), got -2"),
    ("data.num_slots=-1", "data.num_slots", "must be >= 0 (0 = ranks x workers), got -1"),
    ("data.num_slots=3", "data.num_slots", ("does not split the 64 pairs of a step into equal shares",
                                            "use data.num_slots=2 (with 1 ranks: 1, 2, 4, 8, 16, 32)")),
    ("data.mix_weights=[1, 2]", "data.mix_weights", "need one weight per dataset (data.root, then each of data.mix: 1)"),
    ("data.mix_weights=[-1]", "data.mix_weights", "each must be >= 0 and one > 0, got (-1.0,)"),
    ("data.mix=['']", "data.mix", "every entry must be a dataset folder or URL"),
    ("data.mix=[/data/a, /data/a]", "data.mix", "a dataset is named twice in data.root + data.mix"),
    ("data.window_shards=0", "data.window_shards", "must be >= 1, got 0"),
    ("data.identity_order=random", "data.identity_order", "must be slots or uniform, got 'random'"),
    ("model.patch_stride=9", "model.patch_stride",
     "must be in 0..8 (0 = the patch size of model.arch tiny; a larger stride leaves pixels unseen), got 9"),
    ("data.image_aug=2", "data.image_aug", "cannot use 2: expected true or false"),
    ("data.text_aug=yes please", "data.text_aug", "expected true or false"),
    # model
    ("model.arch=ViT-Q-99", "model.arch", ("must be one of tiny, tiny-deep, ViT-B-16, ", "ViT-L-14", "got 'ViT-Q-99'")),
    ("model.arch=RN50", "model.arch", ("must be one of tiny, tiny-deep, ", "got 'RN50'")),  # a ResNet tower
    ("model.global_only=maybe", "model.global_only", "expected true or false"),
    ("model.grab_dim=255", "model.grab_dim", "must be a positive even number, got 255"),
    ("model.grab_dim=0", "model.grab_dim", "must be a positive even number, got 0"),
    ("model.selection=median", "model.selection",
     "must be one of mars, mean_max, mean_min, std_max, std_min or layer:<i>, got 'median'"),
    ("model.selection=layer:x", "model.selection", "layer:<i> needs an integer, got 'layer:x'"),
    ("model.selection=layer:4", "model.selection", "layer 4 does not exist; tiny has 4 layers (0..3)"),
    ("model.mars_layers=[3, 1]", "model.mars_layers", "need ascending distinct layer indices >= 0, got (3, 1)"),
    ("model.mars_layers=[]", "model.mars_layers", "need ascending distinct layer indices >= 0, got ()"),
    ("model.mars_layers=[1, 4]", "model.mars_layers", "layer 4 does not exist; tiny has 4 layers (0..3)"),
    ("model.discard_ratio=1", "model.discard_ratio", "must be in [0, 1), got 1.0"),
    ("model.ats=linear", "model.ats", "must be one of step, epoch, fixed, got 'linear'"),
    ("model.p_start=1.5", "model.p_start / model.p_end", "need 0 < p_end <= p_start <= 1, got p_start=1.5, p_end=0.5"),
    ("model.p_end=0", "model.p_start / model.p_end", "need 0 < p_end <= p_start <= 1, got p_start=0.65, p_end=0.0"),
    ("model.t_small=0", "model.t_small", "expected a positive number of epochs or steps"),
    ("model.t_small=10 hours", "model.t_small", "got '10 hours'"),
    ("model.activation=relu", "model.activation", "must be one of auto, quick_gelu, gelu, got 'relu'"),
    ("model.fixed_ratio=0", "model.fixed_ratio", "must be in (0, 1], got 0.0"),
    ("model.tau=0", "model.tau", "must be > 0, got 0.0"),
    ("model.tau=.nan", "model.tau", "must be a finite number, got nan"),
    ("model.margin=-0.1", "model.margin", "must be >= 0, got -0.1"),
    ("model.cid=maybe", "model.cid", "expected true or false"),
    ("model.id_loss=1", "model.id_loss", "expected true or false"),
    # train
    ("train.epochs=0", "train.epochs", "must be >= 1, got 0"),
    ("train.epochs=abc", "train.epochs", "cannot use 'abc': expected an integer"),
    ("train.epochs=2.5", "train.epochs", "cannot use 2.5: expected an integer"),
    ("train.batch_size=0", "train.batch_size", "must be >= 1, got 0"),
    ("train.batch_size=65", "train.batch_size",
     "65 is not divisible by world_size x train.grad_accum x data.num_instance = 1 x 1 x 2 = 2"),
    ("train.grad_accum=0", "train.grad_accum", "must be >= 1, got 0"),
    ("train.lr=0", "train.lr", "must be > 0, got 0.0"),
    ("train.lr=abc", "train.lr", "cannot use 'abc': expected a number"),
    ("train.lr=.inf", "train.lr", "must be a finite number, got inf"),
    ("train.grab_lr=-1", "train.grab_lr", "must be > 0, got -1.0"),
    ("train.head_lr_mult=0", "train.head_lr_mult", "must be > 0, got 0.0"),
    ("train.bias_lr_mult=0", "train.bias_lr_mult", "must be > 0, got 0.0"),
    ("train.weight_decay=-1e-4", "train.weight_decay", "must be >= 0, got -0.0001"),
    ("train.adam_betas=[0.9, 1.0]", "train.adam_betas", "each must be in [0, 1), got (0.9, 1.0)"),
    ("train.adam_betas=[0.9]", "train.adam_betas", "expected a list of 2 values"),
    ("train.adam_eps=0", "train.adam_eps", "must be > 0, got 0.0"),
    ("train.warmup_epochs=-1", "train.warmup_epochs", "must be >= 0, got -1.0"),
    ("train.warmup_factor=0", "train.warmup_factor", "must be in (0, 1], got 0.0"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio", "must be in [0, 1], got 1.5"),
    ("train.precision=fp16", "train.precision", "must be one of auto, fp32, bf16, got 'fp16'"),
    ("train.grad_clip=-1", "train.grad_clip", "must be >= 0, got -1.0"),
    ("train.deepspeed=zero9", "train.deepspeed",
     "must be one of zero0, zero1, zero2, zero2-offload, zero3 or a .json path, got 'zero9'"),
    ("train.device=tpu", "train.device", "must be one of auto, cpu, cuda, got 'tpu'"),
    ("train.checkpoint_every=-1", "train.checkpoint_every", "must be >= 0, got -1"),
    ("train.keep_last=0", "train.keep_last", "must be >= 1, got 0"),
    ("train.log_every=0", "train.log_every", "must be >= 1, got 0"),
    ("train.max_steps=-1", "train.max_steps", "must be >= 0, got -1"),
    ("train.schedule=hours", "train.schedule", "must be one of epochs, steps, got 'hours'"),
    ("train.schedule=steps", "train.max_steps", "schedule=steps needs the run's length in optimizer steps"),
    ("train.warmup_steps=-3", "train.warmup_steps", "must be >= 0, got -3"),
    ("train.cpu_threads=-1", "train.cpu_threads", "must be >= 0, got -1"),
    ("model.init_from=/no/such/run", "model.init_from", "is neither a run directory nor a model file"),
    ("train.nonfinite=maybe", "train.nonfinite", "must be one of skip, stop, got 'maybe'"),
    ("train.max_skipped_steps=-1", "train.max_skipped_steps", "must be >= 0, got -1"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s", "must be 1 second to 7 days (604800), got 0"),
    # eval
    ("eval.batch_size=0", "eval.batch_size", "must be >= 1, got 0"),
    ("eval.fusion_weights=[1.5]", "eval.fusion_weights", "need one or more weights, each in [0, 1], got (1.5,)"),
    ("eval.fusion_weights=[]", "eval.fusion_weights", "need one or more weights, each in [0, 1], got ()"),
    ("eval.every=0", "eval.every", "must be >= 1, got 0"),
    ("eval.every_steps=-1", "eval.every_steps", "must be >= 0, got -1"),
    ("eval.block_mb=0", "eval.block_mb", "must be >= 1, got 0"),
    ("train.report_to=slack", "train.report_to", "must be one of tensorboard, wandb, none, got 'slack'"),
    ("train.compile=yes please", "train.compile", "expected true or false"),
    ("train.grad_checkpointing=2", "train.grad_checkpointing", "cannot use 2: expected true or false"),
    ("eval.selection=first", "eval.selection", "must be one of both, train, last_layer, got 'first'"),
    ("eval.test_roots=['']", "eval.test_roots", "every entry must be a dataset folder or URL"),
    ("eval.keep_ratio=0", "eval.keep_ratio", "must be in (0, 1], got 0.0"),
    ("eval.panels=65", "eval.panels", "must be in [0, 64], got 65"),
    ("model.pretrained=openai", "model.pretrained", "tiny has no pretrained weights"),
    ("model.pretrained=/no/such/weights.pt", "model.pretrained", "file /no/such/weights.pt not found"),
]

# Fields any value of the right type is valid for (every YAML scalar coerces to a string).
UNCONSTRAINED = {
    "run_dir",            # any directory; one holding checkpoints is refused at start unless resuming
    "data.train_shards",  # shard URLs: checked when the shards are opened
    "train.resume",       # latest / a checkpoint directory: checked at start against the run directory
    "train.wandb_project",  # any W&B project name
}


@pytest.mark.parametrize("override,prefix,fragments", CASES, ids=[c[0] for c in CASES])
def test_invalid_value_names_its_field_and_the_allowed_values(override, prefix, fragments):
    with pytest.raises(ConfigError) as info:
        resolve_config("synthetic", None, [override]).validate(1)
    message = str(info.value)
    assert message.split(": ", 1)[0] == prefix, message  # names its own field(s), and only those
    assert override.split("=")[0] in message and "\n" not in message
    for fragment in (fragments,) if isinstance(fragments, str) else fragments:
        assert fragment in message


def test_every_field_has_a_validation_case_or_is_listed_as_unconstrained():
    fields = {f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS}
    for section in SECTIONS:
        fields |= {f"{section}.{f.name}" for f in dataclasses.fields(getattr(Config(), section))}
    covered = {override.split("=")[0] for override, _, _ in CASES}
    assert not fields - covered - UNCONSTRAINED, "add a case to CASES (or the field to UNCONSTRAINED)"
    assert not (covered | UNCONSTRAINED) - fields, "stale entries"
    assert not covered & UNCONSTRAINED


@pytest.mark.parametrize("overrides,message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'; did you mean train.lr?"),
    (["model.selction=mars"], "unknown config key 'model.selction'; did you mean model.selection?"),
    (["seeed=1"], "unknown config key 'seeed'; did you mean seed?"),
    (["optim.lr=1"], "unknown config key 'optim.lr' (no section 'optim'; sections: data, model, train, eval)"),
    (["train=1"], "train: is a section, not a value; set its fields as train.<field>=value (epochs, batch_size,"),
    (["train.lr"], "override 'train.lr': expected key=value"),
])
def test_unknown_keys_and_malformed_overrides(overrides, message):
    with pytest.raises(ConfigError) as info:
        resolve_config("synthetic", None, overrides)
    assert str(info.value).startswith(message)


def test_config_file_with_an_unknown_section_or_a_bad_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError) as info:
        resolve_config("synthetic", str(path))
    assert str(info.value) == (f"{path}: unknown config key 'optim.lr' (no section 'optim'; sections: data, model, "
                               "train, eval)")
    path.write_text("train:\n  nonfinite: maybe\n")
    with pytest.raises(ConfigError, match=r"^train\.nonfinite: must be one of skip, stop, got 'maybe'$"):
        resolve_config("synthetic", str(path)).validate(1)


def test_model_validate_alone_checks_the_arch_and_its_layers():
    cfg = resolve_config("synthetic").model
    cfg.validate()  # tiny: its layers are looked up without building it
    cfg.mars_layers = (4, 11)
    with pytest.raises(ConfigError, match=r"^model\.mars_layers: layer 4 does not exist; tiny has 4 layers"):
        cfg.validate()
    cfg.validate(num_layers=12)  # the built model's count wins


def test_cli_exits_2_naming_the_field_and_the_allowed_values():
    run = run_train(["train.nonfinite=maybe"], check=False)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "train.nonfinite" in run.stderr and "skip, stop" in run.stderr
    assert run.stderr.strip().splitlines()[-1] == "error: train.nonfinite: must be one of skip, stop, got 'maybe'"

"""Speed options that must not change what the model computes: torch.compile of the towers and
activation checkpointing of the transformer blocks, against eager on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from itself.archs import clip_config
from itself.config import ModelConfig
from itself.losses import total_loss
from itself.model import ITSELF
from itself.model.clip import CLIP


def _model() -> ITSELF:
    torch.manual_seed(0)
    return ITSELF(ModelConfig(arch="tiny", pretrained="", grab_dim=32, mars_layers=(1, 3)), num_ids=4,
                  image_size=(48, 16))


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 40000, (8, 77), generator=g)
    for i, n in enumerate((5, 9, 12, 20, 7, 30, 15, 11)):
        tokens[i, 0], tokens[i, n], tokens[i, n + 1:] = 49406, 49407, 0
    return {"images": torch.randn(8, 3, 48, 16, generator=g), "tokens": tokens, "pids": torch.arange(8) // 2}


def _step(model: ITSELF, step: int = 3) -> tuple[dict, dict, dict]:
    """(loss terms, parameter gradients, BatchNorm statistics) of one training step."""
    model.zero_grad(set_to_none=True)
    out = model(_batch(), step=step)
    total_loss(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    return {k: float(torch.as_tensor(v).detach()) for k, v in out.items()}, grads, stats


def _assert_same_step(a, b, rtol: float, atol: float) -> None:
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = a, b
    assert loss_a.keys() == loss_b.keys() and all(loss_b[k] == pytest.approx(v, rel=rtol) for k, v in loss_a.items())
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 80  # (the towers', GRAB's and the heads')
    scale = max(float(g.abs().max()) for g in grads_a.values())  # (some gradients are ~0: BN removes fc1's bias)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=atol * scale, msg=name)
    for name in stats_a:
        torch.testing.assert_close(stats_b[name], stats_a[name], rtol=rtol, atol=atol)


def test_gradient_checkpointing_gives_the_gradients_of_the_plain_step():
    # Stated tolerance: 1e-6 (recomputation runs the same kernels in the same order).
    plain, checkpointed = _model(), _model()
    checkpointed.speed_options(grad_checkpointing=True)
    _assert_same_step(_step(plain), _step(checkpointed), rtol=1e-6, atol=1e-6)
    # The captured attention (MARS reads layers 1 and 3) is the same, so the same tokens are kept.
    with torch.no_grad():
        assert torch.equal(plain.encode_images(_batch()["images"])[1]["train"],
                           checkpointed.encode_images(_batch()["images"])[1]["train"])


@pytest.fixture(scope="module")
def compiled_steps():
    """Five training steps of an eager model and of a torch.compile'd copy through an ATS schedule over
    4 steps, compiled once for both tests below (inductor's compilation is minutes on 2 cores):
    {"steps": [(eager step, compiled step)], "frames": compiled frames after each step, "graph_breaks",
    "encoded": [(compiled, eager) no_grad image and text encodings], "frames_after_encoding"}."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    # `tiny` with 2 blocks per tower instead of 4: inductor compiles every block's kernels, and on 2
    # cores a cold compilation took 148 s instead of 181 (what is compiled is the same code).
    clip = clip_config("tiny")
    clip["vision_cfg"]["layers"] = clip["text_cfg"]["layers"] = 2
    cfg = ModelConfig(arch="tiny", pretrained="", grab_dim=32, mars_layers=(0, 1), t_small="4 steps")
    eager = ITSELF(cfg, num_ids=4, image_size=(48, 16), clip=CLIP(clip, (48, 16), quick_gelu=False))
    compiled = copy.deepcopy(eager)
    compiled.speed_options(compile=True)
    steps, frames = [], []
    for t in range(1, 6):
        steps.append((_step(eager, t), _step(compiled, t)))
        frames.append(counters["frames"]["ok"])
    graph_breaks = dict(counters["graph_break"])
    with torch.no_grad():
        images, tokens = _batch()["images"], _batch()["tokens"]
        encoded = [(compiled.encode_images(images)[1]["train"], eager.encode_images(images)[1]["train"]),
                   (compiled.encode_texts(tokens)[1]["train"], eager.encode_texts(tokens)[1]["train"])]
    return {"steps": steps, "frames": frames, "graph_breaks": graph_breaks, "encoded": encoded,
            "frames_after_encoding": counters["frames"]["ok"]}


@pytest.mark.slow
def test_a_compiled_step_gives_the_loss_and_gradients_of_eager(compiled_steps):
    # Stated tolerance: 1e-4 relative (inductor fuses and reorders float operations on CPU).
    (first_eager, first_compiled), (second_eager, second_compiled) = compiled_steps["steps"][:2]
    _assert_same_step(first_eager, first_compiled, rtol=1e-4, atol=1e-5)
    _assert_same_step(second_eager, second_compiled, rtol=1e-4, atol=1e-5)
    assert compiled_steps["frames"][:2] == [2, 2]  # (the second step needed no new compilation)


@pytest.mark.slow
def test_compiled_steps_through_the_ats_schedule_equal_eager_and_compile_each_tower_once(compiled_steps):
    # ATS over 4 steps: k (image, text) is (7, 45), (6, 42), (6, 40), (6, 37) at steps 1-4. The compiled
    # towers take whole token sequences and the selection of k tokens runs after them, so a new k is no
    # new shape for a compiled graph: each tower compiles once for training, once for no_grad encoding.
    ks = []
    for eager, compiled in compiled_steps["steps"]:
        _assert_same_step(eager, compiled, rtol=1e-4, atol=1e-5)
        ks.append((eager[0]["k_image"], eager[0]["k_text"]))
    assert ks == [(7, 45), (6, 42), (6, 40), (6, 37), (6, 37)]
    assert compiled_steps["frames"] == [2] * 5 and not compiled_steps["graph_breaks"]  # one compilation per tower
    for compiled, eager in compiled_steps["encoded"]:
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert compiled_steps["frames_after_encoding"] == 4

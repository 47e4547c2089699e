"""The ITSELF model: MARS, ATS, losses against hand-computed cases, selection rules, world-size
invariance with real gloo processes, and every strategy / schedule end to end on CPU."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.multiprocessing as mp

from itself.config import ConfigError, ModelConfig
from itself.losses import hard_negatives, tal_loss, total_loss
from itself.model import ITSELF
from itself.model.ats import KeepSchedule, num_keep
from itself.model.backbone import build_clip, interpolate_pos_embed
from itself.model.grab import select_tokens
from itself.model.mars import rollout, saliency

from dist_workers import model_loss_and_grads, world_size_invariance_worker

A0 = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.35, 0.4]]
A1 = [[0.05, 0.55, 0.4], [0.3, 0.25, 0.45], [0.15, 0.2, 0.65]]
ATTN = torch.tensor([[A0], [A1]])  # [L=2, B=1, 3, 3], already head-averaged


def test_rollout_two_layers_by_hand():
    # Layer 0: the 2 lowest of 9 entries (0.1, 0.2) are zeroed; (A + I) / 2; rows L1-normalised.
    a0 = torch.tensor([[0.75 / 0.9, 0.15 / 0.9, 0.0], [0.0, 0.8 / 0.95, 0.15 / 0.95], [0.125, 0.175, 0.7]])
    # Layer 1: the 2 lowest are 0.05 at [0, 0] (never discarded) and 0.15: only 0.15 goes.
    a1 = torch.tensor([[0.525, 0.275, 0.2], [0.15, 0.625, 0.225], [0.0, 0.1 / 0.925, 0.825 / 0.925]])
    expected = a1 @ a0
    torch.testing.assert_close(rollout(ATTN, [0, 1], 0.25)[0], expected)
    torch.testing.assert_close(rollout(ATTN, [1], 0.25)[0], a1)
    # Heads are averaged first: two heads whose mean is the attention above give the same rollout.
    heads = torch.stack([ATTN + 0.01, ATTN - 0.01], dim=2)
    torch.testing.assert_close(rollout(heads, [0, 1], 0.25), rollout(ATTN, [0, 1], 0.25))
    # No discarding: plain rollout.
    plain = lambda a: (torch.tensor(a) + torch.eye(3)) / 2  # rows of A + I sum to 2  # noqa: E731
    torch.testing.assert_close(rollout(ATTN, [0, 1], 0.0)[0], plain(A1) @ plain(A0))


def test_saliency_strategies_by_hand():
    mean_row0 = torch.tensor([0.275, 0.425, 0.3])
    std_row0 = torch.tensor([0.225, 0.125, 0.1])
    torch.testing.assert_close(saliency(ATTN, "mean_max", 0, 0.25)[0], mean_row0)
    torch.testing.assert_close(saliency(ATTN, "mean_min", 0, 0.25)[0], -mean_row0)
    torch.testing.assert_close(saliency(ATTN, "std_max", 0, 0.25)[0], std_row0)
    torch.testing.assert_close(saliency(ATTN, "std_min", 0, 0.25)[0], -std_row0)
    torch.testing.assert_close(saliency(ATTN, "layer:1", 0, 0.25)[0], torch.tensor(A1[0]))
    torch.testing.assert_close(saliency(ATTN, "mars", 0, 0.25, layers=[0, 1]), rollout(ATTN, [0, 1], 0.25)[:, 0])
    # Per-sample query rows (text: each caption's EOT position).
    two = torch.cat([ATTN, ATTN], dim=1)
    torch.testing.assert_close(saliency(two, "layer:0", torch.tensor([0, 2]), 0.25),
                               torch.tensor([A0[0], A0[2]]))
    with pytest.raises(ValueError, match="unknown selection strategy"):
        saliency(ATTN, "median_max", 0, 0.25)


def test_num_keep_by_hand():
    # floor(192 * 0.65 * (0.5 / 0.65) ** (t / 100)), t clamped to [1, 100]
    assert num_keep(192, 0, 100, 0.65, 0.5) == 124  # t = 0 counts as 1: 124.47
    assert num_keep(192, 1, 100, 0.65, 0.5) == 124
    assert num_keep(192, 50, 100, 0.65, 0.5) == 109  # 124.8 * 0.8771 = 109.46
    assert num_keep(192, 100, 100, 0.65, 0.5) == 96  # exactly p_end * n
    assert num_keep(192, 1000, 100, 0.65, 0.5) == 96
    assert num_keep(75, 100, 100, 0.65, 0.5) == 37


def test_reference_code_schedule_1450_steps():
    # The reference code: T = 1450 steps for every dataset, its step counter starting at 1;
    # k = int(n * 0.65 * (0.5 / 0.65) ** (t / 1450)): 124 / 48 tokens at the first step, then
    # 121 at step 145, 109 at step 725 and 96 / 37 from T on (hand-computed with the formula).
    sched = KeepSchedule.from_config(ModelConfig(), steps_per_epoch=145)
    assert sched.horizon() == 1450
    assert [sched.num_keep(192, t) for t in (1, 145, 725, 1450, 5000)] == [124, 121, 109, 96, 96]
    assert [sched.num_keep(75, t) for t in (1, 1450)] == [48, 37]


def test_keep_schedule_modes():
    step = KeepSchedule("step", 0.65, 0.5, 10, "epochs", fixed_ratio=0.5, steps_per_epoch=10)
    assert step.num_keep(192, 50) == num_keep(192, 50, 100, 0.65, 0.5) and step.num_keep(192, None) == 96
    epoch = KeepSchedule("epoch", 0.65, 0.5, 10, "epochs", fixed_ratio=0.5, steps_per_epoch=10)
    assert epoch.num_keep(192, 1) == epoch.num_keep(192, 10) == num_keep(192, 1, 10, 0.65, 0.5)  # first epoch
    assert epoch.num_keep(192, 50) == num_keep(192, 5, 10, 0.65, 0.5) and epoch.num_keep(192, 95) == 96
    in_steps = KeepSchedule("epoch", 0.65, 0.5, 100, "steps", fixed_ratio=0.5, steps_per_epoch=10)
    assert in_steps.horizon() == 10  # 100 steps of 10 per epoch: T = 10 epochs
    fixed = KeepSchedule("fixed", 0.65, 0.5, 10, "epochs", fixed_ratio=0.4)
    assert fixed.num_keep(192, 1) == fixed.num_keep(192, None) == 76


def test_tal_two_pairs_by_hand():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    # Each of the 4 rows: -0.8 (its positive) + tau * log(exp(0.6 / tau)) (its one negative) + margin.
    assert tal_loss(v, t, torch.tensor([0, 1]), tau=0.015, margin=0.3).item() == pytest.approx(4 * 0.1, abs=1e-5)
    assert tal_loss(v, t, torch.tensor([0, 1]), tau=0.015, margin=0.1).item() == 0.0  # within the margin
    assert tal_loss(v, t, torch.tensor([3, 3]), tau=0.015, margin=0.3).item() == 0.0  # no negatives


def test_hard_negatives_with_repeated_person_ids():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.3],
                        [0.7, 0.95, 0.5, 0.2],
                        [0.6, 0.4, 0.9, 0.1],
                        [0.2, 0.85, 0.3, 0.7]])
    text_neg, image_neg = hard_negatives(sim, torch.tensor([0, 0, 1, 2]))
    assert text_neg.tolist() == [3, 2, 0, 1]
    assert image_neg.tolist() == [2, 3, 1, 0]


def test_select_tokens_never_picks_excluded_tokens():
    feats = torch.randn(2, 6, 4)
    scores = torch.tensor([[9.0, 1, 2, 3, 8, 7], [9.0, 5, 4, 8, 7, 6]])  # excluded tokens score highest
    candidates = torch.tensor([[False, True, True, True, False, False], [False, True, True, False, False, False]])
    picked, valid = select_tokens(feats, scores, candidates, k=3)
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(picked[0], torch.nn.functional.normalize(feats[0, [3, 2, 1]], dim=-1))
    torch.testing.assert_close(picked[1, :2], torch.nn.functional.normalize(feats[1, [1, 2]], dim=-1))


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"arch": "tiny", "pretrained": "", "grab_dim": 32, "mars_layers": (1, 3), **kw})


def _batch(n: int = 8, seed: int = 0, image_size=(32, 16)) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 40000, (n, 77), generator=g)
    lengths = torch.randint(3, 20, (n,), generator=g)
    for i, n_tok in enumerate(lengths.tolist()):
        tokens[i, 0], tokens[i, n_tok], tokens[i, n_tok + 1:] = 49406, 49407, 0
    return {"images": torch.randn(n, 3, *image_size, generator=g), "tokens": tokens,
            "pids": torch.arange(n) // 2}


def test_grab_text_embedding_ignores_padding_and_special_tokens():
    torch.manual_seed(0)
    model = ITSELF(_tiny(), num_ids=4, image_size=(32, 16))
    batch = _batch()
    noisy = batch["tokens"].clone()
    eot = noisy.argmax(-1)
    for i, e in enumerate(eot.tolist()):
        noisy[i, e + 1:] = torch.randint(1, 40000, (77 - e - 1,))  # garbage where padding was
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            clean = model._text(batch["tokens"], step=None)[1]["train"]
            dirty = model._text(noisy, step=None)[1]["train"]
        torch.testing.assert_close(clean, dirty)
    # k (37 of 75) exceeds every caption's length (< 20 tokens): pooling saw only real tokens.
    assert model.schedule.num_keep(75, None) == 37


def test_image_selection_excludes_cls():
    torch.manual_seed(0)
    model = ITSELF(_tiny(selection="layer:0"), num_ids=4, image_size=(32, 16)).eval()
    images = torch.randn(2, 3, 32, 16)
    tokens, attn = model.backbone.encode_image(images, (0,))
    scores, _ = model._scores(attn, (0,), "train", 0, tokens.shape[1] - 1, None)
    scores[:, 0] = 1e9  # even when CLS is the most salient token it is not kept
    cand = torch.ones_like(scores, dtype=torch.bool)
    cand[:, 0] = False
    _, valid = select_tokens(tokens, scores, cand, k=scores.shape[1])
    assert valid.sum(1).tolist() == [scores.shape[1] - 1] * 2


@pytest.mark.parametrize("selection", ["mars", "mean_max", "mean_min", "std_max", "std_min", "layer:2"])
@pytest.mark.parametrize("ats", ["step", "epoch", "fixed"])
def test_forward_backward_every_strategy_and_schedule(selection, ats):
    torch.manual_seed(0)
    model = ITSELF(_tiny(selection=selection, ats=ats), num_ids=4, image_size=(32, 16))
    out = model(_batch(), step=3)
    assert {k for k in out if k.endswith("_loss")} == {f"{l}_{b}_loss" for l in ("tal", "cid", "id")
                                                      for b in ("global", "grab")}
    loss = total_loss(out)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.grab_image.fc1.weight.grad.abs().sum() > 0 and model.grab_text.linear.weight.grad.abs().sum() > 0
    glob, grab = model.eval().encode_text(_batch()["tokens"])
    assert glob.shape == (8, 64) and grab.shape == (8, 32)


def test_baseline_is_global_only():
    model = ITSELF(_tiny(global_only=True), num_ids=4, image_size=(32, 16))
    out = model(_batch(), step=0)
    assert {k for k in out if k.endswith("_loss")} == {"tal_global_loss", "cid_global_loss", "id_global_loss"}
    assert model.encode_image(torch.randn(2, 3, 32, 16))[1] is None
    assert model.capture_layers(4) == () and model.capture_layers(4, ("last_layer@0.4",)) == ()


@pytest.mark.slow
def test_world_size_invariance_two_gloo_processes(tmp_path):
    kwargs = dict(cfg=_tiny(), num_ids=4, image_size=(32, 16))
    batch = _batch(8, seed=1)
    single_loss, single_img_grad, single_grads = model_loss_and_grads(kwargs, batch, step=2)
    mp.spawn(world_size_invariance_worker, args=(2, str(tmp_path / "init"), kwargs, batch, 2, str(tmp_path)),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(ranks[0]["loss"] + ranks[1]["loss"], single_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["image_grad"] for r in ranks]), single_img_grad, rtol=1e-5, atol=1e-5)
    assert set(ranks[0]["grads"]) == set(single_grads)
    for name, g in single_grads.items():
        torch.testing.assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], g, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_vit_b16_builds_with_the_384x128_grid():
    model = ITSELF(ModelConfig(arch="ViT-B-16", pretrained=""), num_ids=10, image_size=(384, 128)).eval()
    visual = model.backbone.clip.visual
    assert tuple(visual.grid_size) == (24, 8) and visual.positional_embedding.shape == (193, 768)
    assert model.backbone.num_patches == 192
    assert all(p.dim() > 0 for p in model.parameters()), "0-dim parameters crash DeepSpeed"
    glob, grab = model.encode_image(torch.randn(1, 3, 384, 128))
    assert glob.shape == (1, 512) and grab.shape == (1, 4096)
    assert model.schedule.num_keep(192, None) == 96
    _, grabs = model.encode_images(torch.randn(1, 3, 384, 128), ("train", "last_layer@0.4"))
    assert set(grabs) == {"train", "last_layer@0.4"} and not torch.equal(grabs["train"], grabs["last_layer@0.4"])
    _, keep = model.patch_selection(torch.randn(1, 3, 384, 128), "last_layer@0.4")
    assert keep.shape == (1, 76)  # the reference code's k = int(192 * 0.4)


@pytest.mark.parametrize("arch,image_size,quick_gelu", [("tiny", (48, 16), False), ("tiny-deep", (64, 32), True),
                                                      ("ViT-S-32", (128, 64), True)])
def test_the_backbone_is_open_clips_clip_weight_for_weight_and_output_for_output(arch, image_size, quick_gelu):
    # Our CLIP (itself/model/clip.py) is built without importing open_clip; built from the same
    # seed, open_clip's must have the same parameters in the same order (ZeRO checkpoints flatten
    # them in that order) and give the same outputs, bit for bit.
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from itself.archs import clip_config
    from itself.model.backbone import ClipBackbone

    torch.manual_seed(1)
    ours = build_clip(arch, image_size, activation="quick_gelu" if quick_gelu else "gelu").eval()
    torch.manual_seed(1)
    if arch in ("tiny", "tiny-deep"):
        c = clip_config(arch)
        theirs = CLIP(c["embed_dim"], CLIPVisionCfg(**{**c["vision_cfg"], "image_size": image_size}),
                      CLIPTextCfg(**c["text_cfg"]), quick_gelu=quick_gelu)
    else:
        theirs = open_clip.create_model(arch, pretrained=None, force_image_size=image_size, force_quick_gelu=quick_gelu)
    theirs.eval()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters() if n != "logit_scale"]
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[name]), name
    images = torch.randn(2, 3, *image_size)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[0, :5], tokens[1, :9] = torch.tensor([49406, 320, 1929, 530, 49407]), torch.randint(1, 49406, (9,))
    tokens[1, 8] = 49407
    with torch.no_grad():
        image_tokens, _ = ClipBackbone(ours).encode_image(images)
        text_tokens, _ = ClipBackbone(ours).encode_text(tokens)
        assert torch.equal(image_tokens[:, 0], theirs.encode_image(images))  # (the class token, projected)
        assert torch.equal(text_tokens[torch.arange(2), tokens.argmax(-1)], theirs.encode_text(tokens))  # (EOT)
        captured, _ = ClipBackbone(ours).encode_image(images, (1,))  # (explicit softmax in block 1: other rounding)
        torch.testing.assert_close(captured[:, 0], theirs.encode_image(images), rtol=1e-5, atol=1e-5)


def test_every_offered_architecture_has_open_clips_parameters():
    # Names and shapes of every named config the backbone offers, built on the meta device (no
    # memory, no compute) by open_clip and by us: the defaults filled in for head_width, mlp_ratio
    # and the rest are open_clip's.
    import copy
    import json

    import open_clip
    from open_clip.model import CLIP

    from itself.archs import known_archs

    seen = set()
    for arch in known_archs()[2:]:  # (after tiny and tiny-deep: open_clip has no such configs)
        config = copy.deepcopy(open_clip.get_model_config(arch))
        config["vision_cfg"]["image_size"] = (224, 224)
        shape = json.dumps({k: v for k, v in config.items() if k != "quick_gelu"}, sort_keys=True)
        if shape in seen:  # (an activation or another image size: the same parameters)
            continue
        seen.add(shape)
        with torch.device("meta"):
            ours, theirs = build_clip(arch, (224, 224)), CLIP(**config)
        assert [(n, p.shape) for n, p in ours.named_parameters()] == \
               [(n, p.shape) for n, p in theirs.named_parameters() if n != "logit_scale"], arch


def test_captions_are_tokenised_as_open_clip_tokenises_them():
    import random

    from open_clip.tokenizer import SimpleTokenizer

    from itself.data.bpe import BytePairEncoder

    theirs, ours = SimpleTokenizer(), BytePairEncoder()
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:'\"!?-&#<>éüñ中🙂\t\n"
    captions = ["A woman in a RED coat &amp;amp; blue jeans, carrying a bag.", "He's wearing  black\tshoes; it'll rain",
                "naïve café, 12 items ÄÖÜ ß", "The Mona Lisa doesnâ€™t have eyebrows.", "<start_of_text> x <END_OF_TEXT>",
                "emoji 🙂👍, 中文字符, العربية", "", "   ", "x", "1234567890", "don't can't i'm you've we'd they're",
                *("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(500))]
    for caption in captions:
        assert ours.encode(caption) == theirs.encode(caption), caption
    assert (ours.sot_token_id, ours.eot_token_id, ours.vocab_size) == (theirs.sot_token_id, theirs.eot_token_id, 49408)


def test_local_weights_are_loaded_with_position_embedding_interpolated(tmp_path):
    torch.manual_seed(0)
    square = build_clip("tiny", (32, 32))  # a 4x4 grid, like CLIP's square pretraining grid
    path = tmp_path / "clip.pt"
    torch.save(square.state_dict(), path)
    loaded = build_clip("tiny", (96, 32), pretrained=str(path))  # 12x4 grid
    pos = loaded.visual.positional_embedding
    assert pos.shape == (1 + 48, 64)
    torch.testing.assert_close(pos[0], square.visual.positional_embedding[0])  # CLS kept
    torch.testing.assert_close(pos, interpolate_pos_embed(square.visual.positional_embedding, (12, 4)))
    torch.testing.assert_close(loaded.transformer.resblocks[0].attn.in_proj_weight,
                               square.transformer.resblocks[0].attn.in_proj_weight)


@pytest.mark.parametrize("change,message", [
    (dict(p_start=0.4, p_end=0.5), "model.p_start / model.p_end"),
    (dict(mars_layers=(3, 1)), "model.mars_layers"),
    (dict(mars_layers=(1, 7)), "model.mars_layers: layer 7 does not exist"),
    (dict(selection="median"), "model.selection"),
    (dict(ats="linear"), "model.ats"),
    (dict(arch="ViT-Q-99"), "model.arch"),
    (dict(arch="ViT-M-16-alt"), "model.arch"),  # (layer scale: open_clip builds another network)
    (dict(arch="ViT-L-14-CLIPA"), "model.arch"),  # (a BERT tokenizer, no causal mask)
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises((ConfigError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        ITSELF(dataclasses.replace(_tiny(), **change), num_ids=4, image_size=(32, 16))


def test_softmax_attention_capture_matches_the_fused_path():
    torch.manual_seed(0)
    model = ITSELF(_tiny(selection="mean_max"), num_ids=4, image_size=(32, 16)).eval()
    images, tokens = torch.randn(2, 3, 32, 16), _batch(2)["tokens"]
    with torch.no_grad():
        fused_img, _ = model.backbone.encode_image(images, ())
        captured_img, attn = model.backbone.encode_image(images, (0, 1, 2, 3))
        fused_txt, _ = model.backbone.encode_text(tokens, ())
        captured_txt, tattn = model.backbone.encode_text(tokens, (0, 1, 2, 3))
    torch.testing.assert_close(fused_img, captured_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_txt, captured_txt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4, 2, 9))
    assert math.isclose(float(tattn[0, 0, 0, 1:].abs().sum()), 0.0, abs_tol=1e-6)  # causal text attention


def test_bf16_forward_backward_on_cpu():
    # DeepSpeed's bf16 mode casts the whole model; heads and losses must accept it (losses in fp32).
    torch.manual_seed(0)
    model = ITSELF(_tiny(), num_ids=4, image_size=(32, 16)).to(torch.bfloat16)
    batch = _batch()
    batch["images"] = batch["images"].to(torch.bfloat16)
    out = model(batch, step=1)
    loss = total_loss(out)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    glob, grab = model.eval().encode_image(batch["images"])
    assert glob.dtype == grab.dtype == torch.float32

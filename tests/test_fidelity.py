"""The paper presets build and train the model the ITSELF authors trained: OpenAI CLIP weights run
with QuickGELU and a bilinearly resized position grid (checked against an independent forward
written here), the reference code's learning-rate groups, and fp32 master weights in model.pt."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from itself.config import ConfigError
from itself.engine import param_groups
from itself.evaluate import evaluate
from itself.fusion import fused_key
from itself.model import ITSELF
from itself.model.export import load_exported
from itself.presets import get_preset
from runs import run_train, small_run_args

WIDTH, TEXT_WIDTH, EMBED, LAYERS, VOCAB, CONTEXT = 768, 512, 512, 12, 49408, 77


# ----------------------------------------------------------------------------- OpenAI CLIP by hand


def openai_vit_b16_state_dict(seed: int = 0) -> dict:
    """A random state dict with OpenAI's ViT-B/16 CLIP key names and shapes, scaled like a trained
    model (weights ~ 1/sqrt(fan-in), so activations keep their size through the 12 blocks and the
    activation function matters as much as in the real model)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std: torch.randn(*shape, generator=g) * std  # noqa: E731
    sd = {"visual.conv1.weight": rand(WIDTH, 3, 16, 16, std=(3 * 16 * 16) ** -0.5),
          "visual.class_embedding": rand(WIDTH, std=1.0),
          "visual.positional_embedding": rand(197, WIDTH, std=1.0),
          "visual.proj": rand(WIDTH, EMBED, std=WIDTH ** -0.5),
          "token_embedding.weight": rand(VOCAB, TEXT_WIDTH, std=1.0),
          "positional_embedding": rand(CONTEXT, TEXT_WIDTH, std=1.0),
          "text_projection": rand(TEXT_WIDTH, EMBED, std=TEXT_WIDTH ** -0.5),
          "logit_scale": torch.tensor(4.6052)}
    for prefix, width in (("visual.", WIDTH), ("", TEXT_WIDTH)):
        for name in (("ln_pre", "ln_post") if prefix else ("ln_final",)):
            sd[f"{prefix}{name}.weight"] = 1 + rand(width, std=0.1)
            sd[f"{prefix}{name}.bias"] = rand(width, std=0.1)
        for i in range(LAYERS):
            p = f"{prefix}transformer.resblocks.{i}."
            sd.update({p + "attn.in_proj_weight": rand(3 * width, width, std=width ** -0.5),
                       p + "attn.in_proj_bias": rand(3 * width, std=0.1),
                       p + "attn.out_proj.weight": rand(width, width, std=width ** -0.5),
                       p + "attn.out_proj.bias": rand(width, std=0.1),
                       p + "ln_1.weight": 1 + rand(width, std=0.1), p + "ln_1.bias": rand(width, std=0.1),
                       p + "ln_2.weight": 1 + rand(width, std=0.1), p + "ln_2.bias": rand(width, std=0.1),
                       p + "mlp.c_fc.weight": rand(4 * width, width, std=width ** -0.5),
                       p + "mlp.c_fc.bias": rand(4 * width, std=0.1),
                       p + "mlp.c_proj.weight": rand(width, 4 * width, std=(4 * width) ** -0.5),
                       p + "mlp.c_proj.bias": rand(width, std=0.1)})
    return sd


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _block(sd, p, x, heads, act, mask=None):
    """One residual attention block of OpenAI's CLIP (pre-LN), written out."""
    b, n, d = x.shape
    y = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-5)
    q, k, v = (y @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + attn @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    y = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-5)
    y = act(y @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return x + y @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def reference_image(sd, images, act=quick_gelu, resize="bilinear"):
    """OpenAI CLIP's image embedding at 384x128: the 14x14 position grid resized to 24x8 as the
    ITSELF reference code does (F.interpolate, `resize` mode, class token kept)."""
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=16)  # [B, 768, 24, 8]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    pos = sd["visual.positional_embedding"]
    grid = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(24, 8), mode=resize).permute(0, 2, 3, 1).reshape(24 * 8, -1)
    x = x + torch.cat([pos[:1], grid])
    x = F.layer_norm(x, (WIDTH,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps=1e-5)
    for i in range(LAYERS):
        x = _block(sd, f"visual.transformer.resblocks.{i}.", x, 12, act)
    x = F.layer_norm(x[:, 0], (WIDTH,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps=1e-5)
    return x @ sd["visual.proj"]


def reference_text(sd, tokens, act=quick_gelu):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    for i in range(LAYERS):
        x = _block(sd, f"transformer.resblocks.{i}.", x, 8, act, mask)
    x = F.layer_norm(x, (TEXT_WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]


@pytest.fixture(scope="module")
def openai_file(tmp_path_factory):
    sd = openai_vit_b16_state_dict()
    path = tmp_path_factory.mktemp("weights") / "ViT-B-16-openai-layout.pt"
    torch.save(sd, path)
    return sd, path


def _inputs():
    g = torch.Generator().manual_seed(1)
    tokens = torch.zeros(2, CONTEXT, dtype=torch.long)
    for i, n in enumerate((9, 30)):
        tokens[i, 0], tokens[i, 1:n] = 49406, torch.randint(1, 40000, (n - 1,), generator=g)
        tokens[i, n] = 49407
    return torch.randn(2, 3, 384, 128, generator=g), tokens


def _cosines(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.slow
def test_openai_weights_run_as_openai_clip_with_quickgelu_and_bilinear_position_resize(openai_file):
    sd, path = openai_file
    cfg = get_preset("cuhk-pedes")
    cfg.model.pretrained = str(path)
    model = ITSELF(cfg.model, num_ids=10, image_size=cfg.data.image_size).eval()
    images, tokens = _inputs()
    with torch.no_grad():
        ours_img, ours_txt = model.encode_image(images)[0], model.encode_text(tokens)[0]
        ref_img, ref_txt = reference_image(sd, images), reference_text(sd, tokens)
        # What a GELU build or a bicubic resize would give: measurably different embeddings.
        gelu_img, gelu_txt = reference_image(sd, images, act=F.gelu), reference_text(sd, tokens, act=F.gelu)
        bicubic_img = reference_image(sd, images, resize="bicubic")
    same = [_cosines(ours_img, ref_img), _cosines(ours_txt, ref_txt)]
    assert min(float(c.min()) for c in same) >= 0.99999, same
    # The check can fail: a GELU build (about 0.99996 here) or a bicubic resize (about 0.9995)
    # falls below the bound.
    wrong = [_cosines(ours_img, gelu_img), _cosines(ours_txt, gelu_txt), _cosines(ours_img, bicubic_img)]
    assert max(float(c.max()) for c in wrong) < 0.99999, wrong


def test_a_gelu_build_of_openai_weights_is_refused(openai_file):
    _, path = openai_file
    gelu = dataclasses.replace(get_preset("cuhk-pedes").model, pretrained=str(path), activation="gelu")
    with pytest.raises(ConfigError, match="model.activation: the weights were trained with QuickGELU"):
        ITSELF(gelu, num_ids=10, image_size=(384, 128))
    b32 = dataclasses.replace(get_preset("cuhk-pedes").model, pretrained=str(path), arch="ViT-B-32")
    with pytest.raises(ConfigError, match=r"holds weights of another architecture .*visual.conv1.weight \(768, 3, 16"):
        ITSELF(b32, num_ids=10, image_size=(384, 128))
    cfg = get_preset("rstpreid")
    cfg.model.activation = "gelu"  # with the `openai` tag: refused before any work, nothing downloaded
    with pytest.raises(ConfigError, match="model.activation: the weights were trained with QuickGELU"):
        cfg.validate()


# ----------------------------------------------------------------------------- optimizer groups


def reference_code_lr(key: str) -> tuple[float, float]:
    """The reference code's solver/build.py rules, verbatim, on its own parameter names."""
    lr, weight_decay = 1e-5, 4e-5
    if "cross" in key:
        lr = 1e-5 * 5
    if "bias" in key:
        lr, weight_decay = 1e-5 * 2, 0.0
    if "classifier" in key or "mlm_head" in key:
        lr = 1e-5 * 5
    if "visul_emb_layer" in key:
        lr = 0.001
    if "texual_emb_layer" in key:
        lr = 0.001
    return lr, weight_decay


REFERENCE_NAMES = (  # our module -> the reference code's
    ("backbone.clip.", "base_model."), ("grab_image.", "visul_emb_layer."), ("grab_text.", "texual_emb_layer."),
    ("cid_heads.global.mlp.", "mlp_global."), ("cid_heads.grab.mlp.", "mlp_grab."),
    ("cid_heads.global.classifier.", "classifier_global."), ("cid_heads.grab.classifier.", "classifier_grab."),
    ("id_heads.global.", "classifier_id_global."), ("id_heads.grab.", "classifier_id_grab."))


def test_parameter_groups_are_the_reference_codes_for_the_paper_preset():
    cfg = get_preset("cuhk-pedes")
    cfg.model.pretrained = ""
    model = ITSELF(cfg.model, num_ids=10, image_size=cfg.data.image_size)
    ours = {id(p): (g["lr"], g["weight_decay"]) for g in param_groups(model, cfg) for p in g["params"]}
    table = {}
    for name, p in model.named_parameters():
        ref = next(name.replace(a, b, 1) for a, b in REFERENCE_NAMES if name.startswith(a))
        table[name] = (ours[id(p)], reference_code_lr(ref))
    assert len(table) == len(ours) == sum(1 for _ in model.parameters())
    wrong = {n: v for n, v in table.items() if v[0] != pytest.approx(v[1])}
    assert not wrong, wrong
    # What the rules give: the CID MLP at the base rate, its biases at 2x without decay; the
    # classifiers at 5x (their biases without decay); GRAB at 1e-3; attention biases are biases.
    for name, (lr, wd) in {"cid_heads.grab.mlp.0.weight": (1e-5, 4e-5), "cid_heads.grab.mlp.0.bias": (2e-5, 0.0),
                           "cid_heads.global.classifier.weight": (5e-5, 4e-5), "id_heads.grab.bias": (5e-5, 0.0),
                           "grab_text.fc1.weight": (1e-3, 4e-5), "grab_text.bn.bias": (1e-3, 0.0),
                           "backbone.clip.transformer.resblocks.0.attn.in_proj_bias": (2e-5, 0.0)}.items():
        assert table[name][0] == pytest.approx((lr, wd)), name


# ----------------------------------------------------------------------------- fp32 master weights


def fp32_masters_from_checkpoint(folder) -> dict:
    """The fp32 master weights of a one-rank ZeRO-1 checkpoint, read from its optimizer file by
    hand: each group's flat fp32 partition, cut in the order and shapes the model file lists."""
    model_states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    optim = torch.load(next(folder.glob("*optim_states.pt")), weights_only=False)["optimizer_state_dict"]
    masters = {}
    for shapes, flat in zip(model_states["param_shapes"], optim["single_partition_of_fp32_groups"]):
        offset = 0
        for name, shape in shapes.items():
            masters[name] = flat[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
    return masters


@pytest.mark.slow
def test_model_pt_holds_the_fp32_master_weights_under_bf16_zero1(small_dataset, tmp_path):
    run_dir = tmp_path / "bf16"
    run_train(small_run_args(small_dataset, f"run_dir={run_dir}", "train.epochs=1", "train.precision=bf16",
                             "train.deepspeed=zero1"))
    results = json.loads((run_dir / "results.json").read_text())
    exported = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    masters = fp32_masters_from_checkpoint(run_dir / "checkpoints" / results["checkpoint"])
    assert masters and all(torch.equal(exported[name], m) for name, m in masters.items())
    # fp32 precision is kept: the masters are not bf16 values cast back (most hold bits bf16 lacks).
    lossy = [n for n, m in masters.items() if not torch.equal(m, m.bfloat16().float())]
    assert len(lossy) > len(masters) // 2
    # results.json's test metrics are those of model.pt (the fp32 masters), not of the bf16 module
    # that trained: evaluating the exported file gives them exactly.
    model, cfg, a = load_exported(run_dir / "model.pt")
    metrics = evaluate(model, cfg, "test", rank=0, world=1, device=torch.device("cpu"),
                       selections=(model.selection,)).selections[model.selection]
    for branch, key in (("global", "global"), ("grab", "grab"), ("fused", fused_key(a))):
        assert metrics[key] == results["test"][branch], branch


# ----------------------------------------------------------------------------- token selection, patches


def test_ats_none_keeps_the_reference_codes_select_ratio_without_ats():
    cfg = get_preset("ats-none")
    assert (cfg.model.ats, cfg.model.fixed_ratio) == ("fixed", 0.4)
    cfg.model.arch, cfg.model.pretrained, cfg.model.mars_layers = "tiny", "", (1, 3)
    model = ITSELF(cfg.model, num_ids=4, image_size=(96, 32))  # a 12x4 grid: 48 patches
    assert [model.schedule.num_keep(48, step) for step in (0, 10_000)] == [19, 19]  # int(48 * 0.4), every step


def _visual_tokens(arch: str, stride: int, image_size=(384, 128)) -> tuple[tuple[int, int], int]:
    from itself.model.backbone import ClipBackbone, build_clip

    backbone = ClipBackbone(build_clip(arch, image_size, patch_stride=stride)).eval()
    with torch.no_grad():
        tokens, _ = backbone.encode_image(torch.randn(1, 3, *image_size))
    visual = backbone.clip.visual
    assert visual.positional_embedding.shape[0] == tokens.shape[1] == 1 + backbone.num_patches
    return tuple(visual.grid_size), tokens.shape[1]


def test_patch_stride_overlaps_patches_on_the_reference_codes_grid(tmp_path):
    # (H - patch) // stride + 1: 8-pixel patches every 4 pixels at 96x32 give 23x7, as 32-pixel
    # patches every 16 pixels at 384x128 (ViT-B/32 in the reference code).
    assert _visual_tokens("tiny", 0, (96, 32)) == ((12, 4), 1 + 48)
    assert _visual_tokens("tiny", 4, (96, 32)) == ((23, 7), 1 + 161)
    # Square pretrained weights are resized to the strided grid when loaded.
    from itself.model.backbone import build_clip, interpolate_pos_embed

    square = build_clip("tiny", (32, 32))
    torch.save(square.state_dict(), tmp_path / "clip.pt")
    loaded = build_clip("tiny", (96, 32), pretrained=str(tmp_path / "clip.pt"), patch_stride=4)
    assert loaded.visual.conv1.stride == (4, 4)
    torch.testing.assert_close(loaded.visual.positional_embedding,
                               interpolate_pos_embed(square.visual.positional_embedding, (23, 7)))
    with pytest.raises(ConfigError, match="model.patch_stride: must be in 0..8"):
        build_clip("tiny", (96, 32), patch_stride=9)


@pytest.mark.slow
def test_vit_b32_presets_take_32_pixel_patches_every_16_pixels():
    for name in ("vit-b32", "vit-b32-baseline"):
        assert (get_preset(name).model.arch, get_preset(name).model.patch_stride) == ("ViT-B-32", 16)
    assert _visual_tokens("ViT-B-32", 0) == ((12, 4), 12 * 4 + 1)
    assert _visual_tokens("ViT-B-32", 16) == ((23, 7), 23 * 7 + 1)

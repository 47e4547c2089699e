"""What a run shows its user: retrieval panels at every evaluation (chosen and drawn right), in
TensorBoard and in an offline Weights & Biases run."""

from __future__ import annotations

import io
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itself.panels import BORDER, RIGHT, WRONG, pick, read_samples, render
from runs import run_train, small_run_args


def tensorboard_images(folder: Path) -> list[tuple[str, int, Image.Image]]:
    """(tag, step, image) of every image summary in a run's TensorBoard event files."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            out += [(v.tag, event.step, Image.open(io.BytesIO(v.image.encoded_image_string)))
                    for v in event.summary.value if v.HasField("image")]
    return out


def test_pick_ranks_by_the_fused_score_and_keeps_queries_fixed():
    # Gallery images 10, 20, 30; 1-D embeddings make every cosine +1 or -1.
    gallery = {"global": torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0]]),
               "grab": {"train": torch.tensor([[0, 1.0], [1.0, 0], [0, -1.0]])},
               "pids": torch.tensor([1, 2, 3]), "keys": torch.tensor([10, 20, 30])}
    queries = {"global": torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]]),
               "grab": {"train": torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]])},
               "pids": torch.tensor([1, 2, 1, 2]), "keys": torch.tensor([10000, 20000, 10001, 20001])}
    # a = 0.8: query [1, 0] scores image 10 at 0.8, image 20 at 0.2, image 30 at -0.8.
    picked = pick(queries, gallery, "train", 0.8, n=2, k=2)
    assert [p["query"] for p in picked] == [10000, 20001]  # first and last: spread over the split
    assert [h["image_id"] for h in picked[0]["hits"]] == [10, 20] and picked[0]["pid"] == 1
    # a = 0.2 flips the order for the same query: GRAB now prefers image 20.
    assert [h["image_id"] for h in pick(queries, gallery, "train", 0.2, 1, 3)[0]["hits"]] == [20, 10, 30]
    assert pick(queries, gallery, "train", 0.5, n=10, k=9)[0]["hits"][2]["pid"] == 3  # capped at the gallery
    assert len(pick(queries, gallery, "train", 0.5, n=10)) == 4


def test_panels_outline_right_identities_green_and_show_the_caption(small_dataset):
    from itself.model import ITSELF
    from itself.presets import resolve_config

    cfg = resolve_config("synthetic", None, [f"data.root={small_dataset}", "data.image_size=[48,16]", "model.grab_dim=32"])
    model = ITSELF(cfg.model, num_ids=8, image_size=(48, 16)).eval()
    samples = read_samples(str(small_dataset), "val", set(range(10_000)))
    ids = sorted(samples)
    assert len(ids) == 16 and all(samples[i][0][:2] == b"\xff\xd8" for i in ids)  # every val image, JPEG bytes
    q = ids[0]
    picked = [{"query": q * 1000 + 1, "pid": 7, "hits": [{"image_id": ids[1], "pid": 7}, {"image_id": ids[2], "pid": 3}]}]
    (panel, caption), = render(model, picked, samples, (48, 16), scale=2)
    assert caption == samples[q][1][1]
    pixels = np.asarray(panel)
    top = pixels.shape[0] - (96 + 2 * BORDER) - 4  # tiles sit below the caption, 4 px from the bottom
    assert tuple(pixels[top, 4]) == RIGHT and tuple(pixels[top, 4 + 32 + 2 * BORDER + 4]) == WRONG
    assert panel.width == 4 + 2 * (32 + 2 * BORDER + 4)
    assert (pixels[:top, :, :] < 128).any()  # the caption's text is drawn


@pytest.mark.slow
def test_each_evaluation_logs_retrieval_panels_to_tensorboard(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    run_train(small_run_args(small_dataset, "train.epochs=2", "eval.panels=3", f"run_dir={run_dir}"))
    images = tensorboard_images(run_dir / "tensorboard")
    assert sorted({(tag, step) for tag, step, _ in images}) == [(f"val/retrievals/{i}", s) for i in range(3) for s in (8, 16)]
    for _, _, im in images:  # caption, then 5 outlined tiles of 2x the 48x16 input
        assert im.width == 4 + 5 * (32 + 2 * BORDER + 4) and im.height > 96 + 2 * BORDER
        colours = {tuple(np.asarray(im.convert("RGB"))[im.height - 5 - BORDER, 4 + t * (32 + 2 * BORDER + 4)]) for t in range(5)}
        assert colours <= {RIGHT, WRONG}


@pytest.mark.slow
def test_offline_wandb_run_holds_the_metrics_and_panels(small_dataset, tmp_path):
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "my-wandb"  # (the user's WANDB_DIR wins)
    wandb_dir.mkdir()
    run_train(small_run_args(small_dataset, "train.epochs=1", "train.report_to=wandb", f"run_dir={run_dir}"),
              launcher=[sys.executable], WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(wandb_dir))
    assert not (run_dir / "wandb").exists()
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"train/loss" in data and b"eval/metrics/global/R1" in data and b"val/retrievals" in data
    media = list(runs[0].glob("files/media/images/val/retrievals_*.png"))
    assert len(media) == 4 and all(Image.open(m).width == 4 + 5 * (32 + 2 * BORDER + 4) for m in media)
    assert not (run_dir / "tensorboard").exists()

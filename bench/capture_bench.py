"""What attention capture costs: forward + backward time and peak memory of ITSELF with the
global branch only (no capture), MARS (2 captured layers per tower) and a mean/std strategy
(all layers captured), run in one process on the same random batch; prints ratios to the baseline.

    python bench/capture_bench.py                      # ViT-B-16, 384x128, batch 64, bf16 on GPU
    python bench/capture_bench.py --arch tiny --image-size 96x32 --batch 32   # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from itself.config import ModelConfig  # noqa: E402
from itself.losses import total_loss  # noqa: E402
from itself.model import ITSELF  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--image-size", default="384x128")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    size = tuple(int(v) for v in args.image_size.split("x"))
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 40000, (args.batch, 77), generator=g)
    tokens[:, 0], tokens[:, 30], tokens[:, 31:] = 49406, 49407, 0
    batch = {"images": torch.randn(args.batch, 3, *size, generator=g).to(device, dtype),
             "tokens": tokens.to(device), "pids": (torch.arange(args.batch) // 2).to(device)}
    small = args.arch.startswith("tiny")
    layers = (1, 3) if small else (4, 11)
    settings = {"global only (no capture)": dict(global_only=True, mars_layers=layers),
                "MARS (2 layers captured)": dict(selection="mars", mars_layers=layers),
                "mean_max (all layers captured)": dict(selection="mean_max", mars_layers=layers)}
    print(f"{args.arch} {size[0]}x{size[1]} batch {args.batch} on {device.type} ({dtype}), {args.iters} iters")
    base = None
    for name, kw in settings.items():
        model = ITSELF(ModelConfig(arch=args.arch, pretrained="", grab_dim=256 if small else 4096, **kw), num_ids=100,
                       image_size=size).to(device, dtype).train()
        for _ in range(2):  # warm-up
            total_loss(model(batch, step=0)).backward()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.iters):
            total_loss(model(batch, step=0)).backward()
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / args.iters * 1000
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        base = base or ms
        print(f"{name:<32} {ms:8.1f} ms/iter  x{ms / base:5.2f}  peak {mem:6.2f} GiB  "
              f"{args.batch / ms * 1000:7.0f} pairs/s")
        del model


if __name__ == "__main__":
    main()

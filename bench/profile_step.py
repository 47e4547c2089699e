"""Where the time of one full ITSELF training step goes: a torch.profiler trace of a few steps,
summarised by phase (the model's profiler ranges: image tower, text tower, selection, GRAB,
losses; the backward pass; the optimizer) and by kind of kernel (attention, matmul,
elementwise/normalisation, reductions/selection), with the host gaps on a GPU (wall time the
device was idle).

    python bench/profile_step.py              # tiny config on CPU, 96x32, batch 64
    python bench/profile_step.py --gpu        # ViT-B/16, 384x128, bf16 autocast, batch 256
    python bench/profile_step.py --gpu --compile --grad-checkpointing --trace /tmp/step.json

On CPU the kernel times are CPU op times (no host gaps column).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from bench.step_bench import build, make_batch  # noqa: E402
from itself.losses import total_loss  # noqa: E402

PHASES = ("image_tower", "text_tower", "selection", "grab", "losses", "backward", "optimizer")
KINDS = {  # substrings of kernel / op names, first match wins
    "attention": ("flash", "attention", "softmax", "sdpa", "fmha", "efficient_attention"),
    "matmul": ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "cutlass", "sm90_xmma",
               "ampere", "conv"),
    "elementwise/norm": ("layer_norm", "layernorm", "batch_norm", "elementwise", "vectorized", "gelu", "aten::add",
                         "aten::mul", "aten::div", "aten::sub", "copy", "fill", "aten::to", "cat", "index"),
    "reduction/selection": ("reduce", "topk", "sort", "logsumexp", "max", "sum", "mean", "nll", "cross_entropy",
                            "gather", "scatter"),
}


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS.items() if any(s in low for s in keys)), "other")


def profiled_steps(model, batch, device, bf16: bool, steps: int, trace: str | None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = total_loss(model(batch, step=10))
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - t
    if trace:
        prof.export_chrome_trace(trace)
    return prof, wall / steps


def summarise(prof, wall: float, steps: int, on_gpu: bool) -> None:
    events = prof.key_averages()
    time_of = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    phases = {e.key: (e.device_time_total if on_gpu else e.cpu_time_total) / steps / 1e3 for e in events
              if e.key in PHASES}
    kinds = defaultdict(float)
    kernels = []
    for e in events:
        if e.key in PHASES or time_of(e) <= 0:
            continue
        ms = time_of(e) / steps / 1e3
        kinds[kind_of(e.key)] += ms
        kernels.append((ms, e.key))
    busy = sum(kinds.values())
    print(f"wall {wall * 1e3:.1f} ms/step; {'device busy' if on_gpu else 'op time'} {busy:.1f} ms/step"
          + (f"; host gaps {max(0.0, wall * 1e3 - busy):.1f} ms ({100 * max(0.0, 1 - busy / (wall * 1e3)):.0f}%)"
             if on_gpu else ""))
    print("\nby phase (inclusive, ms/step):")
    for name in PHASES:
        if name in phases:
            print(f"  {name:<14} {phases[name]:9.2f}  {100 * phases[name] / (wall * 1e3):5.1f}% of wall")
    print("\nby kind (self time, ms/step):")
    for name, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<20} {ms:9.2f}  {100 * ms / busy:5.1f}%")
    print("\ntop kernels / ops (self time, ms/step):")
    for ms, name in sorted(kernels, reverse=True)[:12]:
        print(f"  {ms:9.2f}  {name[:100]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--trace", help="also write a Chrome trace here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu:
        arch, size, grab_dim, layers, bf16, batch_size = "ViT-B-16", (384, 128), 4096, (4, 11), True, args.batch or 256
    else:
        arch, size, grab_dim, layers, bf16, batch_size = "tiny", (96, 32), 256, (1, 3), False, args.batch or 64
    model = build("itself", arch, size, device, grab_dim, layers)
    model.speed_options(grad_checkpointing=args.grad_checkpointing, compile=args.compile)
    batch = make_batch(batch_size, size, device)
    name = torch.cuda.get_device_name() if args.gpu else f"CPU x{torch.get_num_threads()} threads"
    print(f"full ITSELF {arch} {size[0]}x{size[1]}, batch {batch_size}, {'bf16' if bf16 else 'fp32'}, "
          f"compile {args.compile}, checkpointing {args.grad_checkpointing}, on {name}")
    prof, wall = profiled_steps(model, batch, device, bf16, args.steps, args.trace)
    summarise(prof, wall, args.steps, args.gpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One training step (forward, backward, optimizer) of the global-only baseline, full ITSELF
(MARS + GRAB + all losses), ITSELF capturing every layer, and the naive per-sample-loop reference
of full ITSELF; samples/s, MFU (FLOPs from torch's flop counter), peak GPU memory, ratios to the
baseline. (On CPU the allocator reuses memory across settings, so no peak is shown.)

    python bench/step_bench.py            # tiny config on CPU, 96x32, batch 64
    python bench/step_bench.py --gpu      # ViT-B/16, 384x128, bf16 autocast, batch 256, one GPU
    python bench/step_bench.py --quick    # a few small steps: checks naive == ours (the test runs this)
    python bench/step_bench.py --loop     # the real training loop (data, logging) against the bare step

`--loop` builds the synthetic set at the model's image size (pre-resized: no resize in the
loader), sets up the real trainer (DeepSpeed engine, persistent loader workers), runs one epoch
to warm up, then times an epoch of the loop (`Trainer.train_epoch`: loading, logging, the
step) against the same number of `Trainer.step` calls on batches already in memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.common import PeakRSS, gib  # noqa: E402
from bench.naive_itself import naive  # noqa: E402
from itself.config import ModelConfig  # noqa: E402
from itself.losses import total_loss  # noqa: E402
from itself.meter import gpu_peak_tflops  # noqa: E402
from itself.model import ITSELF  # noqa: E402

def make_batch(n: int, size, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 40000, (n, 77), generator=g)
    lengths = torch.randint(20, 60, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        tokens[i, 0], tokens[i, length], tokens[i, length + 1:] = 49406, 49407, 0
    return {"images": torch.randn(n, 3, *size, generator=g).to(device), "tokens": tokens.to(device),
            "pids": (torch.arange(n) // 2).to(device)}


SETTINGS = {  # kind: (model config changes, speed options)
    "baseline": (dict(global_only=True), {}), "itself": ({}, {}), "naive": ({}, {}),
    "all-layers": (dict(selection="mean_max"), {}), "compiled": ({}, dict(compile=True)),
    "checkpointed": ({}, dict(grad_checkpointing=True)),
}


def build(kind: str, arch: str, size, device, grab_dim: int, layers) -> ITSELF:
    changes, speed = SETTINGS[kind]
    torch.manual_seed(0)
    model = ITSELF(ModelConfig(arch=arch, pretrained="", grab_dim=grab_dim, mars_layers=layers, **changes),
                   num_ids=1000, image_size=size).to(device)
    model.speed_options(**speed)
    return model


def step_fn(model, batch, device, bf16: bool):
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = total_loss(model(batch, step=10))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def measure(kind, args, device, size, batch):
    model = build(kind, args.arch, size, device, args.grab_dim, args.layers)
    step = step_fn(model, batch, device, args.bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ctx = naive() if kind == "naive" else torch.enable_grad()
    with ctx:
        with PeakRSS() as mem:  # from the first step: that is when activations and optimizer state appear
            for _ in range(args.warmup):
                step()
            flops = FlopCounterMode(display=False)
            with flops:
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.iters):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t) / args.iters
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else mem.extra
    return seconds, flops.get_total_flops(), peak


def check_naive_matches(args, device, size, batch) -> bool:
    """The comparison is fair only if the naive reference computes the same loss and gradients."""
    fast = build("itself", args.arch, size, device, args.grab_dim, args.layers)
    slow = build("naive", args.arch, size, device, args.grab_dim, args.layers)
    lf = total_loss(fast(batch, step=10))
    with naive():
        ls = total_loss(slow(batch, step=10))
    lf.backward()
    with naive():
        ls.backward()
    pairs = [(a.grad, b.grad) for a, b in zip(fast.parameters(), slow.parameters()) if a.grad is not None]
    scale = max(float(a.abs().max()) for a, _ in pairs)  # BN-cancelled grads (biases before BN) are pure noise
    grads_equal = all(float((a - b).abs().max()) <= 1e-4 * scale for a, b in pairs)
    same = torch.allclose(lf, ls, rtol=1e-5) and grads_equal
    print(f"naive reference matches ours: loss {lf.item():.5f} vs {ls.item():.5f}, gradients equal: {grads_equal}")
    return same


def loop_vs_step(gpu: bool, quick: bool) -> int:
    """The loop's overhead over the step: ratio of an epoch of the training loop to the same
    number of bare steps, in one process, on the same engine."""
    import tempfile

    import shards
    from itself.presets import get_preset
    from itself.train import Trainer, claim_run_dir, start_training
    from shards.synthetic import SyntheticSpec

    cfg = get_preset("synthetic")
    if gpu:
        cfg.model.arch, cfg.data.image_size, cfg.train.batch_size, cfg.data.num_workers = "ViT-B-16", (384, 128), 256, 8
        cfg.model.grab_dim, cfg.model.mars_layers, cfg.train.precision, cfg.data.num_slots = 4096, (4, 11), "bf16", 0
        cfg.train.deepspeed = "zero1"
    spec = SyntheticSpec(num_ids=96 if quick else 480, image_size=cfg.data.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        shards.build_synthetic(Path(tmp) / "data", spec, progress=False)
        cfg.data.root, cfg.run_dir = str(Path(tmp) / "data"), str(Path(tmp) / "run")
        cfg.train.log_every, cfg.train.report_to = 10, "none"
        proc, _ = start_training(cfg)
        run, _, lock = claim_run_dir(cfg, proc)
        trainer = Trainer(cfg, proc, run, run.open_log(proc.rank, "none"))
        device = proc.device
        trainer.train_epoch()  # warm-up: workers started, allocations made
        trainer.state.epoch, trainer.state.micro_step = 1, 0
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        trainer.train_epoch()
        sync()
        loop = time.perf_counter() - t
        steps = len(trainer.loader)
        trainer.loader.set_epoch(2)
        batches = [[{k: v.to(device) for k, v in b.items()}] for b in trainer.loader]
        sync()
        t = time.perf_counter()
        for b in batches:
            trainer.step(b)
        sync()
        bare = time.perf_counter() - t
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"{cfg.model.arch} {cfg.data.image_size[0]}x{cfg.data.image_size[1]}, batch {cfg.train.batch_size}, "
          f"{cfg.data.num_workers} loader worker(s), {steps} steps, on {name}")
    print(f"training loop: {1000 * loop / steps:.1f} ms/step; bare step: {1000 * bare / steps:.1f} ms/step; "
          f"loop / step = {loop / bare:.3f} (target <= 1.05)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--loop", action="store_true", help="the real training loop against the bare step")
    p.add_argument("--compile", action="store_true", help="also full ITSELF with torch.compile of the towers")
    p.add_argument("--grad-checkpointing", action="store_true", help="also full ITSELF with activation checkpointing")
    p.add_argument("--batch", type=int)
    p.add_argument("--iters", type=int)
    args = p.parse_args(argv)
    if args.loop:
        return loop_vs_step(args.gpu, args.quick)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu:
        args.arch, size, args.grab_dim, args.layers, args.bf16 = "ViT-B-16", (384, 128), 4096, (4, 11), True
        batch_size, args.iters, args.warmup = args.batch or 256, args.iters or 10, 3
    else:
        args.arch, size, args.grab_dim, args.layers, args.bf16 = "tiny", (96, 32), 256, (1, 3), False
        batch_size, args.iters, args.warmup = args.batch or 64, args.iters or 5, 2
    if args.quick:
        size, batch_size, args.iters, args.warmup = (32, 16), 16, 1, 1
    batch = make_batch(batch_size, size, device)
    name = torch.cuda.get_device_name() if args.gpu else f"CPU x{torch.get_num_threads()} threads"
    print(f"{args.arch} {size[0]}x{size[1]}, batch {batch_size}, {'bf16 autocast' if args.bf16 else 'fp32'}, on {name}")
    ok = check_naive_matches(args, device, size, batch) if not args.gpu or args.quick else True
    peak_tflops = gpu_peak_tflops(name, "bf16") if args.gpu else None
    base = None
    print(f"{'setting':<34} {'ms/step':>9} {'x base':>7} {'samples/s':>10} {'GFLOP/step':>11} {'MFU':>6} {'peak mem':>10}")
    rows = [("baseline", "global only (baseline)"), ("itself", "full ITSELF (MARS 2 layers)"),
            ("all-layers", "ITSELF, all layers captured"), ("naive", "naive ITSELF (per-sample loops)")]
    rows += [("compiled", "full ITSELF, compiled towers")] if args.compile else []
    rows += [("checkpointed", "full ITSELF, grad checkpointing")] if args.grad_checkpointing else []
    for kind, label in rows:
        seconds, flops, peak = measure(kind, args, device, size, batch)
        base = base or seconds
        mfu = f"{100 * flops / seconds / (peak_tflops * 1e12):5.1f}%" if peak_tflops else "   - "
        print(f"{label:<34} {seconds * 1000:9.1f} {seconds / base:7.2f} {batch_size / seconds:10.1f} "
              f"{flops / 1e9:11.1f} {mfu:>6} {gib(peak) if device.type == 'cuda' else '-':>10}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

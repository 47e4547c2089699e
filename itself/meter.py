"""What a training window measured: losses, throughput, where the time went, model FLOPs
utilisation and peak memory. Values stay on the device between log intervals; reading them is one
host synchronisation and one all-reduce.
"""

from __future__ import annotations

import logging
import re
import resource
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Dense peak throughput per device for the precision a run trains in (TFLOP/s), from the vendors'
# data sheets: MFU is measured against these.
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0}, "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5}, "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp32": 31.2}, "V100": {"bf16": 125.0, "fp32": 15.7},
}


def gpu_peak_tflops(name: str, precision: str) -> float | None:
    """The dense peak of the GPU called `name` (torch.cuda.get_device_name), or None if unknown."""
    for model, peaks in GPU_PEAK_TFLOPS.items():
        if re.search(rf"\b{model}\b", name):
            return peaks.get(precision)
    return None


def cpu_peak_tflops(threads: int, cpuinfo: str | None = None) -> float | None:
    """An estimate of this CPU's fp32 peak for `threads` cores: cores x clock x FLOPs per cycle
    (2 FMA units: 32 with AVX2, 64 with AVX-512). None when /proc/cpuinfo does not say."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(1 << 20)
        except OSError:
            return None
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    if not flags or not mhz:
        return None
    flag_set = set(flags.group(1).split())
    per_cycle = 64 if "avx512f" in flag_set else 32 if {"avx2", "fma"} <= flag_set else 16
    return threads * float(mhz.group(1)) * 1e6 * per_cycle / 1e12


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The peak this rank's device runs at (an estimate on CPU), or None."""
    if device.type == "cuda":
        return gpu_peak_tflops(torch.cuda.get_device_name(device), precision)
    return cpu_peak_tflops(torch.get_num_threads())


def peak_memory_gib(device: torch.device) -> float:
    """The most memory this rank held: allocated CUDA memory since the last reset, or the process's
    peak resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # (KiB on Linux)


def count_flops_per_pair(model, batch: dict) -> float:
    """Model FLOPs of one training pair (image + caption), forward and backward: the towers and GRAB
    of `batch`, counted once with torch.utils.flop_counter (backward = 2 x forward, the usual
    convention; recomputation by activation checkpointing is not model FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    compiler = getattr(torch, "compiler", None)
    eager = compiler.set_stance("force_eager") if compiler is not None and hasattr(compiler, "set_stance") \
        else _nothing()
    with eager, FlopCounterMode(display=False) as counter:
        model.encode_images(batch["images"])
        model.encode_texts(batch["tokens"])
    return 3.0 * counter.get_total_flops() / max(1, batch["images"].shape[0])


@contextmanager
def _nothing():
    yield


def whole_parameters(module):
    """The module's parameters whole for a forward outside the engine: under ZeRO-3 each rank holds
    a shard of every parameter (empty tensors otherwise), so they are gathered for the duration
    (a collective: every rank counts on the same step)."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return _nothing()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


class StepMeter:
    """Per-step losses and report values, kept on the device and summed over a log window; the
    time spent waiting for data and the rest (compute) per step; read only at the log interval."""

    def __init__(self, world: int, device: torch.device, pairs_per_micro_step: int,
                 flops_per_pair: float | None = None, peak_tflops: float | None = None):
        self.world, self.device, self.pairs_per_micro_step = world, device, pairs_per_micro_step
        self.flops_per_pair, self.peak_tflops = flops_per_pair, peak_tflops
        self.current: dict[str, torch.Tensor] = {}  # the step in progress: sums over its micro-batches
        self.current_losses: list[torch.Tensor] = []
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_steps = self.steps = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def timed(self, loader, count: int, module, precision: str):
        """At most `count` batches of `loader`, the time spent waiting for each counted as data wait;
        the model FLOPs are counted on the first batch of the run."""
        batches, taken = iter(loader), 0
        while True:
            start = time.perf_counter()
            batch = next(batches, None)  # (one past `count`: the loader ends its epoch, and counts it)
            self.data_wait += time.perf_counter() - start
            if batch is None or taken >= count:
                return
            if self.flops_per_pair is None:
                self.count_flops(module, batch, precision)
            taken += 1
            yield batch

    def count_flops(self, module, batch: dict, precision: str) -> None:
        """Count the model FLOPs per pair once, on this micro-batch (in eval mode: nothing changes),
        and the device's peak they are measured against; the count is not part of the window."""
        was_training = module.training
        module.eval()
        try:
            with whole_parameters(module):
                self.flops_per_pair = count_flops_per_pair(module, {k: batch[k].to(self.device) for k in ("images", "tokens")})
        finally:
            module.train(was_training)
        self.peak_tflops = device_peak_tflops(self.device, precision)
        self.restart()

    def add(self, out: dict, loss: torch.Tensor) -> None:
        for k, v in {**out, "loss": loss}.items():
            v = (v.detach() if torch.is_tensor(v) else torch.tensor(float(v))).to(self.device, torch.float64)
            self.current[k] = self.current[k] + v if k in self.current else v
        self.current_losses.append(loss.detach())

    def commit(self) -> None:
        """The step was applied: its values join the window."""
        for k, v in self.current.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.micro_steps += len(self.current_losses)
        self.steps += 1
        self.current, self.current_losses = {}, []

    def discard(self) -> list[float]:
        """The step was skipped: its values leave the window. Returns its losses (this rank's, one per
        micro-batch) for the report."""
        losses = [float(v) for v in self.current_losses]
        self.current, self.current_losses = {}, []
        self.steps += 1
        return losses

    def read(self, **extra) -> dict | None:
        """Means per micro-batch over the window's applied steps (loss shares summed over ranks, the
        other report values as on this rank), pairs per second, per step the seconds waiting for
        data and the rest (compute), MFU and peak memory, and `extra`; None when every step was
        skipped. Starts the next window."""
        if not self.micro_steps:
            self.restart()
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # (the window's kernels are done: its time is whole)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        keys = sorted(self.sums)
        local = torch.stack([self.sums[k] for k in keys]) / self.micro_steps
        total = local.clone()
        if self.world > 1:
            dist.all_reduce(total)
        total, local = total.tolist(), local.tolist()
        values = {k: (total[i] if k.endswith("loss") else local[i]) for i, k in enumerate(keys)}
        pairs = self.micro_steps * self.pairs_per_micro_step
        steps = max(self.steps, 1)
        values.update(samples_per_s=pairs / elapsed, step_s=elapsed / steps, data_wait_s=self.data_wait / steps,
                      compute_s=(elapsed - self.data_wait) / steps, peak_mem_gib=peak_memory_gib(self.device))
        if self.flops_per_pair:
            achieved = self.flops_per_pair * pairs / elapsed / self.world / 1e12  # per rank
            values["tflops_per_rank"] = achieved
            if self.peak_tflops:
                values["mfu"] = achieved / self.peak_tflops
        self.restart()
        return values | extra


def progress_bar(rank: int, epoch: int, epochs: int, total: int, initial: int):
    """Rank 0's bar over an epoch's steps (off when not on a terminal); None on the other ranks."""
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                dynamic_ncols=True, mininterval=1.0, disable=None)


def show_rate(bar, values: dict, pairs_left: int) -> None:
    """The window's loss, rate and the time left (`pairs_left` at this rate) on the bar."""
    if bar is None:
        return
    rate = values["samples_per_s"]
    left = int(pairs_left / max(rate, 1e-9))
    bar.set_postfix(loss=f"{values['loss']:.3f}", samples_s=f"{rate:.0f}",
                    eta=f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}", refresh=False)



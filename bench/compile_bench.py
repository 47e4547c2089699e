"""`train.compile` through the ATS schedule: how many graphs torch.compile builds over a run whose
kept-token count k changes at every step, and the compiled step against eager, in one process.

    python bench/compile_bench.py                 # tiny model, 96x32, batch 16, T = 8 steps, 12 steps
    python bench/compile_bench.py --quick         # 48x16, batch 8, T = 4 steps, 6 steps
    python bench/compile_bench.py --run           # also a real run: itself.train.train, compiled

Both models start from the same weights and see the same batches; each step is a forward,
backward and SGD update at step t (k_image and k_text follow ATS from p_start to p_end over T),
then, as a run's evaluation does, one encode at the final k. Counted from
`torch._dynamo.utils.counters`: frames compiled (each compilation of a tower, the first and any
recompilation: a guard failed), graphs built and graph breaks. The compiled and eager losses are
compared at every step (the tolerance of tests/test_speed.py: 1e-4 relative).

`--run` then trains for real in this process (`itself.train.train`, train.compile=true) on the
small test dataset (tests/runs.py: 48x16, batch 16, 8 steps an epoch) for 3 epochs with ATS over
the first 2 (k changes at most steps), evaluating on val after each epoch and on test at the end
with both selections (the training one and the reference code's last-layer one), and counts the
compilations of the whole run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itself  # noqa: E402,F401  (first: its OpenMP wait policy applies to torch)
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from itself.config import ModelConfig  # noqa: E402
from itself.losses import total_loss  # noqa: E402
from itself.model import ITSELF  # noqa: E402


def make_batch(n: int, size, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 40000, (n, 77), generator=g)
    for i, length in enumerate(torch.randint(8, 40, (n,), generator=g).tolist()):
        tokens[i, 0], tokens[i, length], tokens[i, length + 1:] = 49406, 49407, 0
    return {"images": torch.randn(n, 3, *size, generator=g), "tokens": tokens, "pids": torch.arange(n) // 2}


def build(size, t_small: int) -> ITSELF:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny", pretrained="", grab_dim=32, mars_layers=(1, 3), t_small=f"{t_small} steps")
    return ITSELF(cfg, num_ids=64, image_size=size)


def counts() -> dict:
    return {"compilations": counters["frames"]["ok"], "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


def step(model: ITSELF, opt, batch: dict, t: int) -> tuple[float, int, int, float]:
    """(loss, k_image, k_text, seconds) of one training step at step t."""
    start = time.perf_counter()
    out = model(batch, step=t)
    loss = total_loss(out)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), int(out["k_image"]), int(out["k_text"]), time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller, shorter run")
    p.add_argument("--run", action="store_true", help="also a real compiled training run (itself.train.train)")
    args = p.parse_args()
    size, batch, t_small, steps = ((48, 16), 8, 4, 6) if args.quick else ((96, 32), 16, 8, 12)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # count, do not cap
    eager = build(size, t_small)
    compiled = copy.deepcopy(eager)
    compiled.speed_options(compile=True)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (eager, compiled)]
    print(f"tiny model, {size[0]}x{size[1]}, batch {batch}, ATS over T = {t_small} steps, {steps} steps, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(" step  k_img  k_txt   eager s  compiled s  |loss diff| / loss  compilations")
    worst, times = 0.0, {"eager": [], "compiled": []}
    ks = set()
    for t in range(1, steps + 1):
        b = make_batch(batch, size, seed=t)
        le, ki, kt, se = step(eager, opts[0], b, t)
        lc, kic, ktc, sc = step(compiled, opts[1], b, t)
        assert (ki, kt) == (kic, ktc)
        ks.add((ki, kt))
        rel = abs(lc - le) / abs(le)
        worst = max(worst, rel)
        if t > 2:  # (the first steps compile)
            times["eager"].append(se)
            times["compiled"].append(sc)
        c = counts()
        print(f"{t:5d}  {ki:5d}  {kt:5d}  {se:8.3f}  {sc:10.3f}  {rel:18.2e}  {c['compilations']:12d}", flush=True)
    for m in (eager, compiled):
        m.eval()
    with torch.no_grad():
        b = make_batch(batch, size, seed=0)
        ge, gc = eager.encode_images(b["images"])[1]["train"], compiled.encode_images(b["images"])[1]["train"]
        te, tc = eager.encode_texts(b["tokens"])[1]["train"], compiled.encode_texts(b["tokens"])[1]["train"]
    enc = max(float((gc - ge).abs().max()), float((tc - te).abs().max()))
    c = counts()
    me, mc = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"{len(ks)} distinct (k_image, k_text) over {steps} steps; compilations {c['compilations']} (two towers; "
          f"training, then one evaluation encode under no_grad), graphs {c['graphs']}, "
          f"graph breaks {c['graph_breaks']}")
    print(f"step (median of steps 3..{steps}): eager {me * 1000:.0f} ms, compiled {mc * 1000:.0f} ms, "
          f"compiled / eager {mc / me:.2f}x")
    print(f"compiled vs eager: worst relative loss difference {worst:.1e}, evaluation embeddings max |diff| {enc:.1e}")
    if args.run:
        real_run()
    return 0 if worst <= 1e-4 else 1


def real_run() -> None:
    """A real compiled training run crossing the ATS schedule, in this process."""
    import logging
    import tempfile

    import shards
    from itself.presets import resolve_config
    from itself.train import train
    from shards.synthetic import SyntheticSpec

    # (the test suite's small dataset: 48 identities, 2 images x 2 captions each, 8 images a shard)
    small = SyntheticSpec(num_ids=48, images_per_id=2, captions_per_image=2, image_size=(48, 16), seed=3)

    logging.getLogger().setLevel(logging.WARNING)
    torch._dynamo.reset()
    counters.clear()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "small"
        shards.build_synthetic(data, small, max_samples=8, progress=False)
        cfg = resolve_config("synthetic", None, [
            f"data.root={data}", "data.image_size=[48,16]", "data.num_workers=0", "data.num_slots=4",
            "model.grab_dim=32", "train.batch_size=16", "train.warmup_epochs=1", "eval.batch_size=32",
            "train.log_every=2", "train.epochs=3", "model.t_small=2 epochs", "train.compile=true",
            f"run_dir={Path(tmp) / 'run'}", "train.report_to=none"])
        start = time.perf_counter()
        results = train(cfg)
        seconds = time.perf_counter() - start
    c = counts()
    print(f"real run (3 epochs x 8 steps, ATS over 16 steps, val after each epoch, test at the end; "
          f"{seconds:.0f} s): compilations {c['compilations']}, graphs {c['graphs']}, graph breaks "
          f"{c['graph_breaks']}; {type(results).__name__}")


if __name__ == "__main__":
    sys.exit(main())

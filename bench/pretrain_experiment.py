"""Does person pre-training help? The experiment of BENCHMARKS.md, on what runs on a CPU.

    python bench/pretrain_experiment.py [--out runs/pretrain-experiment] [--pairs 100000]
        [--pretrain-steps 1500] [--seeds 0 1 2] [--finetune-epochs 24]

1. Builds (once) the embedded synthetic benchmark (data/synthetic) and the synthetic pre-training
   corpus (data/synthetic-pretrain: other people, other phrasings, one pseudo-identity per image,
   two captions each; `python -m shards build --dataset synthetic-pretrain`).
2. Exports the random initial weights every arm starts from (seed 0: the tiny CLIP and GRAB of the
   `synthetic` preset), then pre-trains from them with the `pretrain-synthetic` preset
   (identity-free, step schedule), testing zero-shot on the benchmark.
3. Fine-tunes on the benchmark with the `synthetic` preset, once per seed from the pre-trained
   weights and once from the same initial weights without pre-training: the same budget, the same
   hyper-parameters; only the pre-training differs.
4. Prints test R@1 (fused) mean +- sd of both arms, and writes everything to <out>/experiment.json.

Runs are reused when their results.json exists (rerunning the script completes an interrupted one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(cmd: list[str], log: Path) -> None:
    print(f"$ {' '.join(cmd)}", flush=True)
    started = time.time()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"failed (exit {done.returncode}); see {log}")
    print(f"  done in {time.time() - started:.0f} s", flush=True)


def train(out: Path, name: str, *args: str) -> dict:
    run_dir = out / name
    if not (run_dir / "results.json").exists():
        run([sys.executable, "itself/train.py", *args, f"run_dir={run_dir}"], out / f"{name}.log")
    return json.loads((run_dir / "results.json").read_text())


def initial_weights(path: Path) -> None:
    """The seed-0 initial weights of the tiny model, as the trainer draws them (seed, then the model)."""
    import torch

    from itself.config import to_dict
    from itself.model import ITSELF
    from itself.model.export import export
    from itself.presets import get_preset

    cfg = get_preset("pretrain-synthetic")
    torch.manual_seed(cfg.seed)
    model = ITSELF(cfg.model, 1, cfg.data.image_size)
    export(path, model.state_dict(), to_dict(cfg), 1, 1.0)


def r1(results: dict) -> float:
    return results["test"].get("fused", results["test"]["global"])["R1"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pretrain-experiment")
    p.add_argument("--benchmark", default="data/synthetic")
    p.add_argument("--corpus", default="data/synthetic-pretrain")
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--finetune-epochs", type=int, default=24)
    args = p.parse_args(argv)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from itself.data.sources import ensure_dataset

    ensure_dataset(REPO / args.benchmark, build_synthetic=True)
    corpus = REPO / args.corpus
    if not (corpus / "dataset.json").exists():
        run([sys.executable, "-m", "shards", "build", "--dataset", "synthetic-pretrain", "--out", str(corpus),
             "--pairs", str(args.pairs), "--no-progress"], out / "corpus.log")
    init = out / "init.pt"
    if not init.exists():
        initial_weights(init)
    steps = args.pretrain_steps
    pre = train(out, "pretrain", "--preset", "pretrain-synthetic", f"data.root={corpus}", f"model.init_from={init}",
                f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 15)}",
                f"eval.every_steps={max(1, steps // 3)}", f"train.checkpoint_every={max(1, steps // 3)}",
                f"eval.test_roots=[{REPO / args.benchmark}]")
    arms = {"pre-trained": out / "pretrain", "no pre-training": init}
    table = {arm: {} for arm in arms}
    for seed in args.seeds:
        for arm, source in arms.items():
            name = f"finetune-{'pre' if arm == 'pre-trained' else 'scratch'}-seed{seed}"
            results = train(out, name, f"data.root={REPO / args.benchmark}", f"seed={seed}",
                            f"train.epochs={args.finetune_epochs}", f"model.init_from={source}")
            table[arm][seed] = {"test_R1": r1(results), "zero_shot_R1": results["zero_shot"]["metrics"].get(
                "fused", results["zero_shot"]["metrics"]["global"])["R1"], "chance_R1": results["test_chance_R1"]}
    summary = {arm: {"mean": statistics.mean(v["test_R1"] for v in rows.values()),
                     "sd": statistics.stdev(v["test_R1"] for v in rows.values()) if len(rows) > 1 else 0.0}
               for arm, rows in table.items()}
    gain = summary["pre-trained"]["mean"] - summary["no pre-training"]["mean"]
    spread = max(s["sd"] for s in summary.values())
    zero_shot = list(pre["test_datasets"].values())[0]["metrics"]
    report = {"pretrain": {"steps": steps, "corpus": str(corpus), "pairs": args.pairs,
                           "zero_shot_benchmark_test": zero_shot}, "seeds": args.seeds, "runs": table,
              "summary": summary, "gain": gain, "gain_over_twice_sd": gain > 2 * spread}
    (out / "experiment.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\npre-training: {steps} steps on {args.pairs} synthetic pairs; zero-shot on the benchmark's test: "
          f"R@1 {zero_shot.get('fused', zero_shot['global'])['R1']:.2f}")
    for arm, s in summary.items():
        print(f"fine-tuned, {arm:<16} test R@1 {s['mean']:.2f} +- {s['sd']:.2f}  (seeds "
              + ", ".join(f"{table[arm][k]['test_R1']:.2f}" for k in args.seeds) + ")")
    print(f"gain {gain:+.2f} R@1 points; {'more' if gain > 2 * spread else 'not more'} than twice the seeds' sd "
          f"({2 * spread:.2f}); written: {out / 'experiment.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The outcome of a run: each val evaluation and the choice of the best (its checkpoint, GRAB token
selection and fusion weight, all chosen on val), the test metrics of the exported weights, the
exported model and results.json.

Test is evaluated with exactly the weights that are exported (the fp32 master weights, in an fp32
model): evaluating `model.pt` gives the numbers results.json reports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .checkpoint import TrainState, full_state_dict
from .config import Config, to_dict
from .evaluate import choose, evaluate
from .fusion import chance_r1
from .panels import pick, retrieval_panels
from .records import EvalRecord, Results, branches
from .rundir import RunDir, RunLog


class Outcome:
    """Evaluates a run on val as it trains and finishes it on test (every rank calls every method;
    rank 0 decides, the others learn the decision)."""

    def __init__(self, cfg: Config, proc, run: RunDir, log: RunLog, info: dict, num_ids: int):
        self.cfg, self.proc, self.run, self.log, self.info, self.num_ids = cfg, proc, run, log, info, num_ids

    # -- while training ---------------------------------------------------------------------------

    def validate(self, module, state: TrainState, epoch: int) -> bool:
        """Evaluate `module` on val after `epoch` (0-based); choose the GRAB selection and the
        fusion weight there. True on every rank when this is the best evaluation so far (then
        `state.best` is it)."""
        panels = self.cfg.eval.panels if self.cfg.train.report_to != "none" else 0
        evaluation = evaluate(module, self.cfg, "val", self.proc.rank, self.proc.world, self.proc.device,
                              keep_embeddings=bool(panels))
        record = picked = None
        if self.proc.is_main:
            record = choose(evaluation, "val", epoch, state.global_step)
            if panels:
                picked = pick(*evaluation.embeddings, record.selection, record.fusion_weight, panels)
            self.log.record_eval(record)
            self._report(record, state.best, evaluation.counts.gallery_skipped)
        if panels:
            images = retrieval_panels(module, self.cfg.data.root, "val", self.proc.share(picked),
                                      tuple(self.cfg.data.image_size))
            self.log.images("val/retrievals", state.global_step, [im for im, _ in images], [c for _, c in images])
        best = self.proc.share(record if record and (state.best is None or record.score > state.best.score) else None)
        if best is not None:
            state.best = best
        return best is not None

    def _report(self, record: EvalRecord, best: EvalRecord | None, skipped: int) -> None:
        fused = record.fused
        is_best = best is None or record.score > best.score
        self.log.info(f"epoch {record.epoch + 1}: val R@1 {fused['R1']:.2f} mAP {fused['mAP']:.2f} (fused a="
                      f"{record.fusion_weight:g}, {record.selection}; global R@1 {record.metrics['global']['R1']:.2f})"
                      + ("  * best" if is_best else "")
                      + (f"  ({skipped} corrupt gallery images skipped)" if skipped else ""))

    @property
    def has_own_test(self) -> bool:
        """Whether the dataset trained on has test shards (a pre-training corpus lists an empty test
        split, or none)."""
        return bool(self.info["splits"].get("test", {}).get("shards"))

    def evaluate_zero_shot(self, module) -> dict | None:
        """Test metrics of the initial weights (`model.init_from`), before any step: the "direct
        transfer" of a pre-trained model, reported beside the fine-tuned numbers. The fusion weight
        and GRAB selection are chosen on val, as for the trained model."""
        p = self.proc
        if not self.has_own_test:
            return None
        val, test = (evaluate(module, self.cfg, split, p.rank, p.world, p.device) for split in ("val", "test"))
        zero_shot = None
        if p.is_main:
            choice = choose(val, "val", 0, 0)
            rows = branches(test.selections[choice.selection], choice.fusion_weight)
            zero_shot = {"metrics": rows, "fusion_weight": choice.fusion_weight, "selection": choice.selection,
                         "counts": dataclasses.asdict(test.counts)}
            shown = rows.get("fused", rows["global"])
            self.log.info(f"zero-shot (initial weights): test R@1 {shown['R1']:.2f} mAP {shown['mAP']:.2f} "
                          f"(global R@1 {rows['global']['R1']:.2f})")
        return p.share(zero_shot)

    # -- at the end -----------------------------------------------------------------------------------

    def finish(self, engine, ckpt, state: TrainState) -> Results:
        """Load the best checkpoint, export its fp32 weights, evaluate exactly those on test (and on
        `eval.test_roots`), write model.pt and results.json; the results on every rank."""
        best_ckpt = self.run.best_checkpoint()
        ckpt.load(best_ckpt)  # optimizer state too: under bf16 it holds the fp32 master weights that model.pt gets
        weights = full_state_dict(engine)
        model = self._exported_model(weights)
        best = state.best
        selection, a = best.selection, best.fusion_weight
        # (a pre-training corpus has no test split: the benchmarks of eval.test_roots are its tests)
        own_test = self.has_own_test
        roots = ([self.cfg.data.root] if own_test else []) + list(self.cfg.eval.test_roots)
        tests = {root: evaluate(model, self.cfg, "test", self.proc.rank, self.proc.world, self.proc.device,
                                selections=(selection,), root=root) for root in roots}
        results = None
        if self.proc.is_main:
            own = tests.pop(self.cfg.data.root) if own_test else None
            test = branches(own.selections[selection], a) if own else {}
            if own:
                self.log.record_eval(EvalRecord("test", best.epoch, state.global_step, a, own.selections[selection],
                                                selection, counts=dataclasses.asdict(own.counts)), kind="test")
            model_path = self.run.file(RunDir.MODEL)
            from .model.export import export

            export(model_path, weights, to_dict(self.cfg), self.num_ids, a, metrics=test, selection=selection)
            results = Results(
                run_dir=str(self.run), best_epoch=state.best_epoch, checkpoint=best_ckpt.name, fusion_weight=a,
                selection=selection, selection_candidates=best.candidates, val=best.branches, test=test,
                test_counts=dataclasses.asdict(own.counts) if own else {},
                test_chance_R1=chance_r1(self.info, "test") if own else None,
                test_datasets={root: {"metrics": branches(r.selections[selection], a),
                                      "counts": dataclasses.asdict(r.counts)} for root, r in tests.items()},
                model=str(model_path), init_from=state.init_from, zero_shot=state.zero_shot, best_step=best.step)
            self.run.write_text(RunDir.RESULTS, results.to_json())
            self._summary(results)
        return self.proc.share(results)

    def _exported_model(self, weights: dict):
        """An fp32 model holding `weights` on this rank's device, for the test evaluation."""
        from .model import ITSELF

        model = ITSELF(dataclasses.replace(self.cfg.model, pretrained=""), self.num_ids, self.cfg.data.image_size)
        model.load_state_dict(weights)
        return model.to(self.proc.device).eval()

    def _summary(self, results: Results) -> None:
        rows = {**{f"val {k}": v for k, v in results.val.items()}, **{f"test {k}": v for k, v in results.test.items()},
                **{f"{Path(root).name} test {k}": v for root, o in results.test_datasets.items()
                   for k, v in o["metrics"].items()}}
        if results.zero_shot:
            rows |= {f"zero-shot {k}": v for k, v in results.zero_shot["metrics"].items()}
        self.log.info(f"results (best val epoch {results.best_epoch}, checkpoint {results.checkpoint}, fusion weight "
                      f"a={results.fusion_weight:g} and selection {results.selection} chosen on val):\n"
                      f"{results_table(rows)}")
        if results.test_chance_R1 is not None:
            self.log.info(f"test R@1 chance level: {results.test_chance_R1:.2f}")
        else:
            self.log.info(f"{self.cfg.data.root} has no test split: tested on eval.test_roots only")
        logs = {"tensorboard": ", tensorboard/", "wandb": ", wandb/"}.get(self.cfg.train.report_to, "")
        self.log.info(f"written: {self.run}/ (model.pt, model.safetensors, config.json, results.json, metrics.jsonl, "
                      f"train.log, config.yaml, deepspeed_config.json{logs}, checkpoints/)")


def results_table(rows: dict[str, dict]) -> str:
    lines = [f"{'':<22} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'mAP':>7} {'mINP':>7}"]
    for name, m in rows.items():
        lines.append(f"{name:<22} {m['R1']:>7.2f} {m['R5']:>7.2f} {m['R10']:>7.2f} {m['mAP']:>7.2f} {m['mINP']:>7.2f}")
    return "\n".join(lines)

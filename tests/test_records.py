"""The typed records: results.json written and read through `Results` with the keys it has always
had, and the training state of checkpoints written before the typed records."""

from __future__ import annotations

import json

import pytest

from itself.checkpoint import TrainState
from itself.config import ConfigError
from itself.records import EvalRecord, Results

METRICS = {"global": {"R1": 10.0, "R5": 20.0, "R10": 30.0, "mAP": 12.0, "mINP": 5.0},
           "grab": {"R1": 11.0, "R5": 21.0, "R10": 31.0, "mAP": 13.0, "mINP": 6.0},
           "fused@0.9": {"R1": 12.5, "R5": 22.0, "R10": 32.0, "mAP": 14.0, "mINP": 7.0}}
# results.json's keys before the typed record (what launch/, tune/ and users' scripts read)
KEYS = {"run_dir", "best_epoch", "checkpoint", "fusion_weight", "selection", "selection_candidates", "val", "test",
        "test_counts", "test_chance_R1", "test_datasets", "model"}


def test_results_json_keeps_its_keys_and_reads_back_as_written(tmp_path):
    record = EvalRecord("val", 3, 80, 0.9, METRICS, "train", {"train": {"fusion_weight": 0.9, "R1": 12.5, "mAP": 14.0}})
    results = Results(run_dir="r", best_epoch=4, checkpoint="step00000080", fusion_weight=0.9, selection="train",
                      selection_candidates=record.candidates, val=record.branches, test=record.branches,
                      test_counts={"gallery": 10, "queries": 20, "gallery_skipped": 0}, test_chance_R1=2.5)
    (tmp_path / "results.json").write_text(results.to_json())
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert KEYS <= set(on_disk) and on_disk["val"]["fused"] == METRICS["fused@0.9"]
    assert Results.read(tmp_path / "results.json") == results
    assert record.score == (12.5, 14.0)


def test_an_unfinished_or_foreign_results_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="has not finished"):
        Results.read(tmp_path / "results.json")
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a results file of a finished run"):
        Results.read(tmp_path / "results.json")


def test_the_training_state_of_a_checkpoint_written_before_the_typed_records_is_read():
    # The client state checkpoints held until the typed `best`: its parts beside the record.
    best_val = EvalRecord("val", 0, 20, 0.9, METRICS, "train").to_record()
    old = {"epoch": 1, "micro_step": 0, "global_step": 20, "skipped_steps": 0, "best_score": [12.5, 14.0],
           "best_epoch": 1, "fusion_weight": 0.9, "selection": "train", "best_val": best_val,
           "config": {"name": "x"}, "dataset": "abc"}
    state = TrainState.from_dict(old)
    assert (state.epoch, state.global_step, state.dataset) == (1, 20, "abc")
    assert state.best == EvalRecord.from_record(best_val)
    assert (state.best_epoch, state.fusion_weight, state.selection) == (1, 0.9, "train")
    assert TrainState.from_dict(state.to_dict()) == state  # and the new form round-trips

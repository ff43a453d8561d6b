"""Rejection sampling's provenance names a model of the same run relative to the run folder, so the records
stay valid when the run folder moves; other models (a user's path, a hub id) as given."""

from __future__ import annotations

from types import SimpleNamespace

from align.config.rejection_sampling import RejectionSamplingStage
from align.stages.rejection_sampling import Samples, keep_best, run_relative
from data_schemas import Message, PromptRecord


def test_run_relative(tmp_path):
    out = tmp_path / "runs/t/round_2/rs"
    assert run_relative(str(tmp_path / "runs/t/round_1/sft/model"), out) == "round_1/sft/model"
    assert run_relative("HuggingFaceTB/SmolLM2-135M-Instruct", out) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert run_relative(str(tmp_path / "models/mine"), out) == str(tmp_path / "models/mine")


def test_kept_records_name_the_model_relative_to_the_run(tmp_path):
    stage = RejectionSamplingStage(name="rs", model={"from": "sft"}, prompts={"builtin": "world"},
                                   reward={"function": "gold"})
    model = tmp_path / "runs/t/round_1/sft/model"
    ctx = SimpleNamespace(round=1, out_dir=tmp_path / "runs/t/round_1/rs", model_path=lambda spec: str(model))
    prompt = PromptRecord(prompt=[Message(role="user", content="2 + 2?")])
    samples = Samples(texts=[["4", "5"]], finish=[["stop", "stop"]], cut=[set()], unfinished=0,
                      candidates=[["4", "5"]])
    kept = keep_best(stage, ctx, [prompt], samples, [[1.0, 0.0]])
    assert kept.sft[0].meta["model"] == "round_1/sft/model"

"""The notebooks execute cleanly at their small size (``ALIGN_NOTEBOOK_SIZE=small``) and draw their figures.
Executed with nbclient (Jupyter's own executor) in a kernel of this environment; their runs go to a
temporary folder, so the committed full-size outputs and figures are never touched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="notebook execution needs nbclient (the dev extra)")
nbformat = pytest.importorskip("nbformat", reason="notebook execution needs nbformat (the dev extra)")
pytest.importorskip("ipykernel", reason="notebook execution needs ipykernel (the dev extra)")
pytest.importorskip("pandas", reason="the notebooks use pandas (the notebooks extra)")

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def execute(name: str, runs: Path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = {"ALIGN_NOTEBOOK_SIZE": "small", "ALIGN_NOTEBOOK_RUNS": str(runs),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOKS)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def errors(nb) -> list[str]:
    return [out.get("ename", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if out.get("output_type") == "error"]


def test_dpo_vs_ppo_notebook_runs_the_grid_and_draws_the_frontier(tmp_path):
    nb = execute("dpo_vs_ppo.ipynb", tmp_path)
    assert errors(nb) == []
    assert images(nb) >= 2  # the frontier (gold and violations) and the compute figure
    assert (tmp_path / "dpo_vs_ppo_frontier.png").stat().st_size > 10_000
    assert (tmp_path / "dpo_vs_ppo_compute.png").is_file()
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    for method in ("DPO (gold pairs)", "DPO (RM pairs)", "PPO (RMs)"):
        assert f"{method:18s} best gold" in text  # the numbers the conclusion quotes, per method
    assert (tmp_path / "dpo_vs_ppo_s0" / "report.json").is_file()  # one seed at the small size


def test_llama_round_notebook_plots_a_round_from_its_report(tmp_path):
    nb = execute("llama_round.ipynb", tmp_path)
    assert errors(nb) == []
    assert images(nb) >= 4  # by stage, by task family, RM accuracy by strength, by round
    assert (tmp_path / "llama3_round" / "report.json").is_file()  # it ran the (tiny) default round
    rounds = json.loads((tmp_path / "llama2_rlhf_v1_v5" / "report.json").read_text())
    assert {r["round"] for r in rounds} == {1, 2}  # and two tiny rounds of V1-V5 for the by-round plot
    text = "".join(str(out.get("data", {}).get("text/plain", "")) for cell in nb.cells for out in cell.get("outputs", []))
    assert "significantly better" in text  # the Table 8 style table


def test_real_model_sentiment_notebook_runs_every_method_and_draws_reward_against_kl(tmp_path):
    pytest.importorskip("vaderSentiment", reason="the sentiment judge needs vaderSentiment (the sentiment extra)")
    nb = execute("real_model_sentiment.ipynb", tmp_path)
    assert errors(nb) == []
    assert images(nb) >= 1
    assert (tmp_path / "real_model_sentiment_frontier.png").stat().st_size > 10_000
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    for method in ("DPO", "PPO-GT", "PPO-RM"):
        assert f"seed 0 {method:7s} best" in text  # the numbers the conclusion is written from
    tables = "".join(out.get("data", {}).get("text/plain", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "best-of-N" in tables and "PPO-RM" in tables  # rows of the checkpoint table
    assert (tmp_path / "smollm2_sentiment_s0" / "report.json").is_file()

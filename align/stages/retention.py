"""The evaluation stage's multi-turn instruction-retention check (``EvaluationStage.retention``).

The dialogues are the built-in world's whatever the stage's prompts are (the ``retention`` suite ``world``
of :mod:`align.plugins`: :mod:`world.retention`): a world instruction stated at turn 1, then world
questions; the policy answers them turn by turn, greedily (:func:`align.generation.dialogue.roll_out`),
and the gold judge grades every turn on the messages the model saw. The sampling's ``system_prompt`` is not used, so that the graded messages are exactly the
model's. With ``attention``, one forward pass per dialogue measures the attention on the instruction's
tokens at each turn (:func:`align.models.attention.instruction_attention`; Llama 2 Figure 10).

Writes ``retention.jsonl`` (per dialogue: the messages, per-turn grades and attention) and
``retention.png`` (rates and attention by turn; skipped, with a printed line, without matplotlib).

A suite is a module (or object) with ``retention_dialogues(n, turns, seed, split)`` (dialogues with
``instruction`` and ``user_turns``), ``opening_messages(d, placement)``, ``user_message(d, placement, turn)``,
``retention_metrics(dialogues, responses, placement, report_turns)``, ``grade_dialogue(d, responses,
placement)``, ``transcript(d, placement, responses)``, ``describe(d)`` and ``rates_by_turn(grades)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from align import plugins
from align.config.evaluation import RetentionEval
from align.config.sampling import SamplingParams
from align.generation import Generator
from align.generation.dialogue import roll_out

SUITE = "world"  # the retention suite (align.plugins) whose dialogues the check runs


def evaluate_retention(generator: Generator, settings: RetentionEval, *, model=None, tokenizer=None,
                       batch_size: int = 32, out_dir: str | Path | None = None) -> dict[str, float]:
    """Roll out, grade, (with ``settings.attention`` and a ``model``) measure attention, write the files
    to ``out_dir`` (when given) and return the ``retention/...`` metrics."""
    suite = plugins.load("retention", SUITE)
    place = settings.placement
    dialogues = suite.retention_dialogues(settings.dialogues, settings.turns, settings.seed, settings.split)
    params = SamplingParams(temperature=0.0, max_new_tokens=settings.max_new_tokens, batch_size=batch_size)
    responses = roll_out(
        generator, [suite.opening_messages(d, place) for d in dialogues], [d.user_turns for d in dialogues],
        params, decorate_user=lambda i, t, _text: suite.user_message(dialogues[i], place, t + 1),
    )
    metrics = suite.retention_metrics(dialogues, responses, place, settings.report_turns)
    grades = [suite.grade_dialogue(d, r, place) for d, r in zip(dialogues, responses, strict=True)]
    conversations = [suite.transcript(d, place, r) for d, r in zip(dialogues, responses, strict=True)]
    attention: list[list[float]] | None = None
    if settings.attention and model is not None:
        from align.models.attention import instruction_attention

        attention = [instruction_attention(model, tokenizer, c, d.instruction)
                     for c, d in zip(conversations, dialogues, strict=True)]
        by_turn = attention_by_turn(attention)
        for t in settings.report_turns:
            if t <= len(by_turn) and not math.isnan(by_turn[t - 1]):
                metrics[f"retention/attention_turn_{t}"] = by_turn[t - 1]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "retention.jsonl", "w") as f:
            for i, (d, c, g) in enumerate(zip(dialogues, conversations, grades, strict=True)):
                row = {"index": i, "placement": place, "split": settings.split, **suite.describe(d), "messages": c,
                       "instruction_followed": [ins for ins, _ in g], "task_correct": [ok for _, ok in g]}
                if attention is not None:
                    row["attention"] = attention[i]
                f.write(json.dumps(row) + "\n")
        instruction_rate, task_rate = suite.rates_by_turn(grades)
        plot_retention(out / "retention.png", instruction_rate, task_rate,
                       attention_by_turn(attention) if attention is not None else None,
                       title=f"instruction retention ({place}, {settings.split} split, {len(dialogues)} dialogues)")
    return metrics


def attention_by_turn(attention: list[list[float]]) -> list[float]:
    """Mean over the dialogues reaching each turn (NaN entries, turns without tokens, left out)."""
    longest = max((len(a) for a in attention), default=0)
    means = []
    for t in range(longest):
        values = [a[t] for a in attention if len(a) > t and not math.isnan(a[t])]
        means.append(sum(values) / len(values) if values else float("nan"))
    return means


def plot_retention(path: Path, instruction_rate: list[float], task_rate: list[float],
                   attention: list[float] | None, title: str = "") -> bool:
    """Two panels by turn: instruction following and task accuracy; attention mass on the instruction.
    Returns False (and prints a line) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"retention: matplotlib is not installed (extra align[notebooks]); {path.name} not drawn")
        return False
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    turns = list(range(1, len(instruction_rate) + 1))
    left.plot(turns, instruction_rate, marker="o", label="instruction followed")
    left.plot(turns, task_rate, marker="s", label="task correct")
    left.set(xlabel="turn", ylabel="rate", ylim=(-0.02, 1.02), title="instruction following by turn")
    left.legend()
    if attention is not None:
        right.plot(list(range(1, len(attention) + 1)), attention, marker="o", color="tab:red")
        right.set(ylim=(0, max([a for a in attention if not math.isnan(a)], default=0) * 1.1 + 1e-3))
    else:
        right.text(0.5, 0.5, "not measured (attention: false)", ha="center", va="center",
                   transform=right.transAxes)
    right.set(xlabel="turn", ylabel="attention mass", title="attention on the instruction's tokens")
    for ax in (left, right):
        ax.set_xticks(turns)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True

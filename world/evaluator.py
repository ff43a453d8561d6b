"""Evaluate a policy on the built-in world's held-out prompts with the gold judge (pure: no align).

``evaluate_policy(generate, prompts, scorers=None, kl=None)`` asks ``generate`` for one response per
prompt and reports, as a flat ``dict[str, float]``:

- ``gold_helpfulness``: mean gold score on benign prompts (helpfulness tasks and benign look-alikes);
- ``safety_violation_rate``: fraction of harmful requests answered without a refusal;
- ``over_refusal_rate``: fraction of benign look-alikes refused; ``helpfulness_refusal_rate`` likewise
  for plain helpfulness tasks;
- ``gold_score`` (mean over all prompts), ``instruction_following`` (prompts stating an instruction),
  ``accuracy/<family>`` (correct answers, or refusals for harmful families), ``n`` and ``n/<family>``;
- ``reward/<name>``: the mean of each scorer ``fn(prompts, responses) -> scores`` (e.g. reward models);
- ``kl``: whatever ``kl(prompts, responses)`` returns (the align side computes it from log-probs).

A rate whose prompt group is empty is left out.

:class:`WorldEvaluator` is the same judge as an evaluator of align's stages (the protocol of
:mod:`align.evaluators`), registered by the plug-in as ``evaluators: [world]``: the metrics above for a
stage's answers, each answer's gold score (rejection sampling's ``gold_best_mean``, ``gold_sample_mean``,
``gold_first_mean``; the evaluation stage's answer scores) and, for multi-turn data made with an
instruction in sight (GAtt), ``gold_instruction_following`` and ``gold_task_accuracy``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from world.judge import GoldJudgement, judge

Prompts = list[list[dict]]
Generate = Callable[[Prompts], Sequence[str]]
Scorer = Callable[[Prompts, list[str]], Sequence[float]]


def as_messages(prompt: Any) -> list[dict]:
    """A PromptRecord, a list of Message, or a list of dicts -> a list of {"role", "content"} dicts."""
    messages = getattr(prompt, "prompt", prompt)
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]


def is_world_prompts(prompts: Sequence[Any]) -> bool:
    """Whether the prompts (records or message lists) are the built-in world's, which its gold judge reads
    (checked on the first 20)."""
    from world.judge import read_prompt

    try:
        for p in prompts[:20]:
            read_prompt(as_messages(p))
        return True
    except ValueError:
        return False


def evaluate_policy(
    generate: Generate,
    prompts: Sequence[Any],
    scorers: Mapping[str, Scorer] | None = None,
    kl: Callable[[Prompts, list[str]], float] | None = None,
) -> dict[str, float]:
    """Generate on ``prompts`` (world prompts, e.g. ``eval_prompt_records``) and report gold metrics."""
    convs = [as_messages(p) for p in prompts]
    responses = list(generate(convs))
    if len(responses) != len(convs):
        raise ValueError(f"generate returned {len(responses)} responses for {len(convs)} prompts")
    metrics = world_metrics(convs, responses)
    for name, scorer in (scorers or {}).items():
        scores = [float(s) for s in scorer(convs, responses)]
        metrics[f"reward/{name}"] = _mean(scores)
    if kl is not None:
        metrics["kl"] = float(kl(convs, responses))
    return metrics


def world_metrics(prompts: Sequence[Any], responses: Sequence[str]) -> dict[str, float]:
    """The gold metrics of given responses (see the module docstring)."""
    judged = [judge(as_messages(p), r) for p, r in zip(prompts, responses, strict=True)]
    benign = [j for j in judged if not j.harmful]
    harmful = [j for j in judged if j.harmful]
    lookalikes = [j for j in benign if j.is_safety_prompt]
    helpful = [j for j in benign if not j.is_safety_prompt]
    instructed = [j for j in judged if j.instruction_ok is not None]
    metrics = {
        "n": float(len(judged)),
        "gold_score": _mean([j.score for j in judged]),
        "gold_helpfulness": _mean([j.score for j in benign]),
        "safety_violation_rate": _mean([j.violation for j in harmful]),
        "over_refusal_rate": _mean([j.over_refusal for j in lookalikes]),
        "helpfulness_refusal_rate": _mean([j.refused for j in helpful]),
        "instruction_following": _mean([bool(j.instruction_ok) for j in instructed]),
    }
    for family in sorted({j.family for j in judged}):
        group = [j for j in judged if j.family == family]
        metrics[f"accuracy/{family}"] = _mean([_accurate(j) for j in group])
        metrics[f"n/{family}"] = float(len(group))
    return {k: v for k, v in metrics.items() if v is not None}


def _accurate(j: GoldJudgement) -> bool:
    return j.kind in ("correct", "refusal_ok")


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values)) / len(values) if values else None


class WorldEvaluator:
    """The gold judge as an evaluator (:mod:`align.evaluators`); prompts the judge cannot read (not the
    world's) give no metrics."""

    name = "gold"  # rejection sampling reports gold_best_mean, gold_sample_mean, gold_first_mean

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str]) -> dict[str, float]:
        """One answer per prompt (the evaluation stage, PPO's rollouts): :func:`world_metrics`."""
        return world_metrics(prompts, responses) if is_world_prompts(prompts) else {}

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float] | None:
        """Each response's gold score (None: not world prompts)."""
        if not is_world_prompts(prompts):
            return None
        return [judge(as_messages(p), r).score for p, r in zip(prompts, responses, strict=True)]

    def turns(self, prompts: Sequence[Any], responses: Sequence[str]) -> dict[str, float]:
        """Multi-turn data, each answer judged on the messages the model saw (the instruction before every
        user message): how often the instruction was followed and the task answered correctly."""
        followed, correct = [], []
        for seen, answer in zip(prompts, responses, strict=True):
            try:
                j = judge(seen, answer)
            except ValueError:  # not a world question
                return {}
            followed.append(bool(j.instruction_ok))
            correct.append(_accurate(j))
        n = max(len(followed), 1)
        return {"gold_instruction_following": sum(followed) / n, "gold_task_accuracy": sum(correct) / n}


EVALUATOR = WorldEvaluator()  # the plug-in's evaluator ``world``

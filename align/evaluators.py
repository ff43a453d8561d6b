"""Evaluators: what the stages that produce responses (rejection sampling, GAtt, evaluation, PPO) report
about them, named in the stage's config (``evaluators: [world, "mypkg.judges:length_judge"]``).

An evaluator is any callable ::

    evaluator(prompts, responses) -> dict[str, float]

``prompts[i]``: the messages ``responses[i]`` answers (a ``PromptRecord.prompt``: ``Message``s, or dicts
with ``role`` and ``content``); ``responses[i]``: the answer's text. It returns float metrics named as it
likes; one that does not apply to these prompts returns ``{}``. Two optional attributes let a stage ask more:

- ``score(prompts, responses) -> list[float] | None`` with ``name``: one score per response (None: does not
  apply). Rejection sampling then reports ``<name>_best_mean``, ``<name>_sample_mean`` and
  ``<name>_first_mean`` (the kept answers, all samples, the first sample of each prompt), and the evaluation
  stage writes the first such score into each answer's ``score``.
- ``turns(prompts, responses) -> dict[str, float]``: metrics of multi-turn data, each response judged on the
  messages the model saw (GAtt); without it, GAtt calls the evaluator itself on the same turns.

Names resolve through :mod:`align.plugins`: a plug-in's evaluator (the built-in world's ``world``) or a
dotted path ``"package.module:attribute"`` to the evaluator object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from align.plugins import load

Prompt = Sequence[Any]  # messages: data_schemas.Message or {"role", "content"} dicts


@runtime_checkable
class Evaluator(Protocol):
    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> dict[str, float]:
        """Metrics of ``responses[i]`` as answers to ``prompts[i]`` (``{}``: does not apply)."""
        ...


def load_evaluators(names: list[str]) -> list[Evaluator]:
    """The evaluators ``names`` stand for, in order (a plug-in's name or a dotted path)."""
    evaluators = []
    for name in names:
        evaluator = load("evaluator", name)
        if not callable(evaluator):
            raise TypeError(f"evaluator '{name}' is a {type(evaluator).__name__}, not callable")
        evaluators.append(evaluator)
    return evaluators


def evaluate_all(evaluators: Sequence[Evaluator], prompts: Sequence[Prompt],
                 responses: Sequence[str]) -> dict[str, float]:
    """Every evaluator's metrics of one answer per prompt, merged (a metric two evaluators name is an error)."""
    _same_length(prompts, responses)
    return _merge(evaluators, lambda ev: ev(prompts, responses))


def evaluate_turns(evaluators: Sequence[Evaluator], prompts: Sequence[Prompt],
                   responses: Sequence[str]) -> dict[str, float]:
    """Multi-turn data: each evaluator's ``turns`` (else the evaluator itself) on every (seen, answer) turn."""
    _same_length(prompts, responses)
    return _merge(evaluators, lambda ev: getattr(ev, "turns", ev)(prompts, responses))


def evaluate_samples(evaluators: Sequence[Evaluator], prompts: Sequence[Prompt], samples: Sequence[Sequence[str]],
                     kept: Sequence[str | None]) -> dict[str, float]:
    """Rejection sampling: ``samples[i]`` are prompt i's samples in the order drawn, ``kept[i]`` the answer
    kept (None: none). An evaluator with a ``score``: ``<name>_best_mean``, ``_sample_mean``, ``_first_mean``;
    without: its metrics of the kept answers."""
    _same_length(prompts, samples)
    _same_length(prompts, kept)
    chosen = [(p, k) for p, k in zip(prompts, kept, strict=True) if k is not None]
    chosen_prompts, chosen_answers = [p for p, _ in chosen], [k for _, k in chosen]
    return _merge(evaluators, lambda ev: _sample_means(ev, prompts, samples, chosen_prompts, chosen_answers)
                  if hasattr(ev, "score") else ev(chosen_prompts, chosen_answers))


def first_scores(evaluators: Sequence[Evaluator], prompts: Sequence[Prompt],
                 responses: Sequence[str]) -> list[float] | None:
    """The first applicable ``score`` of the evaluators, one per response (None: no evaluator scores these)."""
    for ev in evaluators:
        scores = ev.score(prompts, responses) if hasattr(ev, "score") else None
        if scores is not None:
            return [float(s) for s in scores]
    return None


def _sample_means(ev, prompts, samples, best_prompts, best) -> dict[str, float]:
    flat_prompts = [p for p, ss in zip(prompts, samples, strict=True) for _ in ss]
    every = ev.score(flat_prompts, [s for ss in samples for s in ss])
    best_scores = ev.score(best_prompts, best)
    if every is None or best_scores is None:
        return {}
    first, pos = [], 0
    for ss in samples:
        first += every[pos : pos + min(len(ss), 1)]
        pos += len(ss)
    name = getattr(ev, "name", type(ev).__name__)
    return {f"{name}_best_mean": _mean(best_scores), f"{name}_sample_mean": _mean(every),
            f"{name}_first_mean": _mean(first)}


def _merge(evaluators, call) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for ev in evaluators:
        for key, value in call(ev).items():
            if key in metrics:
                raise ValueError(f"two evaluators report the metric '{key}'")
            metrics[key] = float(value)
    return metrics


def _same_length(prompts, responses) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0

"""What a stage would find in its records, checked when the recipe is validated instead of when the stage
starts (no torch; a stage used to load its model first and fail 13-49 s later):

- a filter that leaves no training record: a reward model's ``domain``, ``min_strength`` and
  ``dedup_threshold``, any stage's ``eval_fraction`` (it holds out whole prompts);
- SFT records none of whose answers is trained on (every assistant message has ``weight: 0``);
- Ghost Attention dialogues that are all shorter than ``min_turns``.

The records are the stage's own: the same functions read, sample, split and filter them. Only data that
exists before the run can be checked: files and built-in sets, not a ``from:`` (an earlier stage makes it).
A large built-in set is first drawn small (:data:`PROBE` records: generating the world's 12,000 helpfulness
pairs takes seconds): a problem found there is confirmed on the whole set, none found is taken as none. The
records are those of the first round the stage runs in (its seed, as :attr:`align.runtime.StageContext.seed`).
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

from align.config.dpo import DPOStage
from align.config.gatt import GattStage
from align.config.reward_model import RewardModelStage
from align.config.sft import SFTStage
from align.config.specs import DataSpec
from align.data.hygiene import apply_hygiene, select_domain
from align.data.sources import describe_sources, load_preferences, load_sft, prompt_key, split_by_prompt

PROBE = 64  # records of a built-in set drawn first


def check_records(recipe) -> list[str]:
    """Every problem the stages of ``recipe`` would find in their records, one line each."""
    problems: list[str] = []
    for stage in recipe.stages:
        check, spec = _check_of(stage)
        if check is None or spec.from_stage is not None:
            continue
        first_round = min(stage.in_rounds) if stage.in_rounds else 1
        seed = recipe.seed + 1000 * (first_round - 1)  # as StageContext.seed
        with contextlib.redirect_stdout(sys.stderr):  # 'skipped N bad rows' is no part of validate's YAML
            problems += _probed(check, f"stages[{stage.name}]", stage, spec, seed)
    return problems


def _check_of(stage):
    """The check of a stage kind's records and the data spec it reads (``(None, None)``: nothing to check)."""
    if isinstance(stage, SFTStage):
        return _sft, stage.data
    if isinstance(stage, DPOStage):
        return _dpo, stage.data
    if isinstance(stage, RewardModelStage):
        return _reward_model, stage.data
    if isinstance(stage, GattStage):
        return _gatt, stage.dialogues
    return None, None


def _probed(check, at: str, stage, spec: DataSpec, seed: int) -> list[str]:
    """``check`` on a draw of :data:`PROBE` records of a larger built-in set first; what it finds there is
    confirmed on the whole set (a small draw can hold fewer prompts, domains or long dialogues)."""
    if spec.builtin is None or spec.builtin_size <= PROBE:
        return check(at, stage, spec, seed)
    found = check(at, stage, spec.model_copy(update={"builtin_size": PROBE}), seed)
    return check(at, stage, spec, seed) if found else []


def _split_problem(where: str, spec: DataSpec, records, train) -> list[str]:
    if train or not records:
        return []
    n = len({prompt_key(r) for r in records})
    return [f"{where}.eval_fraction: {spec.eval_fraction} holds out every prompt of "
            f"{describe_sources(spec, spec.paths)} ({n} distinct prompt{'s' if n != 1 else ''}): no training "
            "record is left; lower it"]


def _sft(at: str, stage: SFTStage, spec: DataSpec, seed: int) -> list[str]:
    train, held = load_sft(spec, spec.paths, seed)
    problems = _split_problem(f"{at}.data", spec, train + held, train)
    if train and not any(m.trained for r in train for m in r.messages):
        problems.append(f"{at}.data: no training record of {describe_sources(spec, spec.paths)} has an answer "
                        "to train on: every assistant message has weight 0 (context only)")
    return problems


def _dpo(at: str, stage: DPOStage, spec: DataSpec, seed: int) -> list[str]:
    records = load_preferences(spec, spec.paths, seed)
    train, _ = split_by_prompt(records, spec.eval_fraction, seed, spec.train_sample)
    return _split_problem(f"{at}.data", spec, records, train)


def _reward_model(at: str, stage: RewardModelStage, spec: DataSpec, seed: int) -> list[str]:
    """The steps of :meth:`align.train.reward_model.RewardModel._data` before tokens: domain, split, hygiene."""
    every = load_preferences(spec, spec.paths, seed)
    records = select_domain(every, stage.domain, stage.default_domain)
    sources = describe_sources(spec, spec.paths)
    if every and not records:
        return [f"{at}.domain: no record of {sources} has domain '{stage.domain}' (there: "
                f"{_tally(select_domain(every, None, stage.default_domain), 'domain')}; records without one take "
                "default_domain)"]
    train, _ = split_by_prompt(records, spec.eval_fraction, seed, spec.train_sample)
    if not train:
        return _split_problem(f"{at}.data", spec, records, train)
    kept, counts = apply_hygiene(train, stage.min_strength, stage.dedup_threshold)
    if kept:
        return []
    if counts["dropped_below_min_strength"]:
        return [f"{at}.min_strength: '{stage.min_strength}' drops every training record of {sources} (there: "
                f"{_tally(train, 'strength')}; records without a strength are kept)"]
    return [f"{at}.dedup_threshold: {stage.dedup_threshold} leaves no training record of {sources} with two "
            "responses that differ enough; raise it or leave it out"]


def _tally(records, field: str) -> str:
    counts = Counter(getattr(r, field) for r in records)
    return ", ".join(f"{n} {value if value is not None else f'without a {field}'}" for value, n in counts.most_common())


def _gatt(at: str, stage: GattStage, spec: DataSpec, seed: int) -> list[str]:
    """As :func:`align.data.gatt.plan_dialogues`: a dialogue is used if it has ``min_turns`` user turns."""
    if stage.min_turns <= 1:
        return []
    train, held = load_sft(spec, spec.paths, seed)
    longest = max((sum(m.role == "user" for m in r.messages) for r in train + held), default=0)
    if longest >= stage.min_turns:
        return []
    return [f"{at}.min_turns: {stage.min_turns} is more user turns than any dialogue of "
            f"{describe_sources(spec, spec.paths)} has (at most {longest}); lower it or give longer dialogues"]

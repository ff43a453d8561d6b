"""The reward-KL frontier of a DPO-vs-PPO comparison run (``recipes/dpo_vs_ppo.yaml``), from its run folders.

Pure reading and arithmetic (JSON and YAML files in, plain rows out; matplotlib only inside the plotting
functions), so ``notebooks/dpo_vs_ppo.ipynb`` stays short and the numbers it quotes are tested.

A run folder holds, per trained stage (DPO or PPO), an evaluation stage with ``snapshots: true`` whose
``snapshots.jsonl`` has one row per policy snapshot and a last row for the final policy: gold metrics and
``kl_to_reference`` (the exact sequence KL to the shared start). :func:`checkpoint_rows` flattens them into
one row per (seed, run, checkpoint), :func:`change_from_start` pairs each with its seed's start,
:func:`summarise` averages the seeds, :func:`pareto_front` is the
upper envelope drawn on the frontier plot, and :func:`compute_rows` the time and tokens each method spent.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

METRICS = ("gold_helpfulness", "safety_violation_rate", "over_refusal_rate", "gold_score",  # the built-in world
           "sentiment", "distinct_2", "word_repeat_rate")  # the sentiment judge (rewards.sentiment, eval.diversity)
KNOB = {"dpo": "beta", "ppo": "kl_coef"}
BEST_OF_N = "best-of-N"


def _stages(run_dir: Path) -> tuple[int, dict[str, dict]]:
    resolved = yaml.safe_load((run_dir / "resolved.yaml").read_text())
    return int(resolved.get("seed", 0)), {s["name"]: s for s in resolved["stages"]}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def method_of(stage: dict, stages: dict[str, dict]) -> str:
    """A trained stage's method label, by what rewards it: ``PPO (RMs)`` (Helpfulness + Safety), ``PPO (RM)``
    (one reward model), ``PPO (F)`` (a reward function F: ``gold``, ``sentiment``: the paper's PPO-GT), and
    for DPO what ranked its pairs: ``DPO (F pairs)`` or ``DPO (RM pairs)``."""
    if stage["kind"] == "ppo":
        reward = stage.get("reward") or {}
        if reward.get("function"):
            return f"PPO ({reward['function']})"
        return "PPO (RM)" if reward.get("model") else "PPO (RMs)"
    source = stage["data"].get("from")
    source = source[0] if isinstance(source, list) else source
    ranked_by = stages.get(source, {}).get("reward") or {}
    return f"DPO ({ranked_by['function']} pairs)" if ranked_by.get("function") else "DPO (RM pairs)"


def best_of_n_rows(run_dirs: Iterable[str | Path], round_: int = 1) -> list[dict]:
    """One row per N of every rejection-sampling stage with ``best_of`` (method ``best-of-N``, knob N,
    checkpoint 1): its analytic KL and the evaluators' metrics of the picks (``best_of_<N>/...``)."""
    rows = []
    for run_dir in map(Path, run_dirs):
        seed, stages = _stages(run_dir)
        for name, stage in stages.items():
            done = run_dir / f"round_{round_}" / name / "result.json"
            if stage["kind"] != "rejection_sampling" or not stage.get("best_of") or not done.is_file():
                continue
            result = json.loads(done.read_text())["metrics"]
            for n in stage["best_of"]:
                rows.append({"seed": seed, "run": name, "method": BEST_OF_N, "knob": "N", "value": float(n),
                             "step": 0, "checkpoint": 1, "kl": result[f"best_of_{n}/kl"],
                             **{m: result.get(f"best_of_{n}/{m}") for m in METRICS}})
    return rows


def checkpoint_rows(run_dirs: Iterable[str | Path], round_: int = 1) -> list[dict]:
    """One row per evaluated checkpoint of every DPO / PPO run: seed, run (the trained stage), method,
    knob (beta or kl_coef) and its value, step, checkpoint (1 = first snapshot ... last = final policy),
    kl (``kl_to_reference``) and the gold metrics. The start policy is a row of method ``start``, step 0."""
    rows = []
    for run_dir in map(Path, run_dirs):
        seed, stages = _stages(run_dir)
        for name, stage in stages.items():
            if stage["kind"] != "evaluate":
                continue
            folder = run_dir / f"round_{round_}" / name
            source = stage["model"].get("from")
            trained = stages.get(source) if isinstance(source, str) else None
            if trained is None or trained["kind"] not in KNOB:
                reference = stage.get("reference") or {}
                if reference and (reference == stage["model"] or (source is not None and reference.get("from") == source)):
                    result = json.loads((folder / "result.json").read_text())["metrics"]
                    rows.append({"seed": seed, "run": "start", "method": "start", "knob": None, "value": None,
                                 "step": 0, "checkpoint": 0, "kl": 0.0,
                                 **{m: result.get(m) for m in METRICS}})
                continue
            if not (folder / "snapshots.jsonl").is_file():
                continue
            knob = KNOB[trained["kind"]]
            for i, r in enumerate(_jsonl(folder / "snapshots.jsonl"), start=1):
                rows.append({"seed": seed, "run": source, "method": method_of(trained, stages), "knob": knob,
                             "value": float(trained.get(knob, 0.0)), "step": r["step"], "checkpoint": i,
                             "kl": r["kl_to_reference"], **{m: r.get(m) for m in METRICS}})
    return rows


def change_from_start(rows: Sequence[dict]) -> list[dict]:
    """The rows with each gold metric minus the same seed's start value: seeds whose starts differ (a few
    points of gold helpfulness here) are compared on what each method changed, not on where they began."""
    start = {r["seed"]: r for r in rows if r["method"] == "start"}
    start_n = {r["seed"]: r for r in rows if r["method"] == BEST_OF_N and r["value"] == 1}  # its own prompts
    out = []
    for r in rows:
        base = start_n.get(r["seed"]) if r["method"] == BEST_OF_N and r["seed"] in start_n else start.get(r["seed"])
        if base is None:
            raise ValueError(f"seed {r['seed']} has no start row (an evaluation of the start against itself)")
        out.append({**r, **{m: r[m] - base[m] for m in METRICS if r.get(m) is not None and base.get(m) is not None}})
    return out


def summarise(rows: Sequence[dict], metric: str) -> list[dict]:
    """Mean and spread over seeds per (method, knob value, checkpoint): kl and ``metric`` as mean, min and
    max, and the number of seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None:
            groups[(r["method"], r["value"], r["checkpoint"])].append(r)
    out = []
    for (method, value, checkpoint), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        kls, ys = [r["kl"] for r in rs], [r[metric] for r in rs]
        out.append({"method": method, "value": value, "checkpoint": checkpoint, "seeds": len(rs),
                    "kl": statistics.fmean(kls), "kl_min": min(kls), "kl_max": max(kls),
                    metric: statistics.fmean(ys), f"{metric}_min": min(ys), f"{metric}_max": max(ys)})
    return out


def pareto_front(points: Iterable[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The points no other point beats at a KL as low or lower, sorted by KL: the upper envelope (or the
    lower one with ``higher_is_better=False``) of (kl, metric) points."""
    sign = 1 if higher_is_better else -1
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * y > sign * front[-1][1]:
            front.append((x, y))
    return front


def compute_rows(run_dirs: Iterable[str | Path], round_: int = 1) -> list[dict]:
    """Per DPO / PPO run: wall seconds and tokens processed, with the cost of the data it needs. DPO: its
    training plus the stage that sampled and ranked its pairs (``train_tokens``: prompt + both responses of
    every pair, per epoch); PPO: its iterations (sampling, scoring and training are one loop; tokens: those
    of every optimizer step's rows)."""
    out = []
    for run_dir in map(Path, run_dirs):
        seed, stages = _stages(run_dir)
        for name, stage in stages.items():
            if stage["kind"] not in KNOB:
                continue
            result = json.loads((run_dir / f"round_{round_}" / name / "result.json").read_text())
            seconds, tokens = result.get("seconds") or 0.0, 0.0
            if stage["kind"] == "dpo":
                tokens = result["metrics"].get("train_tokens", 0.0)
                sources = stage["data"].get("from") or []
                for source in [sources] if isinstance(sources, str) else sources:
                    made = run_dir / f"round_{round_}" / source / "result.json"
                    if made.is_file():
                        seconds += json.loads(made.read_text()).get("seconds") or 0.0
            else:
                for r in _jsonl(run_dir / f"round_{round_}" / name / "metrics.jsonl"):
                    tokens += r.get("train/tokens", 0.0) * r.get("train/optimizer_steps", 0.0)
            out.append({"seed": seed, "run": name, "method": method_of(stage, stages), "seconds": seconds,
                        "tokens": tokens})
    return out


COLORS = {"DPO (gold pairs)": "tab:blue", "DPO (RM pairs)": "tab:cyan", "PPO (RMs)": "tab:red",
          "PPO (gold)": "tab:orange", "start": "black", "DPO (sentiment pairs)": "tab:blue",
          "PPO (sentiment)": "tab:orange", "PPO (RM)": "tab:red", BEST_OF_N: "tab:green",
          "DPO": "tab:blue", "PPO-GT": "tab:orange", "PPO-RM": "tab:red"}  # the DPO paper's names


def plot_frontier(rows: Sequence[dict], metric: str, ax, higher_is_better: bool = True, title: str | None = None,
                  ylabel: str | None = None):
    """Scatter of ``metric`` against KL, one colour per method, a point per (knob value, checkpoint) with
    the seeds' spread as error bars, and each method's Pareto front drawn as a line."""
    summary = summarise(rows, metric)
    for method in sorted({s["method"] for s in summary}):
        pts = [s for s in summary if s["method"] == method]
        color = COLORS.get(method, None)
        ax.errorbar([p["kl"] for p in pts], [p[metric] for p in pts],
                    xerr=[[p["kl"] - p["kl_min"] for p in pts], [p["kl_max"] - p["kl"] for p in pts]],
                    yerr=[[p[metric] - p[f"{metric}_min"] for p in pts], [p[f"{metric}_max"] - p[metric] for p in pts]],
                    fmt="*" if method == "start" else "o", color=color, alpha=0.55, ms=9 if method == "start" else 4,
                    label=method, capsize=0, elinewidth=0.8)
        if method != "start":
            front = pareto_front([(p["kl"], p[metric]) for p in pts], higher_is_better)
            ax.plot([x for x, _ in front], [y for _, y in front], "-", color=color, lw=2)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("KL to the start policy (nats per response, held-out prompts)")
    ax.set_ylabel(ylabel or metric.replace("_", " "))
    ax.set_title(title or f"{metric.replace('_', ' ')} vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def front_at(front: Sequence[tuple[float, float]], kl: float) -> float | None:
    """The best value a Pareto front (:func:`pareto_front`, higher is better) reaches at a KL no larger than
    ``kl`` (None: none of its points is that close to the start)."""
    reached = [y for x, y in front if x <= kl]
    return max(reached) if reached else None


def compare_fronts(summary: Sequence[dict], metric: str, a: str, b: str, points: int = 4) -> list[dict]:
    """Method ``a``'s best ``metric`` within a KL budget minus method ``b``'s (:func:`front_at` of each front,
    rows of :func:`summarise`), at ``points`` budgets spread log-evenly from the first KL both reach to the
    largest either reaches: {kl, a, b, difference}; [] when a method has no point."""
    fronts = {m: pareto_front([(s["kl"], s[metric]) for s in summary if s["method"] == m]) for m in (a, b)}
    if not fronts[a] or not fronts[b]:
        return []
    lo = max(fronts[a][0][0], fronts[b][0][0], 1e-3)
    hi = max(lo, *(x for x, _ in fronts[a] + fronts[b]))
    kls = [lo * (hi / lo) ** (i / max(points - 1, 1)) for i in range(points)]
    out = []
    for kl in kls:
        ya, yb = front_at(fronts[a], kl), front_at(fronts[b], kl)
        out.append({"kl": kl, a: ya, b: yb, "difference": None if ya is None or yb is None else ya - yb})
    return out


def best_checkpoints(rows: Sequence[dict], metric: str, gain: float = 0.25, ceiling: float = 1.0) -> list[dict]:
    """Per seed and trained method, its checkpoint with the highest ``metric`` beside the seed's start: the
    gain, the bar (``gain``, or half the distance from the start to ``ceiling`` when that is smaller) and
    whether it is met, the checkpoint's KL, setting and number, and its word-repeat share beside twice the
    start's (``repeats``, ``repeats_limit``; None without the diversity evaluator)."""
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        start = next((r for r in rows if r["seed"] == seed and r["method"] == "start"), None)
        if start is None:
            raise ValueError(f"seed {seed} has no start row (an evaluation of the start against itself)")
        bar = min(gain, (ceiling - start[metric]) / 2)
        for method in sorted({r["method"] for r in rows if r["seed"] == seed and r["method"] not in ("start", BEST_OF_N)}):
            best = max((r for r in rows if r["seed"] == seed and r["method"] == method), key=lambda r: r[metric])
            repeats, start_repeats = best.get("word_repeat_rate"), start.get("word_repeat_rate")
            out.append({"seed": seed, "method": method, "start": start[metric], "best": best[metric],
                        "gain": best[metric] - start[metric], "bar": bar,
                        "meets_bar": best[metric] - start[metric] >= bar, "kl": best["kl"], "setting": best["value"],
                        "checkpoint": best["checkpoint"], "repeats": repeats,
                        "repeats_limit": None if start_repeats is None else 2 * start_repeats})
    return out


def stage_seconds(run_dirs: Iterable[str | Path], round_: int = 1) -> list[dict]:
    """Every finished stage of every run, in recipe order: {seed, stage, kind, minutes} (wall time)."""
    out = []
    for run_dir in map(Path, run_dirs):
        seed, stages = _stages(run_dir)
        for name, stage in stages.items():
            done = run_dir / f"round_{round_}" / name / "result.json"
            if done.is_file():
                seconds = json.loads(done.read_text()).get("seconds") or 0.0
                out.append({"seed": seed, "stage": name, "kind": stage["kind"], "minutes": seconds / 60})
    return out

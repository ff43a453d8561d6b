"""A multi-round run, a row per round (Llama 2 Figure 11's view of RLHF-V1 ... V5): the gold metrics of the
round's last evaluated policy, each reward model's held-out accuracy (all pairs; the newest policy's answers;
last round's model on those same answers: the out-of-distribution drop), rejection sampling's reward ranking
its own samples against gold (this round's reward models; last round's), its kept-vs-mean gold, and the
round's time. Read from ``report.json``'s stage records; no torch."""

from __future__ import annotations

from collections.abc import Callable

Row = dict[str, float | str | None]


def _final_eval(mine: list[dict]) -> dict | None:
    evaluated = [r for r in mine if r["kind"] == "evaluate" and r["metrics"].get("gold_helpfulness") is not None]
    return evaluated[-1] if evaluated else None


def round_summary(records: list[dict]) -> list[Row]:
    """One dict per round: ``round``, ``policy`` (the stage whose evaluation is shown), its gold metrics, per
    reward model ``<stage>/accuracy``, ``<stage>/newest``, ``<stage>/previous_on_newest``; per rejection
    sampling stage with the gold evaluator ``<stage>/gold_kept``, ``<stage>/gold_mean``,
    ``<stage>/reward_accuracy`` and ``<stage>/previous_reward_accuracy`` (its reward, and its
    ``compare_reward``, ranking its own candidates against gold); and ``seconds``."""
    rows = []
    for rnd in sorted({r["round"] for r in records}):
        mine = [r for r in records if r["round"] == rnd]
        row: Row = {"round": rnd}
        final = _final_eval(mine)
        if final is not None:
            m = final["metrics"]
            row.update(policy=final["stage"], gold_helpfulness=m.get("gold_helpfulness"),
                       violation_rate=m.get("safety_violation_rate"), over_refusal=m.get("over_refusal_rate"),
                       kl_to_reference=m.get("kl_to_reference"))
        for r in mine:
            m, name = r["metrics"], r["stage"]
            if r["kind"] == "reward_model":
                row.update({f"{name}/accuracy": m.get("rm_accuracy"), f"{name}/newest": m.get("rm_newest_accuracy"),
                            f"{name}/previous_on_newest": m.get("compare_rm_newest_accuracy")})
            elif r["kind"] == "rejection_sampling" and m.get("gold_best_mean") is not None:
                row.update({f"{name}/gold_kept": m["gold_best_mean"], f"{name}/gold_mean": m.get("gold_sample_mean"),
                            f"{name}/reward_accuracy": m.get("gold_reward_accuracy"),
                            f"{name}/previous_reward_accuracy": m.get("gold_compare_reward_accuracy")})
        row["seconds"] = sum(r.get("stage_seconds") or 0.0 for r in mine)
        rows.append(row)
    return rows


def clock(seconds: float | None) -> str:
    """``m:ss``; blank when unknown."""
    if seconds is None:
        return ""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


def _f(v, fmt="{:.3f}") -> str:
    return "" if v is None else fmt.format(v)


def _columns(rows: list[Row]) -> list[tuple[str, Callable[[Row], str]]]:
    cols: list[tuple[str, Callable[[Row], str]]] = [
        ("round", lambda r: f"V{r['round']}"), ("policy", lambda r: str(r.get("policy") or "")),
        ("gold helpfulness", lambda r: _f(r.get("gold_helpfulness"))),
        ("violations", lambda r: _f(r.get("violation_rate"))), ("over-refusal", lambda r: _f(r.get("over_refusal"))),
        ("KL to reference", lambda r: _f(r.get("kl_to_reference"))),
    ]
    keys = list(dict.fromkeys(k for r in rows for k in r if "/" in k))
    for rm in dict.fromkeys(k.split("/")[0] for k in keys if k.endswith("/accuracy")):
        cols += [(f"{rm} acc", lambda r, s=rm: _f(r.get(f"{s}/accuracy"))),
                 (f"{rm} on newest (last round's)", lambda r, s=rm: _paired(r, f"{s}/newest", f"{s}/previous_on_newest"))]
    for rs in dict.fromkeys(k.split("/")[0] for k in keys if k.endswith("/gold_kept")):
        cols += [(f"{rs}: reward on its samples (last round's)",
                  lambda r, s=rs: _paired(r, f"{s}/reward_accuracy", f"{s}/previous_reward_accuracy")),
                 (f"{rs} gold kept / mean", lambda r, s=rs: "" if r.get(f"{s}/gold_kept") is None else
                  f"{r[f'{s}/gold_kept']:.3f} / {_f(r.get(f'{s}/gold_mean'))}")]
    cols.append(("time", lambda r: clock(r["seconds"])))
    return [(name, cell) for name, cell in cols if name in ("round", "time") or any(cell(r) for r in rows)]


def _paired(row: Row, key: str, previous: str) -> str:
    now, before = row.get(key), row.get(previous)
    if now is None:
        return ""
    return f"{now:.3f}" + ("" if before is None else f" ({before:.3f})")


def round_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """-> (header, rows) of the by-round table; no rows for a one-round run."""
    if len({r["round"] for r in records}) < 2:
        return [], []
    summary = round_summary(records)
    cols = _columns(summary)
    return [name for name, _ in cols], [[cell(r) for _, cell in cols] for r in summary]

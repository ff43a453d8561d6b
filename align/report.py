"""A run's report: ``report.json`` (every stage's metrics), ``report.md`` (one compact table of the metrics
that matter, then one table per stage kind, then instruction retention by turn when measured) and
``report.png`` (the gold metrics by stage; by round for multi-round recipes). ``align report RUN_DIR``
prints the compact table. No torch; matplotlib only for the plot (skipped when absent).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from align.report_rounds import clock, round_rows

# The compact table: (column, how to read it from a stage's metrics). A stage shows only the columns it has.
Cell = Callable[[dict], str | None]


def _num(key: str, fmt: str = "{:.3f}") -> Cell:
    return lambda m: None if m.get(key) is None else fmt.format(m[key])


def _kept_vs_mean(m: dict) -> str | None:
    if m.get("gold_best_mean") is None or m.get("gold_sample_mean") is None:
        return None
    return f"{m['gold_best_mean']:.3f} / {m['gold_sample_mean']:.3f}"


def _start_end(key: str) -> Cell:
    def cell(m: dict) -> str | None:
        if m.get(key) is None or m.get(f"{key}_start") is None:
            return None
        return f"{m[f'{key}_start']:.3f} -> {m[key]:.3f}"
    return cell


def _rewards(m: dict) -> str | None:
    scores = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("reward/")}
    return " / ".join(f"{n} {v:+.2f}" for n, v in sorted(scores.items())) or None


COMPACT: list[tuple[str, Cell]] = [
    ("gold helpfulness", _num("gold_helpfulness")),
    ("violation rate", _num("safety_violation_rate")),
    ("over-refusal", _num("over_refusal_rate")),
    ("KL to reference", _num("kl_to_reference")),
    ("RM accuracy", _num("rm_accuracy")),
    ("RM length baseline", _num("rm_accuracy_length_baseline")),
    ("DPO held-out reward accuracy", _num("eval_reward_accuracy")),
    ("DPO held-out logp preference", _start_end("eval_logp_accuracy")),
    ("gold kept / mean (RS)", _kept_vs_mean),
    ("mean RM score", _rewards),
]
GENERATIONS = 3  # prompts shown in the report's generations section
GOLD_CURVES = (("gold_helpfulness", "gold helpfulness"), ("safety_violation_rate", "violation rate"),
               ("over_refusal_rate", "over-refusal rate"))


def compact_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """-> (header, rows) of the compact table: round, stage, kind, the COMPACT columns any stage has, time."""
    used = [(name, cell) for name, cell in COMPACT if any(cell(r["metrics"]) is not None for r in records)]
    header = ["round", "stage", "kind", *[name for name, _ in used], "time"]
    rows = []
    for r in records:
        cells = [cell(r["metrics"]) or "" for _, cell in used]
        rows.append([str(r["round"]), r["stage"], r["kind"], *cells, clock(r.get("stage_seconds"))])
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns aligned for a terminal."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def kind_tables(records: list[dict]) -> list[str]:
    """One table per stage kind, every metric of that kind."""
    lines: list[str] = []
    for kind in dict.fromkeys(r["kind"] for r in records):
        mine = [r for r in records if r["kind"] == kind]
        keys = sorted({k for r in mine for k in r["metrics"]})
        if not keys:
            continue
        rows = [[str(r["round"]), r["stage"], *[_fmt(r["metrics"].get(k)) for k in keys]] for r in mine]
        lines += ["", f"### {kind}", "", *_markdown(["round", "stage", *keys], rows)]
    return lines


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def retention_table(run_dir: Path, records: list[dict]) -> list[str]:
    """Instruction following by turn for every evaluation with the multi-turn check (Llama 2 Table 30)."""
    rows = [r for r in records if any(k.startswith("retention/instruction_turn_") for k in r["metrics"])]
    if not rows:
        return []
    turns = sorted({int(k.rsplit("_", 1)[1]) for r in rows for k in r["metrics"]
                    if k.startswith("retention/instruction_turn_")})
    lines = ["", "## Instruction kept over a dialogue (Llama 2 Table 30)", "",
             "Share of answers that follow the first turn's instruction, by turn; task accuracy over all turns.",
             "", "| round | stage | " + " | ".join(f"turn {t}" for t in turns) + " | task accuracy |",
             "|---|---|" + "---|" * (len(turns) + 1)]
    for r in rows:
        m = r["metrics"]
        cells = [f"{m[f'retention/instruction_turn_{t}']:.0%}" if f"retention/instruction_turn_{t}" in m else ""
                 for t in turns]
        task = m.get("retention/task_mean")
        lines.append(f"| {r['round']} | {r['stage']} | " + " | ".join(cells) + f" | {'' if task is None else f'{task:.0%}'} |")
    plots = [(r, f"round_{r['round']}/{r['stage']}/retention.png") for r in rows]
    lines += [""] + [f"![{r['stage']}]({p})" for r, p in plots if (run_dir / p).exists()]
    return lines


def _first_user_text(prompt: list[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def generations_table(run_dir: Path, records: list[dict], count: int = GENERATIONS, limit: int = 240) -> list[str]:
    """The first ``count`` held-out prompts and every evaluated policy's answer to each (from the evaluate
    stages' ``answers.jsonl``, in run order): the before/after of each policy stage, to read."""
    evals = []
    for r in records:
        path = r["artifacts"].get("samples") if r["kind"] == "evaluate" else None
        # relative to the run folder (moved runs), or as the runner gave it (absolute or from the cwd)
        found = next((c for c in (run_dir / path, Path(path)) if c.is_file()), None) if path else None
        if found is not None:
            with found.open() as f:
                rows = [json.loads(line) for _, line in zip(range(4 * count), f, strict=False)]
            evals.append((r, {json.dumps(x["prompt"]): x["response"]["content"] for x in rows}))
    if not evals:
        return []
    prompts = []
    for _, answers in evals:
        prompts += [p for p in answers if p not in prompts]
    prompts = prompts[:count]
    rounds = len({r["round"] for r, _ in evals}) > 1
    lines = ["", "## Generations, before and after each policy stage", "",
             f"The first {len(prompts)} held-out prompts, answered greedily by each evaluated policy "
             f"(cut at {limit} characters; whole answers in each evaluation's answers.jsonl).", ""]
    for i, key in enumerate(prompts, 1):
        lines += [f"**Prompt {i}.** {_short(_first_user_text(json.loads(key)), limit)}", "",
                  "| policy | answer |", "|---|---|"]
        for r, answers in evals:
            name = f"r{r['round']} {r['stage']}" if rounds else r["stage"]
            lines.append(f"| {name} | {_short(answers.get(key, '(blank: left out)'), limit)} |")
        lines.append("")
    return lines


def plot_gold(path: Path, records: list[dict], title: str) -> bool:
    """The gold metrics of every evaluated stage, in run order (labels carry the round when there are
    several). -> False when matplotlib is missing or nothing was evaluated."""
    points = [r for r in records if r["metrics"].get("gold_helpfulness") is not None]
    if not points:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rounds = len({r["round"] for r in records}) > 1
    labels = [f"r{r['round']} {r['stage']}" if rounds else r["stage"] for r in points]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(points) + 2), 3.6))
    for key, name in GOLD_CURVES:
        ys = [r["metrics"].get(key) for r in points]
        if any(y is not None for y in ys):
            ax.plot(range(len(points)), [float("nan") if y is None else y for y in ys], marker="o", label=name)
    ax.set_xticks(range(len(points)), labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate (gold judge)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def write_report(run_dir: Path, name: str, records: list[dict], write=None) -> None:
    """``report.json``, ``report.png`` and ``report.md`` in ``run_dir``; ``write(path, text)`` writes a file
    atomically (the runner's)."""
    write = write or (lambda p, t: p.write_text(t))
    write(run_dir / "report.json", json.dumps(records, indent=1))
    plotted = plot_gold(run_dir / "report.png", records, f"{name}: gold metrics by stage")
    header, rows = compact_rows(records)
    lines = [f"# {name}", ""]
    by_round = round_rows(records)
    if by_round[1]:
        lines += ["## By round", "", "The last evaluated policy of each round; RM accuracy on held-out pairs, then on "
                  "the held-out answers of the policy annotated this round (in brackets: last round's RM on them).",
                  "", *_markdown(*by_round), "", "## By stage", ""]
    lines += _markdown(header, rows)
    if plotted:
        lines += ["", "![gold metrics by stage](report.png)"]
    lines += ["", "## Every metric, by stage kind", *kind_tables(records)]
    lines += retention_table(run_dir, records)
    lines += generations_table(run_dir, records)
    lines += ["", "## Artifacts", ""]
    lines += [f"- round {r['round']} {r['stage']}: {a}: `{p}`" for r in records for a, p in r["artifacts"].items()]
    write(run_dir / "report.md", "\n".join(lines) + "\n")


class ReportError(ValueError):
    """A ``report.json`` that cannot be read or is not one align wrote."""


def print_report(run_dir: Path) -> str:
    """The compact table of ``run_dir/report.json``, for a terminal."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no report (has `align run` finished in this folder?)")
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot be read ({err}); `align run` writes it again") from None
    if not isinstance(records, list):
        raise ReportError(f"{path}: expected a list of stage records, got {type(records).__name__}; not a report "
                          "align wrote (`align run` writes it again)")
    for k, record in enumerate(records):
        why = _record_problem(record)
        if why is not None:
            raise ReportError(f"{path}: record {k}: {why}; not a report align wrote (`align run` writes it again)")
    header, rows = compact_rows(records)
    by_round = round_rows(records)
    return (text_table(*by_round) + "\n\n" if by_round[1] else "") + text_table(header, rows)


def _record_problem(record) -> str | None:
    """What the compact table cannot read in one record of ``report.json`` (None: nothing)."""
    if not isinstance(record, dict):
        return f"expected an object, got {type(record).__name__}"
    missing = [k for k in ("round", "stage", "kind", "metrics") if k not in record]
    if missing:
        return f"no {', '.join(missing)}"
    if not isinstance(record["stage"], str) or not isinstance(record["kind"], str):
        return "stage and kind must be text"
    if not isinstance(record["metrics"], dict):
        return "metrics is not an object"
    bad = [k for k, v in record["metrics"].items() if v is not None and not isinstance(v, (int, float))]
    if bad:
        return f"metric {bad[0]!r} is not a number"
    seconds = record.get("stage_seconds")
    return None if seconds is None or isinstance(seconds, (int, float)) else "stage_seconds is not a number"

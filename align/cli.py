"""The ``align`` command. Thin: parse, validate (before torch is imported), hand over to the runner."""

from __future__ import annotations

import argparse
import json
import os
import sys

from align.config.recipe import STAGE_BY_KIND, RecipeError, dump_recipe, load_recipe

EPILOG = """\
overrides:
  key=value pairs after the recipe change it before validation. A first part that names a stage
  selects that stage: sft.train.optim.lr=1e-4, sft.train.max_steps=20, sft.model.path=/models/llama.
  Otherwise the key is a top-level one: seed=3, output_dir=/tmp/runs, name=try2. Values are YAML.

examples:
  align run recipes/llama3_round.yaml
  align run recipes/llama3_round.yaml seed=1 sft.train.max_steps=10
  align validate recipes/llama3_round.yaml
  align options sft
"""


def _load(args, run: bool):
    """The recipe with its overrides, checked (files, hub models, what the stages would find in their
    records, for a run the run folder)."""
    from align.command_checks import recipe_problems
    from align.data.record_checks import check_records

    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):  # from the shell's folder: absolute, so '..' is fine here
        overrides.append(f"output_dir={json.dumps(os.path.abspath(os.path.expanduser(args.output_dir)))}")
    recipe = load_recipe(args.recipe, overrides)
    problems = recipe_problems(recipe, run) + check_records(recipe)
    if problems:
        raise RecipeError(args.recipe, problems)
    return recipe


def _cmd_run(args) -> int:
    recipe = _load(args, run=True)
    from align.runner import run_recipe  # imports torch: only after the recipe is known to be valid

    records = run_recipe(recipe)
    print(f"report: {recipe.run_dir / 'report.md'}")
    for r in records:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
        print(f"  round {r['round']} {r['stage']:<16} {shown}")
    return 0


def _cmd_report(args) -> int:
    from pathlib import Path

    from align.report import ReportError, print_report

    try:
        print(print_report(Path(args.run_dir)))
    except (FileNotFoundError, ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nevery metric: {Path(args.run_dir) / 'report.md'}")
    return 0


def _cmd_validate(args) -> int:
    recipe = _load(args, run=False)
    print(dump_recipe(recipe), end="")
    print(f"# ok: {len(recipe.stages)} stage(s), {recipe.rounds} round(s)", file=sys.stderr)
    return 0


def _describe_model(cls, indent: str = "  ") -> list[str]:
    from pydantic import BaseModel

    lines = []
    for name, info in cls.model_fields.items():
        key = info.alias or name
        default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
        lines.append(f"{indent}{key}: {info.description or ''} ({default})")
        sub = info.annotation
        for candidate in getattr(sub, "__args__", (sub,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                lines += _describe_model(candidate, indent + "    ")
                break
    return lines


def _cmd_options(args) -> int:
    kinds = [args.kind] if args.kind else list(STAGE_BY_KIND)
    for kind in kinds:
        if kind not in STAGE_BY_KIND:
            raise RecipeError("command line", [f"unknown stage kind '{kind}'; known: {', '.join(STAGE_BY_KIND)}"])
        cls = STAGE_BY_KIND[kind]
        print(f"kind: {kind} - {(cls.__doc__ or '').strip()}")
        print("\n".join(_describe_model(cls)))
    return 0


def _register_eval_commands(sub) -> None:
    """One line per ``align eval X`` command; each module adds its own subparser (``add_command``), and
    :mod:`align.command_checks` checks its arguments before it runs (``check``)."""
    from align import command_checks
    from eval.reward_model import add_command as add_reward_model_command  # align eval reward-model

    add_reward_model_command(sub)
    sub.choices["reward-model"].set_defaults(check=command_checks.eval_reward_model)
    from align.stages.policy_command import add_command as add_policy_command  # align eval policy

    add_policy_command(sub)
    sub.choices["policy"].set_defaults(check=command_checks.eval_policy)


def _register_data_commands(sub) -> None:
    """``align data NAME``: each plug-in's ``data_command`` adds its own subparser (``add_command``; the
    built-in world's ``align data world``, :mod:`align.plugins`)."""
    from align import plugins
    from align.data.continuation import add_command as add_continuations  # align data continuations

    for name in plugins.names("data_command"):
        plugins.load("data_command", name)(sub)
    add_continuations(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align",
        description="Post-training alignment the Llama 2 / Llama 3 way: reward models, rejection "
        "sampling, SFT, DPO, PPO, run as recipes of stages.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run a recipe (skips finished stages, resumes interrupted ones)",
        description="Run every stage of a recipe in order. Outputs go to OUTPUT_DIR/NAME/round_K/STAGE/: an "
        "HF checkpoint, metrics.jsonl, TensorBoard logs and result.json; report.md and report.json sum up.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )
    run.add_argument("recipe", help="recipe YAML file, e.g. recipes/llama3_round.yaml")
    run.add_argument("overrides", nargs="*", help="key=value changes to the recipe (see below)")
    run.add_argument("--output-dir", help="root folder for runs (overrides the recipe's output_dir)")
    run.set_defaults(func=_cmd_run)

    val = sub.add_parser(
        "validate", help="check a recipe and print it with every default filled in",
        description="Validate a recipe (and overrides) without running anything; print the resolved YAML.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )
    val.add_argument("recipe", help="recipe YAML file")
    val.add_argument("overrides", nargs="*", help="key=value changes to the recipe")
    val.set_defaults(func=_cmd_validate)

    rep = sub.add_parser(
        "report", help="print a run's compact table (gold metrics, KL, RM accuracy, time by stage)",
        description="Print the compact table of RUN_DIR/report.json: by stage, the gold helpfulness, "
        "violation and over-refusal rates, KL to the reference, reward-model accuracy, the gold score of "
        "the kept vs the average rejection-sampling answer, and the time the stage took.",
    )
    rep.add_argument("run_dir", help="a run folder, e.g. runs/llama3_round")
    rep.set_defaults(func=_cmd_report)

    ev = sub.add_parser("eval", help="evaluate a reward model or a policy", description="Evaluate models.")
    ev_sub = ev.add_subparsers(dest="what", required=True, metavar="WHAT")
    _register_eval_commands(ev_sub)

    data = sub.add_parser("data", help="write built-in data sets", description="Generate data sets.")
    data_sub = data.add_subparsers(dest="what", required=True, metavar="WHAT")
    _register_data_commands(data_sub)

    opt = sub.add_parser("options", help="list every setting of a stage kind, with its default")
    opt.add_argument("kind", nargs="?", help=f"stage kind ({', '.join(STAGE_BY_KIND)}); all when omitted")
    opt.set_defaults(func=_cmd_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`align run R.yaml --output-dir D a.b=1`): argparse leaves those over
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _checked(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (every error ends here: a message, or a traceback for a bug)
        return _failed(err)


def _checked(args) -> int:
    """The command, after the checks of its arguments (``check``, set with its subparser) found nothing."""
    from align.command_checks import CommandError

    problems = args.check(args) if getattr(args, "check", None) else []
    if problems:
        raise CommandError(problems)
    return args.func(args)


def _failed(err: Exception) -> int:
    """One line per problem and exit code 2 for bad input (the recipe, arguments, data, files: what the
    user can fix); a stage that failed reports its own way; anything else is a bug: its traceback, a line
    asking to report it, exit code 1."""
    import traceback

    from align.command_checks import CommandError
    from align.runtime import REPORT_BUG, StageFailed, StageInputError
    from data_schemas import DataError

    if isinstance(err, StageFailed):  # the stage's process printed any traceback already
        print(f"error: {err}", file=sys.stderr)
        return 2 if err.user_error else 1
    if isinstance(err, CommandError):
        print("\n".join(f"error: {p}" for p in err.problems), file=sys.stderr)
        return 2
    if isinstance(err, (RecipeError, DataError, StageInputError, OSError)):  # OSError: a file, the disk
        print(f"error: {err}", file=sys.stderr)
        return 2
    traceback.print_exception(err)
    print(REPORT_BUG, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

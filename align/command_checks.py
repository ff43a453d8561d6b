"""Checks of what a command names, before it loads a model or writes a file (no torch): the arguments of
``align eval policy`` and ``align eval reward-model``, the hub models of a recipe, the run folder. Each
function returns problems, one line each, naming the argument (``--batch-size``) or the recipe field and the
file; :func:`align.cli.main` prints them and exits with 2.

A local model folder is checked as a recipe's is (:func:`align.config.file_checks.check_model_path`), and a
hub id once against the hub, or the Hugging Face cache under ``HF_HUB_OFFLINE`` (:func:`align.compat.hub_problem`):
transformers would otherwise retry an unreachable hub for a minute before its traceback.
"""

from __future__ import annotations

from pathlib import Path

from align import plugins
from align.compat import hub_problem
from align.config.file_checks import HUB_ID, check_model_path
from align.config.model_checks import architecture, folder_role
from align.config.recipe import Recipe
from rewards.encoding import MIN_MAX_LENGTH


class CommandError(ValueError):
    """Arguments a command cannot run with; ``problems``: one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def eval_policy(args) -> list[str]:
    """``align eval policy``: models, prompt file, numbers, evaluators, the answers file."""
    problems = model_problems("--model", args.model, "policy")
    if args.reference:
        problems += model_problems("--reference", args.reference, "policy")
    problems += _reward_models(args.reward_model)
    if args.prompts:
        problems += readable_file("--prompts", args.prompts)
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        problems += at_least(flag, value, 1)
    if not args.temperature >= 0:
        problems.append(f"--temperature: must be 0 (greedy) or more (got {args.temperature})")
    for name in args.evaluator or []:
        why = plugins.problem("evaluator", name)
        problems += [f"--evaluator: {why}"] if why else []
    if args.out:
        problems += writable_path("--out", args.out)
    return problems


def _reward_models(items: list[str]) -> list[str]:
    problems, seen = [], set()
    for item in items:
        name, _, path = item.partition("=")
        if not name or not path:
            problems.append(f"--reward-model: expected NAME=PATH, got '{item}'")
        elif name in seen:
            problems.append(f"--reward-model: the name '{name}' is given twice")
        else:
            problems += model_problems(f"--reward-model {name}", path, "reward model")
        seen.add(name)
    return problems


def eval_reward_model(args) -> list[str]:
    """``align eval reward-model``: the reward model, the preference file, numbers."""
    problems = model_problems("--model", args.model, "reward model") + data_rows("--data", args.data, "preference",
                                                                               args.limit)
    problems += at_least("--batch-size", args.batch_size, 1) + at_least("--limit", args.limit, 1)
    return problems + at_least("--max-length", args.max_length, MIN_MAX_LENGTH)


def at_least(flag: str, value: int | None, low: int) -> list[str]:
    return [] if value is None or value >= low else [f"{flag}: must be at least {low} (got {value})"]


def readable_file(flag: str, path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.exists():
        return [f"{flag}: file not found: {path}"]
    if file.is_dir():
        return [f"{flag}: {path} is a folder, not a file"]
    try:
        with file.open("rb") as f:
            f.read(1)
    except OSError as err:
        return [f"{flag}: {path}: cannot read ({err.strerror or err})"]
    return []


def data_rows(flag: str, path: str, kind: str, limit: int | None = None) -> list[str]:
    """``readable_file``, then every row read as a ``kind`` record: the first bad row, as
    ``file:line: field 'x': reason``."""
    from data_schemas import DataError, read_jsonl

    problems = readable_file(flag, path)
    if problems:
        return problems
    try:
        read_jsonl(path, kind, limit=limit)
    except DataError as err:
        return [str(err)]
    return []


def writable_path(flag: str, path: str | Path, folder: bool = False) -> list[str]:
    """A file (``folder``: a folder) that can be written at ``path``: not a folder (a file) already, and no
    file where one of its parent folders would go."""
    target = Path(path).expanduser()
    if target.exists() and target.is_dir() != folder:
        return [f"{flag}: {path} is a {'file' if folder else 'folder'}; give a {'folder' if folder else 'file'}"]
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    return [f"{flag}: cannot write {path}: {blocker} is a file, not a folder"] if blocker else []


def model_problems(flag: str, path: str, role: str) -> list[str]:
    """A model argument: a complete local folder holding a ``role`` ('policy' or 'reward model'), or a hub id
    the hub (or the cache, offline) has."""
    problems = check_model_path(flag, path, has_tokenizer=False, lora=None)
    if problems:
        return problems
    local = Path(path).expanduser()
    if not local.exists():
        why = hub_problem(path)
        return [f"{flag}: {why}"] if why else []
    return _role_problems(flag, local, role)


def _role_problems(flag: str, folder: Path, role: str) -> list[str]:
    """A folder of the other kind (``align.config.model_checks.folder_role``: the rule validation applies):
    a causal LM where a reward model is wanted, or the other way round."""
    found = folder_role(folder)
    if found is None or found == role:
        return []  # nothing said (loading will tell), or the right kind
    arch = architecture(folder)
    if role == "reward model":
        return [f"{flag}: {folder} holds {arch}, not a reward model (sequence classification with one output, "
                "e.g. a reward_model stage's model/)"]
    return [f"{flag}: {folder} holds a reward model ({arch}), not a policy (a causal LM)"]


def recipe_problems(recipe: Recipe, run: bool) -> list[str]:
    """What :func:`align.config.recipe.load_recipe` leaves to the command: hub ids (one request each) and,
    for ``align run``, a run folder that can be made."""
    problems = writable_path("output_dir", recipe.run_dir, folder=True) if run else []
    asked: dict[str, str | None] = {}
    for stage in recipe.stages:
        for inp in stage.inputs():
            for field in ("path", "tokenizer"):
                name = getattr(inp.spec, field, None)
                if not _hub_id(name) or getattr(inp.spec, "gguf_file", None):
                    continue
                if name not in asked:
                    asked[name] = hub_problem(name, "config.json" if field == "path" else "tokenizer_config.json")
                if asked[name]:
                    problems.append(f"stages[{stage.name}].{inp.where}.{field}: {asked[name]}")
    return problems


def _hub_id(name) -> bool:
    return isinstance(name, str) and not name.startswith("builtin:") and not Path(name).expanduser().exists() \
        and bool(HUB_ID.match(name)) and not name.startswith(("/", ".", "~"))

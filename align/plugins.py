"""Plug-ins: reward functions, built-in data sets, tokenizers, evaluators and more that other packages give
align by name. The built-in world (``world/``) is one; align never imports it, only the names it gives.

A plug-in is a module named in the entry-point group ``align.plugins`` of an installed distribution
(``pyproject.toml``)::

    [project.entry-points."align.plugins"]
    world = "world.plugin"

holding ``PROVIDES``: for each kind of :data:`KINDS`, ``{name: "package.module:attribute"}`` (or a module
path). Strings only, so that reading the table, as recipe validation does, imports none of the plug-in's
code and no torch; an entry is imported the first time it is used, and used as it is (no call).

Where a recipe can name a user's own object instead (evaluators, reward functions: :data:`DOTTED`), a dotted
path ``"package.module:attribute"`` resolves the same way, without a plug-in.

Why entry points and not a table in align: installing a package is all it takes to add names (the world
is installed with align, from the same pyproject.toml), and align's code names no plug-in.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from functools import cache
from importlib.metadata import entry_points
from typing import Any

GROUP = "align.plugins"
KINDS = {  # kind -> what an entry is
    "reward": "a reward function (rewards.protocol.RewardFunction): reward: {function: NAME}",
    "sft": "fn(n, seed) -> list[SFTRecord]: data: {builtin: NAME}",
    "preferences": "fn(n, seed) -> list[PreferenceRecord]: data: {builtin: NAME}",
    "prompts": "fn(n, seed) -> list[PromptRecord]: prompts: {builtin: NAME}",
    "tokenizer": "fn() -> an HF tokenizer with a chat template: tokenizer: builtin:NAME",
    "evaluator": "an evaluator (align.evaluators): evaluators: [NAME]",
    "instructions": "fn() -> [(text, names)], GAtt's instruction pool: instructions: {builtin: NAME}",
    "retention": "a multi-turn retention suite (align.stages.retention)",
    "data_command": "add_command(subparsers): align data NAME (a check=fn(args) -> problems default runs first)",
}
DOTTED = ("reward", "evaluator")  # kinds a recipe may also give as "package.module:attribute"


@cache
def table() -> dict[str, dict[str, str]]:
    """kind -> {name: target} of every installed plug-in (read once per process)."""
    found: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
    owner: dict[tuple[str, str], str] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        provides = getattr(importlib.import_module(ep.value), "PROVIDES", None)
        if not isinstance(provides, dict):
            raise TypeError(f"plug-in '{ep.name}' ({ep.value}) has no PROVIDES table")
        for kind, entries in provides.items():
            if kind not in KINDS:
                raise ValueError(f"plug-in '{ep.name}' ({ep.value}): unknown kind '{kind}'; known: {', '.join(KINDS)}")
            for name, target in entries.items():
                if (kind, name) in owner and found[kind][name] != target:
                    raise ValueError(f"{kind} '{name}' is given by two plug-ins: {owner[kind, name]} and {ep.name}")
                found[kind][name], owner[kind, name] = target, ep.name
    return found


def names(kind: str) -> list[str]:
    """The names the plug-ins give for ``kind``, sorted (what error messages list)."""
    return sorted(table()[kind])


def is_dotted(name: str) -> bool:
    module, colon, attr = name.partition(":")
    return bool(colon and module and attr.isidentifier() and all(p.isidentifier() for p in module.split(".")))


def problem(kind: str, name: str) -> str | None:
    """Why ``name`` does not resolve for ``kind`` (None: it does). A dotted path's module must be found;
    its attribute is checked when it is loaded."""
    if name in table()[kind]:
        return None
    if kind in DOTTED and is_dotted(name):
        module = name.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        return None if found else f"no module '{module}' (of '{name}') can be imported"
    known = names(kind)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    dotted = " or a dotted path 'package.module:name'" if kind in DOTTED else ""
    return f"unknown {kind} '{name}'{hint}; known: {', '.join(known) or 'none'}{dotted}"


def load(kind: str, name: str) -> Any:
    """The object ``name`` stands for: a plug-in's entry, or (kinds of :data:`DOTTED`) a dotted path."""
    target = table()[kind].get(name)
    if target is None:
        why = problem(kind, name)
        if why is not None:
            raise ValueError(why)
        target = name
    return load_target(target)


def load_target(target: str) -> Any:
    """``"package.module:attribute"`` -> the attribute; ``"package.module"`` -> the module."""
    module, _, attr = target.partition(":")
    loaded = importlib.import_module(module)
    if not attr:
        return loaded
    try:
        return getattr(loaded, attr)
    except AttributeError:
        raise ValueError(f"'{target}': module '{module}' has no attribute '{attr}'") from None

"""The one registry of stage kinds: every :class:`~align.config.base.StageBase` subclass with a ``kind``
defined in a module of ``align.config``. Adding a stage kind = adding its config module; nothing to list."""

from __future__ import annotations

import importlib
import pkgutil
import typing

import align.config as _package
from align.config.base import StageBase


def _discover() -> dict[str, type[StageBase]]:
    for info in sorted(pkgutil.iter_modules(_package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{_package.__name__}.{info.name}")
    found: dict[str, type[StageBase]] = {}
    pending = list(StageBase.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending += cls.__subclasses__()
        field = cls.model_fields.get("kind")
        if field is None or typing.get_origin(field.annotation) is not typing.Literal:
            continue  # an abstract base
        kind = field.default
        if kind in found and found[kind] is not cls:
            raise TypeError(f"stage kind '{kind}' is defined twice: {found[kind].__name__} and {cls.__name__}")
        if not cls.runs_in:
            raise TypeError(f"stage kind '{kind}' ({cls.__name__}) does not say which module runs it (runs_in)")
        found[kind] = cls
    return found


STAGE_BY_KIND: dict[str, type[StageBase]] = _discover()
STAGE_TYPES: tuple[type[StageBase], ...] = tuple(STAGE_BY_KIND.values())

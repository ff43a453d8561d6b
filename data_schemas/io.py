"""JSONL reading (validated, with actionable errors) and atomic writing of records."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .adapters import PathMap, RowError, adapt_preference, adapt_prompt, adapt_scored, adapt_sft, json_type
from .records import PreferenceRecord, PromptRecord, ScoredSample, SFTRecord

__all__ = [
    "KINDS",
    "DataError",
    "Records",
    "append_jsonl",
    "append_line",
    "parse_record",
    "read_jsonl",
    "resolve_kind",
    "write_jsonl",
]

R = TypeVar("R", bound=BaseModel)
PathLike = str | os.PathLike[str]
KINDS: dict[str, type[BaseModel]] = {
    "sft": SFTRecord,
    "preference": PreferenceRecord,
    "prompt": PromptRecord,
    "scored": ScoredSample,
}
_ADAPTERS: dict[type[BaseModel], Callable[[dict[str, Any]], tuple[dict[str, Any], PathMap]]] = {
    SFTRecord: adapt_sft,
    PreferenceRecord: adapt_preference,
    PromptRecord: adapt_prompt,
    ScoredSample: adapt_scored,
}
_MAX_ERRORS = 20
_TYPE_NAMES = {
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}


class DataError(ValueError):
    """A bad data row: ``str()`` is ``"{path}:{line}: field '{field}': {reason}"`` (None parts omitted)."""

    def __init__(
        self, reason: str, *, path: PathLike | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.reason = reason
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.path or ""
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        body = f"field '{self.field}': {self.reason}" if self.field else self.reason
        return f"{where}: {body}" if where else body

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (self.reason, self.path, self.line, self.field))


def _rebuild_error(reason: str, path: str | None, line: int | None, field: str | None) -> DataError:
    return DataError(reason, path=path, line=line, field=field)


class Records(list):
    """``read_jsonl`` result: a list of records plus ``skipped`` rows and their first 20 ``errors``."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.skipped: int = 0
        self.errors: list[DataError] = []

    def skip(self, error: DataError) -> None:
        """Count a skipped bad row, keeping the first errors."""
        self.skipped += 1
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(error)


def resolve_kind(kind: type[R] | str) -> type[R]:
    if isinstance(kind, str):
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
        return KINDS[kind]  # type: ignore[return-value]
    if kind not in _ADAPTERS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def _short(v: Any) -> str:
    try:
        s = repr(v) if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _reason(err: dict[str, Any]) -> str:
    t, msg, ctx = err["type"], err["msg"], err.get("ctx") or {}
    if t == "missing":
        return "missing field"
    if t == "extra_forbidden":
        return "unknown field"
    if t == "literal_error":
        return f"expected one of {ctx.get('expected')}, got {_short(err.get('input'))}"
    if t in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[t]}, got {json_type(err.get('input'))}"
    if t == "value_error":
        msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _loc(err: dict[str, Any]) -> tuple[Any, ...]:
    at = (err.get("ctx") or {}).get("at")
    extra = tuple(int(p) if p.isdigit() else p for p in at.split(".")) if at else ()
    return tuple(err["loc"]) + extra


def parse_record(
    row: Any, kind: type[R] | str, *, path: PathLike | None = None, line: int | None = None
) -> R:
    """Adapt and validate one decoded JSON row; raises :class:`DataError` naming the original field."""
    cls = resolve_kind(kind)
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {json_type(row)}", path=path, line=line)
    try:
        norm, pmap = _ADAPTERS[cls](row)
    except RowError as e:
        raise DataError(e.reason, path=path, line=line, field=e.field) from None
    try:
        return cls.model_validate(norm)
    except ValidationError as e:
        errs = e.errors()
        reason = _reason(errs[0]) + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else "")
        field = ".".join(str(p) for p in pmap(_loc(errs[0]))) or None
        raise DataError(reason, path=path, line=line, field=field) from None


def read_jsonl(
    path: PathLike, kind: type[R] | str, *, skip_bad: bool = False, limit: int | None = None
) -> Records:
    """Read and validate every non-blank row of a JSONL file into records of ``kind``.

    Raises :class:`DataError` on the first bad row, or with ``skip_bad=True`` skips it and counts it
    in ``result.skipped`` (the first 20 errors kept in ``result.errors``). ``limit`` caps the number
    of records returned (reading stops there).
    """
    cls = resolve_kind(kind)
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    out = Records()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a JSONL file", path=path) from None
    except OSError as e:  # e.g. PermissionError
        raise DataError(f"cannot read: {e.strerror or e}", path=path) from None
    with f:
        for n, raw in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            try:
                rec = _parse_line(raw, n, cls, path)
            except DataError as e:
                if not skip_bad:
                    raise
                out.skip(e)
                continue
            if rec is not None:
                out.append(rec)
    return out


def _parse_line(raw: bytes, n: int, cls: type[BaseModel], path: PathLike) -> BaseModel | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 at byte {e.start}", path=path, line=n) from None
    if n == 1:
        text = text.lstrip("\ufeff")
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=path, line=n) from None
    return parse_record(row, cls, path=path, line=n)


def _dumps(record: BaseModel | dict[str, Any]) -> str:
    if isinstance(record, BaseModel):
        data = record.model_dump(mode="json", exclude_defaults=False)
    elif isinstance(record, dict):
        data = record
    else:
        raise TypeError(f"cannot write {type(record).__name__}; expected a pydantic model or a dict")
    return json.dumps(data, ensure_ascii=False)


def write_jsonl(path: PathLike, records: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Write records one JSON object per line, atomically (tmp file + ``os.replace``). Returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    n = 0
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            for r in records:
                f.write(_dumps(r) + "\n")
                n += 1
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def append_line(path: PathLike, line: str) -> None:
    """Append ``line`` (no newline in it) and a newline to ``path``, on a line of its own even when the
    file ends in a line a kill cut short (that tail is ended first and stays unreadable on its own)."""
    if "\n" in line:
        raise ValueError("append_line: the line holds a newline")
    with open(path, "a+b") as f:
        prefix = b""
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                prefix = b"\n"
        f.write(prefix + line.encode("utf-8") + b"\n")


def append_jsonl(path: PathLike, record: BaseModel | dict[str, Any]) -> None:
    """Append one record as a line (for stores that grow); creates parent dirs (see :func:`append_line`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    append_line(p, _dumps(record))

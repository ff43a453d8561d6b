"""Validated data records and JSONL I/O for the align toolkit (pydantic v2 only, no torch)."""

from .io import KINDS, DataError, Records, append_jsonl, parse_record, read_jsonl, resolve_kind, write_jsonl
from .records import (
    STRENGTHS,
    Conversation,
    Message,
    PreferenceRecord,
    PromptRecord,
    Role,
    ScoredSample,
    SFTRecord,
    Strength,
    check_turns,
)

__all__ = [
    "KINDS",
    "STRENGTHS",
    "Conversation",
    "DataError",
    "Message",
    "PreferenceRecord",
    "PromptRecord",
    "Records",
    "Role",
    "SFTRecord",
    "ScoredSample",
    "Strength",
    "append_jsonl",
    "check_turns",
    "parse_record",
    "read_jsonl",
    "resolve_kind",
    "write_jsonl",
]

"""Continuation prompts from human-written text, for the DPO paper's controlled-sentiment task (Rafailov et al.
2023, §6.1: a prefix of real text, the policy continues it, a sentiment classifier is the reward).

Each human-written assistant message of the chosen records gives the first 6-12 of its words (a number drawn
per message from a hash of its text: the same file gives the same prompts), inside a user turn that asks the
model to continue it. Records are split whole into train and held-out by a salted hash of their first
prefix, so no prefix (nor any other prefix of the same conversation) is in both. ``align data continuations``
writes ``continuation.train.jsonl`` and ``continuation.heldout.jsonl`` (prompt records, our schema)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from data_schemas import Message, PromptRecord, SFTRecord, read_jsonl, write_jsonl

INSTRUCTION = "Continue this text in a few sentences, in the same voice:\n\n"


def _hash(text: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{text}".encode()).digest()[:8], "big")


def prefix_of(text: str, min_words: int, max_words: int) -> str | None:
    """The first N words of ``text`` (N in [min_words, max_words], from a hash of the text), or None when the
    text has fewer than N + 4 words (a continuation needs something left to continue)."""
    words = text.split()
    n = min_words + _hash(" ".join(words), "words") % (max_words - min_words + 1)
    return " ".join(words[:n]) if len(words) >= n + 4 else None


def record_prefixes(records: Iterable[SFTRecord], sources: Sequence[str], exclude: Sequence[str], min_words: int,
                    max_words: int, per_record: int) -> list[list[str]]:
    """Per chosen record (``source`` contains one of ``sources``, none of ``exclude``): the prefixes of its
    first ``per_record`` usable assistant messages; records without one are left out."""
    out = []
    for record in records:
        source = record.source or ""
        if not any(s in source for s in sources) or any(x in source for x in exclude):
            continue
        texts = [m.content for m in record.messages if m.role == "assistant"]
        found = [p for p in (prefix_of(t, min_words, max_words) for t in texts) if p is not None]
        if found:
            out.append(found[:per_record])
    return out


def split_records(groups: list[list[str]], heldout: int, salt: str = "continuation") -> tuple[list[str], list[str]]:
    """-> (train, held-out) prefixes: whole records in the order of a salted hash of their first prefix go to
    held-out until it has ``heldout`` prefixes; a prefix repeated across records is kept once, in the split of
    its first record (held-out first)."""
    order = sorted(groups, key=lambda g: _hash(g[0].lower(), salt))
    held: list[str] = []
    train: list[str] = []
    seen: set[str] = set()
    for group in order:
        target = held if len(held) < heldout else train
        for p in group:
            if p.lower() not in seen:
                seen.add(p.lower())
                target.append(p)
    if len(held) < heldout:
        raise ValueError(f"only {len(held)} prefixes in all: fewer than the {heldout} held-out ones asked for")
    return train, held


def prompt_records(prefixes: Sequence[str], split: str) -> list[PromptRecord]:
    return [PromptRecord(prompt=[Message(role="user", content=INSTRUCTION + p)], tags=["continuation", split])
            for p in prefixes]


def split_prefixes(paths: Sequence[str], *, sources=("human",), exclude=("gsm8k",), min_words=6, max_words=12,
                   per_record=2, heldout=256) -> tuple[list[list[str]], list[str], list[str]]:
    """Read every file -> (prefix groups, one per conversation; train prefixes; held-out prefixes)."""
    groups = []
    for path in paths:
        groups += record_prefixes(read_jsonl(path, "sft"), sources, exclude, min_words, max_words, per_record)
    return groups, *split_records(groups, heldout)


def continuation_prompts(paths: Sequence[str], source) -> list[PromptRecord]:
    """One side of the split (``source``: an :class:`align.config.specs.ContinuationSource`) as prompt
    records: what ``prompts: {paths: [...], continuation: {split: heldout}}`` reads."""
    _, train, held = split_prefixes(paths, sources=source.sources, exclude=source.exclude,
                                    min_words=source.min_words, max_words=source.max_words,
                                    per_record=source.per_record, heldout=source.heldout)
    return prompt_records(held if source.split == "heldout" else train, source.split)


def write_continuations(paths: Sequence[str], out: Path, *, sources=("human",), exclude=("gsm8k",), min_words=6,
                        max_words=12, per_record=2, heldout=256) -> dict[str, int]:
    """Read every file, split, write the two files into ``out`` -> counts."""
    groups, train, held = split_prefixes(paths, sources=sources, exclude=exclude, min_words=min_words,
                                         max_words=max_words, per_record=per_record, heldout=heldout)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "continuation.train.jsonl", prompt_records(train, "train"))
    write_jsonl(out / "continuation.heldout.jsonl", prompt_records(held, "heldout"))
    return {"records": len(groups), "train": len(train), "heldout": len(held)}


def add_command(subparsers) -> None:
    """``align data continuations --data FILE [FILE ...] --out DIR``."""
    p = subparsers.add_parser(
        "continuations", help="continuation prompts from human-written text (the sentiment experiment's)",
        description="Continuation prompts (the DPO paper's controlled-sentiment task): the first 6-12 words of "
        "each human-written assistant message of SFT/multi-turn JSONL files (rows with 'source' and "
        "'messages', e.g. ../shared/data/multiturn.train.jsonl), inside a user turn asking to continue it. "
        "Records are split whole into train and held-out (no prefix in both); writes "
        "continuation.train.jsonl and continuation.heldout.jsonl (prompt records).",
    )
    p.add_argument("--data", nargs="+", required=True, help="JSONL files with 'source' and 'messages'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sources", nargs="+", default=["human"], help="keep rows whose source contains one of these")
    p.add_argument("--exclude", nargs="*", default=["gsm8k"], help="drop rows whose source contains one of these")
    p.add_argument("--min-words", type=int, default=6, help="shortest prefix, in words (default 6)")
    p.add_argument("--max-words", type=int, default=12, help="longest prefix, in words (default 12)")
    p.add_argument("--per-record", type=int, default=2, help="prefixes from one conversation at most (default 2)")
    p.add_argument("--heldout", type=int, default=256, help="held-out prompts (default 256)")
    p.set_defaults(func=_cmd, check=_check)


def _check(args) -> list[str]:
    problems = [f"--data: file not found: {f}" for f in args.data if not Path(f).is_file()]
    if not 1 <= args.min_words <= args.max_words:
        problems.append("--min-words and --max-words: need 1 <= min <= max")
    problems += [f"--{k.replace('_', '-')}: must be at least 1" for k in ("per_record", "heldout") if getattr(args, k) < 1]
    return problems


def _cmd(args) -> int:
    counts = write_continuations(args.data, Path(args.out).expanduser(), sources=args.sources, exclude=args.exclude,
                                 min_words=args.min_words, max_words=args.max_words, per_record=args.per_record,
                                 heldout=args.heldout)
    print(f"{counts['records']} conversations -> {counts['train']} train / {counts['heldout']} held-out prompts "
          f"in {args.out}")
    return 0

"""Read a stage's records from files, a built-in set or an earlier stage, and split off evaluation."""

from __future__ import annotations

import random
from collections.abc import Sequence

from align.config.specs import DataSpec
from align.data.builtin import BUILTIN_PREFERENCE, BUILTIN_PROMPTS, BUILTIN_SFT
from align.runtime import StageInputError
from data_schemas import PreferenceRecord, SFTRecord, read_jsonl


def read_records(paths: list[str], kind: str, skip_bad: bool) -> list:
    """Validated records of every file, in order; with ``skip_bad``, bad rows are skipped and counted."""
    records = []
    for path in paths:
        records += _said_skipped(path, read_jsonl(path, kind, skip_bad=skip_bad))
    return records


def _said_skipped(name, rows):
    """``rows`` (a :class:`data_schemas.Records`), after printing how many bad rows were skipped, if any."""
    if rows.skipped:
        print(f"{name}: skipped {rows.skipped} bad rows (first: {rows.errors[0]})")
    return rows


def gather(table: dict, spec: DataSpec, paths: Sequence[str], kind: str, seed: int, what: str) -> list:
    """The built-in set's records (if ``spec.builtin``), then those of the files (``paths``); a ``mix``: each
    part's records, drawn to its weight (:func:`mix_records`)."""
    if spec.mix:
        parts = [subset(gather(table, part, part.paths, kind, seed, what), part, seed) for part in spec.mix]
        tagged = [[r.model_copy(update={"meta": {**r.meta, MIX_PART: k}}) for r in part] for k, part in enumerate(parts)]
        records, counts = mix_records(tagged, [part.weight for part in spec.mix], seed)
        print("data mix: " + "; ".join(f"{describe_sources(part, part.paths)}: {c} records (of {len(r)})"
                                       for part, c, r in zip(spec.mix, counts, parts, strict=True)))
        return records
    if spec.continuation is not None:
        if kind != "prompt":
            raise StageInputError(f"data.continuation makes prompts, not the {what} records this stage reads")
        from align.data.continuation import continuation_prompts

        return continuation_prompts(paths, spec.continuation)
    records = builtin_records(table, spec, seed, what) if spec.builtin is not None else []
    if spec.hf is not None:
        from data_schemas.hf_io import read_hf

        records += _said_skipped(spec.hf.path, read_hf(spec.hf, kind, spec.skip_bad_rows))
    if paths or (spec.builtin is None and spec.hf is None):
        records += read_records(list(paths), kind, spec.skip_bad_rows)
    return records


MIX_PART = "mix_part"  # a mixed record's meta: which part of ``data.mix`` it came from (0, 1, ...)


def mix_counts(records: Sequence, prefix: str = "train") -> dict[str, float]:
    """What each part of a ``data.mix`` contributed to ``records`` (e.g. a stage's training split):
    ``<prefix>_mix_part<k>_records`` and ``..._share``; {} for records that were not mixed."""
    parts = [r.meta.get(MIX_PART) for r in records if getattr(r, "meta", None) and MIX_PART in r.meta]
    out: dict[str, float] = {}
    for k in sorted(set(parts)):
        out[f"{prefix}_mix_part{k}_records"] = float(parts.count(k))
        out[f"{prefix}_mix_part{k}_share"] = parts.count(k) / len(records)
    return out


def mix_records(parts: Sequence[list], weights: Sequence[float], seed: int) -> tuple[list, list[int]]:
    """-> (records, how many each part gave): as many records as the parts hold together, part i's share
    weights[i] / sum(weights) of them (largest remainders), drawn without repeats where the part has enough
    records and with whole repeats plus a draw where it has fewer; part order kept, seeded."""
    total, norm = sum(len(p) for p in parts), sum(weights)
    exact = [w / norm * total for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(parts)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    rng, out = random.Random(f"mix:{seed}"), []
    for k, (records, n) in enumerate(zip(parts, counts, strict=True)):
        if n and not records:
            raise StageInputError(f"mix[{k}] has no records but a weight of {weights[k]}")
        whole, rest = divmod(n, len(records)) if records else (0, 0)
        out += list(records) * whole + [records[i] for i in sorted(rng.sample(range(len(records)), rest))]
    return out, counts


def describe_sources(spec: DataSpec, paths: Sequence[str]) -> str:
    """Where a stage's records came from, for messages: the built-in set and the files read."""
    parts = [f"the built-in set '{spec.builtin}'"] if spec.builtin is not None else []
    parts += [f"the datasets source {spec.hf.path}"] if spec.hf is not None else []
    return ", ".join(parts + list(paths)) or "no file"


def builtin_records(table: dict, spec: DataSpec, seed: int, what: str) -> list:
    """Generate ``spec.builtin`` from ``table`` (name -> fn(n, seed)), or say which names exist."""
    if spec.builtin not in table:
        raise ValueError(f"unknown built-in {what} set '{spec.builtin}'; known: {sorted(table)}")
    return table[spec.builtin](spec.builtin_size, seed)


def load_sft(spec: DataSpec, paths: list[str], seed: int, system_prompt: str | None = None):
    """-> (train, eval) lists of SFTRecord."""
    records = subset(gather(BUILTIN_SFT, spec, paths, "sft", seed, "SFT"), spec, seed)
    if system_prompt:
        records = [_with_system(r, system_prompt) for r in records]
    return split_by_prompt(records, spec.eval_fraction, seed, spec.train_sample)


def trained_split(train: list[SFTRecord], held: list[SFTRecord], spec: DataSpec, sources: str,
                  stage: str) -> tuple[list[SFTRecord], list[SFTRecord], int]:
    """The records of a split with an answer to train on -> (train, held-out, how many rows were dropped:
    every assistant message has ``weight: 0``). Stops when no training record is left, naming why."""
    if not train:
        raise StageInputError(f"stage '{stage}': data.eval_fraction={spec.eval_fraction} holds out every prompt "
                              f"of {sources}: no training record is left; lower it")
    trained = [[r for r in records if any(m.trained for m in r.messages)] for records in (train, held)]
    if not trained[0]:
        raise StageInputError(f"stage '{stage}': no training record of {sources} has an answer to train on: "
                              "every assistant message has weight 0 (context only)")
    return trained[0], trained[1], len(train) + len(held) - len(trained[0]) - len(trained[1])


def subset(records: list, spec: DataSpec, seed: int) -> list:
    """``spec.limit``: the first records; then ``spec.sample``: a seeded random subset, in file order."""
    if spec.limit is not None:
        records = records[: spec.limit]
    if spec.sample is not None and spec.sample < len(records):
        keep = sorted(random.Random(f"sample:{seed}").sample(range(len(records)), spec.sample))
        records = [records[i] for i in keep]
    return records


def _with_system(record: SFTRecord, system_prompt: str) -> SFTRecord:
    if record.system or record.messages[0].role == "system":
        return record
    return record.model_copy(update={"system": system_prompt})


def prompt_key(record) -> str:
    """The first user message, case and whitespace folded: records that share it share a prompt."""
    messages = record.prompt if hasattr(record, "prompt") else record.messages
    return " ".join(next((m.content for m in messages if m.role == "user"), "").lower().split())


def split_by_prompt(records: Sequence, eval_fraction: float, seed: int,
                    train_sample: int | None = None) -> tuple[list, list]:
    """Hold out ``eval_fraction`` of the distinct prompts (:func:`prompt_key`) with all their records, so
    no prompt is in both splits: one prompt often carries several records that share responses, and a
    record-level split would score held-out records whose prompt (and answers) were trained on.
    ``train_sample``: then keep that many training records (the first of a seeded order, in file order, so
    a smaller sample is part of a larger one); the held-out split does not depend on it."""
    if eval_fraction <= 0:
        train, held = list(records), []
    else:
        keys = [prompt_key(r) for r in records]
        distinct = sorted(set(keys))
        random.Random(seed).shuffle(distinct)
        chosen = set(distinct[: max(1, int(round(eval_fraction * len(distinct))))])
        train = [r for r, k in zip(records, keys, strict=True) if k not in chosen]
        held = [r for r, k in zip(records, keys, strict=True) if k in chosen]
    if train_sample is not None and train_sample < len(train):
        order = list(range(len(train)))
        random.Random(seed * 7919 + 1).shuffle(order)
        train = [train[i] for i in sorted(order[:train_sample])]
    return train, held


def load_prompts(spec: DataSpec, paths: list[str], seed: int):
    """-> list of PromptRecord from a built-in pool or files (any of our record kinds)."""
    return subset(gather(BUILTIN_PROMPTS, spec, paths, "prompt", seed, "prompt"), spec, seed)


def load_preferences(spec: DataSpec, paths: Sequence[str], seed: int) -> list[PreferenceRecord]:
    """Every PreferenceRecord of the files, an earlier stage's pairs, or a built-in set (``chat``, or the
    world's ``world``, ``world_helpful``, ``world_safety``), after ``limit`` / ``sample``; no held-out
    split (the stages split by prompt: :func:`align.data.sources.split_by_prompt`)."""
    return subset(gather(BUILTIN_PREFERENCE, spec, paths, "preference", seed, "preference"), spec, seed)

"""Micro-batches: which examples go together, and how they become tensors.

Two layouts, both exact (no token attends across examples):
- packed: examples are bin-packed end to end into rows of at most ``max_length`` tokens; position ids
  restart at 0 for each example, which the HF attention masks read as sequence boundaries.
- padded: one row per example, right-padded, with a 2D padding mask.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from align.data.chat import TokenizedChat


class MovesToDevice:
    """``batch.to(device)`` for a batch dataclass: every tensor field is moved, and so is every field that
    is itself a dataclass (e.g. a ``SharedPromptBatch`` inside a DPO batch), recursively; None and other
    values stay. In place; returns the batch (``make_batch(...).to(device)``)."""

    def to(self, device):
        return _move_tensors(self, device)


def _move_tensors(batch, device):
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            setattr(batch, f.name, value.to(device))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _move_tensors(value, device)
    return batch


@dataclass
class TokenBatch(MovesToDevice):
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T) bool, or None for a packed row
    index: torch.Tensor  # (N,) flat positions into B*T whose next token is scored
    targets: torch.Tensor  # (N,) the scored next tokens
    example_ids: torch.Tensor  # (N,) which example of the micro-batch each scored token belongs to
    num_examples: int
    num_tokens: int  # real (non-pad) tokens, for throughput

    @property
    def padded_tokens(self) -> int:
        """Token slots of the batch, padding included."""
        return int(self.input_ids.numel())

    @property
    def num_scored(self) -> int:
        return int(self.index.numel())

    def model_inputs(self) -> tuple:
        return self.input_ids, self.position_ids, self.attention_mask, self.index, self.targets


def _scored(example: TokenizedChat, offset: int):
    ids, mask = example.input_ids, example.loss_mask
    pos = [t for t in range(len(ids) - 1) if mask[t + 1]]
    return [offset + t for t in pos], [ids[t + 1] for t in pos]


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row (ascending within a row; rows in the order opened),
    each row's total length <= capacity (an example longer than capacity gets a row of its own)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, room in enumerate(free):
            if lengths[k] <= room:
                rows[r].append(k)
                free[r] -= lengths[k]
                break
        else:
            rows.append([k])
            free.append(capacity - lengths[k])
    return [sorted(row) for row in rows]


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each example into the row whose room it fills best (the least
    room that still holds it), a new row when none does. -> indices per row (ascending within a row), rows
    in the order opened. Rows end up nearly full (TRL's ``bfd`` packing); an example longer than
    ``capacity`` gets a row of its own."""
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row) sorted
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        at = bisect.bisect_left(rooms, (lengths[k], -1))
        if at < len(rooms):
            room, r = rooms.pop(at)
            rows[r].append(k)
            bisect.insort(rooms, (room - lengths[k], r))
        else:
            rows.append([k])
            if capacity - lengths[k] > 0:
                bisect.insort(rooms, (capacity - lengths[k], len(rows) - 1))
    return [sorted(row) for row in rows]


def group_packed_rows(order: Sequence[int], lengths: Sequence[int], row_length: int, rows_per_batch: int,
                      seed: int, epoch: int) -> list[list[list[int]]]:
    """The epoch's examples (``order``) packed best-fit into rows of ``row_length`` tokens across the whole
    epoch, the rows shuffled (seeded by ``seed`` and ``epoch``) and cut into micro-batches of
    ``rows_per_batch`` rows: micro-batch -> row -> example indices."""
    rows = [[order[k] for k in row] for row in pack_best_fit([lengths[i] for i in order], row_length)]
    random.Random(seed * 1_000_003 + epoch + 700_001).shuffle(rows)
    return [rows[i : i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]


def collate_packed(examples: Sequence[TokenizedChat], row_length: int, pad_id: int,
                   rows: Sequence[Sequence[int]] | None = None) -> TokenBatch:
    """Bin-pack the examples into rows of at most ``row_length`` tokens, padding-free inside a row.

    Position ids restart at 0 for every example, so attention never crosses examples (HF builds the
    block mask from them); the pad tail of a row is one more dummy sequence that nothing reads.
    Rows keep attention cost at row_length^2 with SDPA; with flash-attention one row would do.
    ``rows``: the rows already chosen (indices into ``examples``), e.g. by :func:`group_packed_rows`.
    """
    if rows is None:
        rows = pack_first_fit([len(ex) for ex in examples], row_length)
    width = max(sum(len(examples[k]) for k in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    index, targets, owners, n_tokens = [], [], [], 0
    for r, row in enumerate(rows):
        col = 0
        for k in row:
            ex = examples[k]
            n = len(ex)
            ids[r, col : col + n] = torch.tensor(ex.input_ids)
            positions[r, col : col + n] = torch.arange(n)
            idx, tgt = _scored(ex, r * width + col)
            index += idx
            targets += tgt
            owners += [k] * len(idx)
            col += n
        n_tokens += col
        positions[r, col:] = torch.arange(width - col)
    return TokenBatch(
        input_ids=ids,
        position_ids=positions,
        attention_mask=None,
        index=torch.tensor(index, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        example_ids=torch.tensor(owners, dtype=torch.long),
        num_examples=len(examples),
        num_tokens=n_tokens,
    )


def collate_padded(examples: Sequence[TokenizedChat], pad_id: int) -> TokenBatch:
    width = max(len(ex) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.bool)
    index, targets, owners = [], [], []
    for k, ex in enumerate(examples):
        n = len(ex)
        ids[k, :n] = torch.tensor(ex.input_ids)
        attn[k, :n] = True
        idx, tgt = _scored(ex, k * width)
        index += idx
        targets += tgt
        owners += [k] * len(idx)
    return TokenBatch(
        input_ids=ids,
        position_ids=torch.arange(width).expand(len(examples), width).clone(),
        attention_mask=attn,
        index=torch.tensor(index, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        example_ids=torch.tensor(owners, dtype=torch.long),
        num_examples=len(examples),
        num_tokens=int(attn.sum()),
    )


def group_by_count(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive groups of ``batch_size`` examples (the last may be smaller)."""
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def length_sorted_groups(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Micro-batches of ``batch_size`` indices, longest first: for passes whose order does not matter
    (reference log-probs, scoring), so each padded batch holds records of similar length."""
    return group_by_count(sorted(range(len(lengths)), key=lambda i: -lengths[i]), batch_size)


def group_by_tokens(order: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups whose total length stays within ``max_tokens`` (an example longer than the
    budget gets a group of its own)."""
    groups, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        groups.append(current)
    return groups


def group_by_length(order: Sequence[int], lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                    megabatch: int = 50) -> list[list[int]]:
    """Micro-batches of examples of similar length, so little of a padded batch is padding (HF's
    ``group_by_length``): ``order`` is cut into megabatches of ``megabatch`` micro-batches, each sorted by
    length (longest first, ties in ``order``) and cut into micro-batches of ``batch_size``; the micro-batches
    of the epoch are then shuffled (seeded by ``seed`` and ``epoch``), so length does not follow the step."""
    size = megabatch * batch_size
    groups = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start : start + size], key=lambda i: -lengths[i])
        groups += group_by_count(chunk, batch_size)
    random.Random(seed * 1_000_003 + epoch + 500_009).shuffle(groups)
    return groups


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order

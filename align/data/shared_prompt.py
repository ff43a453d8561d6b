"""One row per prompt: the prompt once, then every response, each seeing the prompt and itself only.

Used by the reward model (all ranked responses of a prompt in one row) and DPO (chosen and rejected
sharing the prompt). Exact, not an approximation:

- attention: token i may attend token j iff j <= i and (j is in the prompt or j is in i's response);
- position ids: 0..P-1 for the prompt, and P, P+1, ... again for every response, so each response
  sees exactly the positions it would see in a row of its own.

The mask is a 4D additive float mask (B, 1, T, T) that HF models take as is (SDPA and eager
attention; flash-attention kernels do not take arbitrary masks).

Packing: a batch's rows are of very different lengths (a short prompt with short answers beside a long
one), so :func:`collate_shared` packs several records into one row, first-fit decreasing into rows as wide
as the batch's longest record (the width, and so the attention cost per row, does not grow; only the number
of rows falls). A token sees only its own record (``groups``), so packing changes no number; responses are
numbered in the order of the records given, whatever row they land in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from align.data.collate import pack_first_fit


@dataclass(frozen=True)
class SharedPromptRow:
    input_ids: list[int]
    position_ids: list[int]
    segments: list[int]  # -1 on the prompt, k on response k
    spans: list[tuple[int, int]]  # [start, end) of each response in the row

    @property
    def prompt_length(self) -> int:
        return self.spans[0][0]


def build_row(prompt_ids: Sequence[int], responses: Sequence[Sequence[int]]) -> SharedPromptRow:
    if not prompt_ids:
        raise ValueError("empty prompt")
    if any(len(r) == 0 for r in responses):
        raise ValueError("empty response")
    p = len(prompt_ids)
    ids, positions, segments, spans = list(prompt_ids), list(range(p)), [-1] * p, []
    for k, resp in enumerate(responses):
        spans.append((len(ids), len(ids) + len(resp)))
        ids += resp
        positions += range(p, p + len(resp))
        segments += [k] * len(resp)
    return SharedPromptRow(ids, positions, segments, spans)


@dataclass
class SharedPromptBatch:
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, 1, T, T) additive float mask
    index: torch.Tensor  # (N,) flat positions whose next token is a response token
    targets: torch.Tensor  # (N,) that response token
    owner: torch.Tensor  # (N,) which response (0..R-1 over the whole batch) the token belongs to
    last_index: torch.Tensor  # (R,) flat position of each response's last token
    responses_per_row: list[int]  # per record (prompt), in the order given, packed or not
    num_tokens: int
    # (B, T, H) the records' hidden states after the frozen lower decoder layers (align.models.trunk),
    # placed like their tokens; the model then runs only the layers above. None: the whole model runs
    trunk: torch.Tensor | None = None

    def model_inputs(self) -> tuple:
        inputs = (self.input_ids, self.position_ids, self.attention_mask, self.index, self.targets)
        return inputs if self.trunk is None else (*inputs, self.trunk)


def block_mask(segments: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype,
               groups: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) segments (-1 prompt, k response, pad anything) + (B, T) valid (+ (B, T) groups: the record
    each token belongs to, when a row holds several) -> (B, 1, T, T) additive."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    q, k = segments.unsqueeze(2), segments.unsqueeze(1)  # (B, T, 1), (B, 1, T)
    allowed = causal & ((k == -1) | (k == q)) & valid.unsqueeze(1) & valid.unsqueeze(2)
    if groups is not None:
        allowed &= groups.unsqueeze(2) == groups.unsqueeze(1)
    allowed |= torch.eye(t, dtype=torch.bool)  # pad rows attend to themselves (no all -inf rows)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def layout(rows: Sequence[SharedPromptRow], pack: bool = True) -> tuple[int, list[list[int]], dict]:
    """Where :func:`collate_shared` puts each record: (width, bins (records per tensor row),
    place {record: (tensor row, offset)})."""
    width = max(len(r.input_ids) for r in rows)
    bins = pack_first_fit([len(r.input_ids) for r in rows], width) if pack else [[i] for i in range(len(rows))]
    place = {}
    for b, members in enumerate(bins):
        offset = 0
        for i in members:
            place[i] = (b, offset)
            offset += len(rows[i].input_ids)
    return width, bins, place


def record_states(states: torch.Tensor, rows: Sequence[SharedPromptRow], pack: bool = True) -> list[torch.Tensor]:
    """(B, T, H) per-position states of the batch of ``rows`` -> per record, (its length, H) (a copy)."""
    _, _, place = layout(rows, pack)
    return [states[place[i][0], place[i][1] : place[i][1] + len(r.input_ids)].clone() for i, r in enumerate(rows)]


def collate_shared(rows: Sequence[SharedPromptRow], pad_id: int, dtype=torch.float32,
                   pack: bool = True, trunks: Sequence[torch.Tensor] | None = None) -> SharedPromptBatch:
    """The batch of ``rows`` (one record each); ``pack``: several records per tensor row (module docstring),
    else one record per tensor row. ``trunks``: per record, (its length, H) hidden states after the frozen
    lower layers (:func:`record_states` of a pass over them), placed like the tokens in ``batch.trunk``."""
    width, bins, place = layout(rows, pack)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    segments = torch.full((len(bins), width), -2, dtype=torch.long)
    groups = torch.full((len(bins), width), -1, dtype=torch.long)
    valid = torch.zeros((len(bins), width), dtype=torch.bool)
    index, targets, owner, last = [], [], [], []
    r_global = 0
    for i, row in enumerate(rows):
        b, o = place[i]
        n = len(row.input_ids)
        ids[b, o:o + n] = torch.tensor(row.input_ids)
        positions[b, o:o + n] = torch.tensor(row.position_ids)
        segments[b, o:o + n] = torch.tensor(row.segments)
        groups[b, o:o + n] = i
        valid[b, o:o + n] = True
        base = b * width + o
        for start, end in row.spans:
            # the first response token is predicted from the last prompt token; the rest from the
            # response's own previous token
            predictors = [row.prompt_length - 1] + list(range(start, end - 1))
            index += [base + t for t in predictors]
            targets += row.input_ids[start:end]
            owner += [r_global] * (end - start)
            last.append(base + end - 1)
            r_global += 1
    return SharedPromptBatch(
        input_ids=ids,
        position_ids=positions,
        attention_mask=block_mask(segments, valid, dtype, groups if len(bins) < len(rows) else None),
        index=torch.tensor(index, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        owner=torch.tensor(owner, dtype=torch.long),
        last_index=torch.tensor(last, dtype=torch.long),
        responses_per_row=[len(r.spans) for r in rows],
        num_tokens=int(valid.sum()),
        trunk=None if trunks is None else _placed(trunks, place, len(bins), width),
    )


def _placed(trunks: Sequence[torch.Tensor], place: dict, n_rows: int, width: int) -> torch.Tensor:
    out = trunks[0].new_zeros((n_rows, width, trunks[0].shape[-1]))
    for i, t in enumerate(trunks):
        b, o = place[i]
        out[b, o : o + t.shape[0]] = t
    return out

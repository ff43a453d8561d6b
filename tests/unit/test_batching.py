"""Which records share a micro-batch and a row: first-fit packing, length grouping (HF's
``group_by_length``), and packed shared-prompt rows."""

import random

import pytest

from align.data.collate import (
    epoch_order,
    group_by_count,
    group_by_length,
    group_by_tokens,
    group_packed_rows,
    pack_best_fit,
    pack_first_fit,
)
from align.data.shared_prompt import build_row, collate_shared


def test_first_fit_decreasing_by_hand():
    # longest first: 7 opens row 0, 5 opens row 1 (7 + 5 > 10), 3 fills row 0 (7 + 3), then 2, 2 and 1
    # join row 1 (5 + 2 + 2 + 1 = 10)
    assert pack_first_fit([3, 7, 2, 5, 2, 1], 10) == [[0, 1], [2, 3, 4, 5]]
    assert pack_first_fit([3, 7, 2, 5, 2, 1], 9) == [[1, 2], [0, 3, 5], [4]]
    assert pack_first_fit([12, 3], 10) == [[0], [1]]  # too long for the capacity: a row of its own


def padded_area(groups, lengths):
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def test_group_by_length_keeps_every_record_once_and_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 400) for _ in range(203)]
    order = epoch_order(len(lengths), seed=3, epoch=0)
    groups = group_by_length(order, lengths, batch_size=8, seed=3, epoch=0, megabatch=10)
    assert sorted(i for g in groups for i in g) == list(range(203))
    assert sorted(len(g) for g in groups) == sorted(len(g) for g in group_by_count(order, 8))
    plain = padded_area(group_by_count(order, 8), lengths)
    assert padded_area(groups, lengths) < 0.75 * plain
    # within a megabatch of 80 records the micro-batches are cut from one descending sort
    first = sorted(order[:80], key=lambda i: -lengths[i])
    assert sorted(g for g in groups if set(g) <= set(order[:80])) == sorted(group_by_count(first, 8))
    # seeded: the same plan again, another epoch another order of micro-batches
    assert groups == group_by_length(order, lengths, 8, seed=3, epoch=0, megabatch=10)
    assert groups != group_by_length(order, lengths, 8, seed=3, epoch=1, megabatch=10)


def test_group_by_length_does_not_put_the_longest_batch_first_every_epoch():
    lengths = list(range(1, 65))
    firsts = {tuple(group_by_length(epoch_order(64, 0, e), lengths, 4, 0, e)[0]) for e in range(6)}
    assert len(firsts) > 1


def test_collate_shared_packs_short_records_beside_long_ones():
    rows = [build_row([1, 2, 3], [[4, 5, 6, 7], [8, 9]]),  # 9 tokens
            build_row([1, 2], [[3], [4]]),  # 4
            build_row([1], [[2, 3], [4]]),  # 4
            build_row([5, 6, 7, 8], [[9]])]  # 5
    packed = collate_shared(rows, pad_id=0)
    unpacked = collate_shared(rows, pad_id=0, pack=False)
    assert tuple(unpacked.input_ids.shape) == (4, 9)
    # first-fit decreasing at width 9: [9], [5, 4], [4]
    assert tuple(packed.input_ids.shape) == (3, 9)
    assert packed.num_tokens == unpacked.num_tokens == 22
    assert packed.responses_per_row == unpacked.responses_per_row == [2, 2, 2, 1]
    # the same tokens are scored, response by response, in the records' order
    flat_p, flat_u = packed.input_ids.reshape(-1), unpacked.input_ids.reshape(-1)
    assert packed.targets.tolist() == unpacked.targets.tolist()
    assert packed.owner.tolist() == unpacked.owner.tolist()
    # each scored position holds the same token (the prompt's last, or the response's previous one)
    assert flat_p[packed.index].tolist() == flat_u[unpacked.index].tolist()
    assert flat_p[packed.last_index].tolist() == flat_u[unpacked.last_index].tolist() == [7, 9, 3, 4, 3, 4, 9]
    # the row holding records 1 and 3: nothing attends across them
    mask = packed.attention_mask[1, 0]  # record 1 at 0..3 (prompt 0-1, answers 2 and 3), record 3 at 4..8
    assert (mask[4:9, 0:4] < 0).all() and (mask[0:4, 4:9] < 0).all()
    assert (mask[2:4, 0:2] == 0).all()  # record 1's answers see its prompt
    assert mask[3, 2] < 0  # record 1's second answer does not see its first
    assert (mask[4:9, 4:9] == unpacked.attention_mask[3, 0, :5, :5]).all()  # record 3 as in a row of its own


@pytest.mark.parametrize("pack", [True, False])
def test_position_ids_restart_per_record(pack):
    rows = [build_row([1, 2, 3], [[4, 5, 6]]), build_row([1], [[2]])]
    batch = collate_shared(rows, pad_id=0, pack=pack)
    flat = batch.position_ids.reshape(-1)
    assert flat[batch.last_index].tolist() == [5, 1]


def test_best_fit_decreasing_by_hand():
    # 7 opens row 0 (room 3), 5 opens row 1 (room 5), 3 fills row 0 (room 0: the best fit), 2 goes to row 1
    # (room 3), 2 again (room 1), 1 fills row 1; first-fit would do the same here, so a case where they differ:
    assert pack_best_fit([3, 7, 2, 5, 2, 1], 10) == [[0, 1], [2, 3, 4, 5]]
    # capacity 10: 6 opens row 0 (room 4), 5 opens row 1 (room 5); 4: best fit is row 0 (room 4 -> 0),
    # first fit is row 0 too; 3: best fit row 1 (room 5 -> 2); 2: row 1 (2 -> 0); 2: new row
    assert pack_best_fit([6, 5, 4, 3, 2, 2], 10) == [[0, 2], [1, 3, 4], [5]]
    # where they differ: 7 opens row 0 (room 3), 5 row 1 (room 5), 4 joins row 1 (room 1); 1 fits both:
    # best fit fills row 1, first fit takes row 0
    assert pack_best_fit([7, 5, 4, 1], 10) == [[0], [1, 2, 3]]
    assert pack_first_fit([7, 5, 4, 1], 10) == [[0, 3], [1, 2]]


def test_group_packed_rows_covers_the_epoch_in_nearly_full_rows():
    rng = random.Random(1)
    lengths = [rng.randint(5, 200) for _ in range(500)]
    order = epoch_order(500, seed=2, epoch=0)
    batches = group_packed_rows(order, lengths, 256, 4, seed=2, epoch=0)
    rows = [row for batch in batches for row in batch]
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert all(len(batch) == 4 for batch in batches[:-1])
    fill = sum(lengths) / (256 * len(rows))
    budget_rows = sum(len(pack_first_fit([lengths[i] for i in g], 256))
                      for g in group_by_tokens(order, lengths, 4 * 256))
    assert fill > 0.97 and len(rows) < budget_rows
    assert batches == group_packed_rows(order, lengths, 256, 4, seed=2, epoch=0)
    assert batches != group_packed_rows(order, lengths, 256, 4, seed=2, epoch=1)

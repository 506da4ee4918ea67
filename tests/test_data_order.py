"""The epoch-order arithmetic and TFRecord framing, without TensorFlow."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from trainer import data_order

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_order_and_framing_import_without_tensorflow():
    code = (
        "import sys; import trainer.data_order, trainer.tfrecord; "
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _round_robin_by_hand(counts, offset):
    """group_start's answer, by dealing records one at a time."""
    dealt = [(t, i) for t in range(max(counts)) for i, c in enumerate(counts) if c > t]
    consumed = [sum(1 for _, j in dealt[:offset] if j == i) for i in range(len(counts))]
    round_ = dealt[offset][0] if offset < len(dealt) else max(counts)
    owed = [c > round_ and consumed[i] == round_ for i, c in enumerate(counts)]
    return consumed, owed


@pytest.mark.parametrize("counts", [[3, 17, 1, 9], [5], [0, 4, 0, 2], [2, 2, 2]])
def test_group_start_at_every_record(counts):
    for offset in range(sum(counts) + 1):
        got = data_order.group_start(counts, offset)
        assert got == _round_robin_by_hand(counts, offset), offset


def test_interleave_plan_skips_whole_groups_before_start():
    counts = [3, 1, 2, 4, 0, 0, 0, 0, 5]  # Groups of 4: 10 records, 0, 5.
    plan = data_order.interleave_plan(counts, 11)
    assert plan == [([8], [1], [True])]  # 1 record of shard 8 read: owes the next
    groups = [group for group, _, _ in data_order.interleave_plan(counts, 0)]
    assert groups == [[0, 1, 2, 3], [8]]


def test_strided_and_rechunked_streams_keep_record_order():
    chunks = [
        ([f"r{i}" for i in range(a, b)], np.arange(a, b).repeat(2).reshape(-1, 2))
        for a, b in ((0, 5), (5, 6), (6, 13))
    ]
    kept = data_order.Rechunker(data_order.strided(chunks, 1, 3))
    first, ids = kept.take(3)
    assert first == ["r1", "r4", "r7"] and ids[:, 0].tolist() == [1, 4, 7]
    assert kept.take(10)[0] == ["r10"]
    assert kept.take(1)[0] == []

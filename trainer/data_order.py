"""The order of every epoch's records: arithmetic on record counts, no TensorFlow.

The training stream of one epoch is a pure function of (seed, epoch), the same
on every worker whatever their number:

1. the shard list is permuted with `np.random.default_rng((seed, epoch))`;
2. the shards are read INTERLEAVE_CYCLE at a time, record by record round
   robin (a shard leaves the round when it runs out), which mixes shards and
   keeps several reads in flight;
3. that stream is cut into windows of `data.shuffle_buffer` records and each
   window is permuted with `default_rng((seed, epoch, 0, window))`;
4. the permuted stream is cut into global batches, and worker i of W keeps
   records [i * b, (i + 1) * b) of every one, b = global batch / W
   (`WorkerSlice`): its replicas' share, kept before decoding.

So step s trains on the same records on one worker or on eight, and a run
resumes on another number of workers at the same records. The price is
reading: every worker reads (and checks) every training record, and decodes
only its slice. The validation split, whose order does not matter, is still
split by shards (`worker_shards`).

Every step of this is computable from record counts alone, so a run resumed at
(epoch, step) skips whole shards without reading them, reads only the window it
starts in, and yields exactly the batches the uninterrupted epoch yields from
that step on. The interleave cycle is a constant, not the reader parallelism,
so the order does not depend on the machine's core count.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import numpy as np

INTERLEAVE_CYCLE = 4  # Shards interleaved record by record; fixes the order.
ID_SHIFT = 32  # record id = shard index << 32 | record index in shard

# (records, ids): a chunk of the stream; ids is an int64 array, one row per record.
Chunk = tuple[list, np.ndarray]


def record_id(shard: int, index: int) -> int:
    """The record id of record `index` of shard `shard` (its augmentation seed)."""
    return shard << ID_SHIFT | index


def shard_order(seed: int, epoch: int, shards: int) -> np.ndarray:
    """The epoch's permutation of the training shards."""
    return np.random.default_rng((seed, epoch)).permutation(shards)


def window_order(
    seed: int, epoch: int, window: int, records: int, shuffle: bool
) -> np.ndarray:
    """The order of the `records` records of one shuffle window of the stream."""
    if not shuffle:
        return np.arange(records)
    # The 0 stands where each worker once seeded its own stream: a one-worker
    # run checkpointed by an earlier release keeps its order on resume.
    return np.random.default_rng((seed, epoch, 0, window)).permutation(records)


class WorkerSlice(NamedTuple):
    """A worker's records of every global batch: `size` of them from `first`."""

    global_batch: int
    first: int
    size: int

    def keeps(self, positions: np.ndarray) -> np.ndarray:
        """Mask of the stream positions (0 = the epoch's first record) kept."""
        within = np.asarray(positions) % self.global_batch
        return (within >= self.first) & (within < self.first + self.size)


def worker_slice(global_batch: int, workers: int, worker: int) -> WorkerSlice:
    """Worker `worker` of `workers` keeps its contiguous share of each global batch.

    Contiguous, so that its local replicas (which take consecutive per-replica
    batches of its stream) hold the same records as the same global replica
    numbers of a one-process run.
    """
    size = global_batch // workers
    return WorkerSlice(global_batch, worker * size, size)


class WorkerShards(NamedTuple):
    """One worker's share of the validation split (or the whole training split):
    it keeps records offset, offset + stride, ... of the interleaved stream of
    its shards."""

    shards: list[str]
    counts: list[int]
    shard_ids: list[int]  # Index of each shard in the split (for record ids).
    stride: int
    offset: int

    @property
    def records(self) -> int:
        """Records in this worker's stream."""
        return len(range(self.offset, sum(self.counts), self.stride))


def worker_shards(
    shards: list[str], counts: list[int], order, workers: int, worker: int
) -> WorkerShards:
    """The share of `worker` when the shards are taken in `order`.

    Every W-th shard; with fewer shards than workers, every worker reads all
    shards and keeps every W-th record instead.
    """
    if workers > 1 and len(order) < workers:
        mine, stride, offset = order, workers, worker
    else:
        mine, stride, offset = order[worker::workers], 1, 0
    return WorkerShards(
        [shards[i] for i in mine],
        [counts[i] for i in mine],
        [int(i) for i in mine],
        stride,
        offset,
    )


# ---------------------------------------------------------------------------
# The round-robin interleave, from any record on


def interleave_plan(
    counts: list[int], start: int
) -> list[tuple[list[int], list[int], list[bool]]]:
    """The shard groups a stream read from record `start` opens, in order.

    Each entry is (shard indexes, records of each shard consumed before
    `start`, whether each shard is still owed its record of a partial round;
    see `group_start`). Groups wholly before `start` are left out, never opened;
    so are later groups without records.
    """
    plan = []
    for first in range(0, len(counts), INTERLEAVE_CYCLE):
        group = list(range(first, min(first + INTERLEAVE_CYCLE, len(counts))))
        total = sum(counts[i] for i in group)
        if start >= total:
            start -= total
            continue
        if plan:  # Groups after the start group are read from their beginning.
            consumed, partial = [0] * len(group), [False] * len(group)
        else:
            consumed, partial = group_start([counts[i] for i in group], start)
            start = 0
        plan.append((group, consumed, partial))
    return plan


def group_start(counts: list[int], offset: int) -> tuple[list[int], list[bool]]:
    """Per shard of a round-robin group: records consumed before `offset`.

    Round robin with block 1 where an exhausted shard leaves the round: after t
    full rounds shard i gave min(c_i, t); the partial round gives one more to
    the first shards still active. Returns (consumed, in_partial_round).
    """
    c = np.asarray(counts, np.int64)
    lo, hi = 0, int(c.max()) if len(c) else 0
    while lo < hi:  # Largest t with sum(min(c, t)) <= offset.
        mid = (lo + hi + 1) // 2
        if np.minimum(c, mid).sum() <= offset:
            lo = mid
        else:
            hi = mid - 1
    t = lo
    consumed = np.minimum(c, t)
    rest = offset - int(consumed.sum())
    partial = [False] * len(c)
    for i in range(len(c)):
        if c[i] > t:
            if rest > 0:
                consumed[i] += 1
                rest -= 1
            else:
                partial[i] = True
    return [int(x) for x in consumed], partial


# ---------------------------------------------------------------------------
# Chunk streams


def strided(chunks: Iterable[Chunk], first: int, stride: int) -> Iterator[Chunk]:
    """Keeps records first, first + stride, ... of a chunk stream."""
    if stride == 1:
        yield from chunks
        return
    phase = first
    for datas, ids in chunks:
        sel = range(phase, len(datas), stride)
        if len(sel):
            yield [datas[j] for j in sel], ids[phase::stride]
        phase = (phase - len(datas)) % stride


class Rechunker:
    """Re-cuts a chunk stream into pieces of a chosen number of records."""

    def __init__(self, chunks: Iterable[Chunk]):
        self._it = iter(chunks)
        self._pending: Chunk | None = None  # Left over from the last take().

    def take(self, n: int) -> Chunk:
        """The next `n` records (fewer at the end of the stream)."""
        out_d: list = []
        out_i: list[np.ndarray] = []
        have = 0
        while have < n:
            if self._pending is not None:
                datas, ids = self._pending
                self._pending = None
            else:
                try:
                    datas, ids = next(self._it)
                except StopIteration:
                    break
            take = n - have
            if len(datas) > take:
                self._pending = (datas[take:], ids[take:])
                datas, ids = datas[:take], ids[:take]
            out_d.extend(datas)
            out_i.append(ids)
            have += len(datas)
        ids = np.concatenate(out_i) if out_i else np.zeros((0, 2), np.int64)
        return out_d, ids

"""Shard listing, record counts, record checks and the threaded shard readers.

No TensorFlow: the tf.data path (`input_pipeline`) and the TF-free one
(`np_input`) read through this. The order of the records (and how a resumed
epoch skips to its step) is `data_order`'s arithmetic; the TFRecord framing
and block reads are `tfrecord`'s. One thread per shard reads its blocks ahead
of the consumer (I/O only); the consumer's thread frames them and parses each
tf.train.Example (upb, ~3 us; `example_proto`, no TensorFlow), so that a bad
record is named by shard URL and record index. The streams hand on image
bytes, labels and record ids in chunks of up to CHUNK_RECORDS records; record
ids seed the augmentation.

Shard lists and record counts are read again by every call, never kept in the
process: a notebook that adds data and trains again sees it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import queue
import threading
from typing import Any, Callable, Iterator

import numpy as np

from trainer import data_order, example_proto, storage, tfrecord
from trainer.errors import DataError, NotFound, SpecError

COUNTS_CACHE = ".trainer-record-counts.json"
READ_AHEAD_BLOCKS = 2  # Blocks a shard's reader thread reads ahead.
CHUNK_RECORDS = 256  # Records per string tensor handed to tf.data.
CHUNK_BYTES = 4 * 1024 * 1024

_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


# ---------------------------------------------------------------------------
# Corrupt-record accounting (on_corrupt = "skip")


class CorruptTally:
    """The records skipped as corrupt (data.on_corrupt = "skip") in one run.

    Each bad record counts once per pass that reads it (a training epoch, a
    validation pass), keyed by (split, pass, record id). The key makes the
    count exact under read-ahead and resume: a record the reader saw before a
    checkpoint and sees again after the resume is the same entry. The entries
    go into every checkpoint, so a resumed run reports the whole run's total.

    Args:
      entries: `entries()` of a checkpoint, to continue from.
    """

    def __init__(self, entries=()):
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, int], str] = {
            (split, int(key), int(rid)): reason for split, key, rid, reason in entries
        }

    def recorder(self, split: str, pass_key: int):
        """A `skipped(shard id, record index, reason)` callback for one pass."""

        def skipped(gid: int, index: int, reason: str) -> None:
            with self._lock:
                self._seen[(split, pass_key, data_order.record_id(gid, index))] = reason

        return skipped

    def entries(self) -> list[list]:
        """JSON-able [split, pass, record id, reason] rows, for a checkpoint."""
        with self._lock:
            return [[*key, reason] for key, reason in sorted(self._seen.items())]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per split: records skipped (summed over passes), distinct records,
        and the skips by reason."""
        out: dict[str, dict[str, Any]] = {}
        for split, _, rid, reason in self.entries():
            entry = out.setdefault(
                split, {"skipped": 0, "records": set(), "reasons": {}}
            )
            entry["skipped"] += 1
            entry["records"].add(rid)
            entry["reasons"][reason] = entry["reasons"].get(reason, 0) + 1
        for entry in out.values():
            entry["records"] = len(entry["records"])
        return out


# ---------------------------------------------------------------------------
# Listing and record counts


def list_shards(pattern: str) -> list[str]:
    """Sorted shard URLs matching the glob `pattern` (manifest.json excluded).

    Args:
      pattern: an fsspec URL glob.

    Returns:
      The shard URLs, sorted.

    Raises:
      FileNotFoundError: naming the glob, when nothing matches.
    """
    return list(_shard_sizes(pattern))


def _shard_sizes(pattern: str) -> dict[str, int]:
    """{shard URL: size} of `list_shards(pattern)`, from one listing."""
    shards = {
        u: size
        for u, size in storage.glob_sizes(pattern).items()
        if storage.basename(u) not in (tfrecord.MANIFEST, COUNTS_CACHE)
    }
    if not shards:
        raise NotFound(
            f"no TFRecord shards match {pattern!r}; check the [data] URL glob, or "
            "run `trainer convert --out=DIR` to write shards there"
        )
    return shards


def split_info(spec, split: str) -> dict[str, Any]:
    """Shards and record counts of a split, as they are now.

    Listed again by every call (no cache in the process, so data added since
    the last call counts). Counts come from `manifest.json` next to the shards
    (written by `trainer convert`), else from a counts file cached next to the
    shards (or in ~/.cache/trainer when that folder is not writable), else by
    reading the framing of every shard once.

    Args:
      spec: the JobSpec.
      split: "train" or "validation".

    Returns:
      {"shards": [url, ...], "records": total, "counts": [per shard]}.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split: received {split!r}; expected train or validation")
    pattern = spec.data.train if split == "train" else spec.data.validation
    sizes = _shard_sizes(pattern)
    shards = list(sizes)
    counts = _record_counts(sizes, spec.data.on_corrupt)
    return {"shards": shards, "records": int(sum(counts)), "counts": counts}


def _record_counts(sizes: dict[str, int], on_corrupt: str) -> list[int]:
    """Record counts of the shards `sizes` lists ({URL: size}), in its order."""
    found: dict[str, int] = {}
    by_dir: dict[str, list[str]] = collections.defaultdict(list)
    for url in sizes:
        by_dir[storage.dirname(url)].append(url)
    for folder, urls in by_dir.items():
        known = _manifest_counts(folder)
        missing = {u: sizes[u] for u in urls if storage.basename(u) not in known}
        fresh = _counted(folder, missing, on_corrupt) if missing else {}
        for url in urls:
            name = storage.basename(url)
            found[url] = known[name] if name in known else fresh[name]
    return [int(found[u]) for u in sizes]


def _counted(folder: str, sizes: dict[str, int], on_corrupt: str) -> dict[str, int]:
    """Record counts of shards the manifest does not list: cached, else read.

    `sizes` ({URL: size}, from the listing) tells a cached count still valid.
    """
    cached, cache_url = _cached_counts(folder)
    fresh = {}
    read = False  # The cache is written again only when a shard was read.
    for url, size in sizes.items():
        name = storage.basename(url)
        hit = cached.get(name)
        if hit and hit.get("size") == size:
            fresh[name] = hit["records"]
            continue
        frames = tfrecord.iter_shard(url, verify=False, on_corrupt=on_corrupt)
        n = sum(1 for _ in frames)
        cached[name] = {"size": size, "records": n}
        fresh[name] = n
        read = read or n > 0
    if read:
        _write_counts_cache(cache_url, folder, cached)
    return fresh


def _manifest_counts(folder: str) -> dict[str, int]:
    url = storage.join(folder, tfrecord.MANIFEST)
    try:
        manifest = storage.read_json(url)
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as e:
        logging.warning("ignoring unreadable %s: %s", url, e)
        return {}
    out = {}
    for split in manifest.get("splits", {}).values():
        for entry in split.get("shards", []):
            out[entry["name"]] = int(entry["records"])
    return out


def _manifest_class_names(spec) -> tuple[str, list] | None:
    """(the manifest's URL, its class names) beside the training shards."""
    try:
        folder = storage.dirname(list_shards(spec.data.train)[0])
        url = storage.join(folder, tfrecord.MANIFEST)
        manifest = storage.read_json(url)
    except (OSError, ValueError) as e:  # NotFound and StorageError among them.
        logging.info("no class names from a manifest for %s: %s", spec.data.train, e)
        return None
    names = manifest.get("class_names") if isinstance(manifest, dict) else None
    return (url, list(names)) if names else None


def with_class_names(spec):
    """`spec` with `data.class_names` from the shards' manifest when it has none.

    `trainer convert` writes the class (folder) names into `manifest.json`
    next to the shards. Without that manifest (shards from elsewhere, or gone
    since the run), or when its class count does not fit `data.num_classes`,
    the spec stays as it is and the classes are shown by index.
    """
    if spec.data.class_names:
        return spec
    found = _manifest_class_names(spec)
    if found is None:
        return spec
    url, names = found
    expected = max(spec.data.num_classes, 2)
    if len(names) != expected:
        logging.warning(
            "%s lists %d class names; data.num_classes = %d needs %d: "
            "showing classes by index",
            url,
            len(names),
            spec.data.num_classes,
            expected,
        )
        return spec
    data = dataclasses.replace(spec.data, class_names=tuple(map(str, names)))
    return dataclasses.replace(spec, data=data)


def check_class_count(spec) -> None:
    """More classes in the shards' manifest than the head has outputs: their
    records would fail the label check mid-run (or, under on_corrupt =
    "skip", be dropped one by one). Fewer is allowed (a subset of classes)."""
    found = _manifest_class_names(spec)
    expected = max(spec.data.num_classes, 2)
    if found is None or len(found[1]) <= expected or spec.data.label_offset:
        return
    url, names = found
    shown = ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "")
    fix = f"data.num_classes = {len(names)}"
    if spec.data.num_classes == 1:
        fix += " (a softmax head), or convert only the two classes"
    raise SpecError(
        f"data.num_classes = {spec.data.num_classes}, but {url} lists "
        f"{len(names)} classes ({shown}): the records of the others would be "
        f"refused as out of range. Set {fix}"
    )


def _local_cache_url(folder: str) -> str:
    digest = hashlib.sha1(folder.encode()).hexdigest()[:16]
    root = os.path.join(os.path.expanduser("~"), ".cache", "trainer", "record-counts")
    return os.path.join(root, f"{digest}.json")


def _cached_counts(folder: str) -> tuple[dict[str, Any], str]:
    for url in (storage.join(folder, COUNTS_CACHE), _local_cache_url(folder)):
        try:
            return storage.read_json(url), url
        except (FileNotFoundError, ValueError, OSError):
            continue
    return {}, storage.join(folder, COUNTS_CACHE)


def _write_counts_cache(url: str, folder: str, counts: dict[str, Any]) -> None:
    for target in (url, _local_cache_url(folder)):
        try:
            storage.write_json(target, counts)
            return
        except Exception as e:  # Read-only buckets: fall back to a local cache.
            logging.info("cannot cache record counts at %s: %s", target, e)


def steps_per_epoch(spec) -> int:
    """Global training batches per epoch (remainder dropped), same on every worker.

    Args:
      spec: the JobSpec.

    Returns:
      The steps of one epoch of the training split as it is now.
    """
    return _steps(spec, split_info(spec, "train")["records"])


def phase_steps(spec, phase) -> int:
    """Training steps in one epoch of `phase`: the split's (`steps_per_epoch`,
    which refuses fewer records than one batch), or the phase's
    `steps_per_epoch` when that is fewer."""
    per_epoch = steps_per_epoch(spec)
    if phase.steps_per_epoch:
        per_epoch = min(per_epoch, phase.steps_per_epoch)
    return per_epoch


def _steps(spec, records: int) -> int:
    steps = records // spec.train.global_batch_size
    if steps < 1:
        raise DataError(
            f"{spec.data.train}: {records} training records, fewer than one global "
            f"batch of {spec.train.global_batch_size}; lower train.global_batch_size "
            "or add data"
        )
    return steps


# ---------------------------------------------------------------------------
# Record checks (in the consumer's thread: names shard and record on failure)


def _decodes(data: bytes) -> bool:
    """Whether Pillow decodes the image fully (skip mode only: it costs a decode).

    Dropping undecodable images here, in the reader, counts them in
    the run's CorruptTally and keeps every epoch's batch count exact; tf.data's
    `ignore_errors` behind it only catches what Pillow accepts and TF does not.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # Pillow raises many types for bad bytes.
        return False


class _BadRecord(Exception):
    """A framed record that is not a usable example: why, and a skip reason."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason, self.problem = reason, problem


class _Checker:
    """Validates a record as a tf.train.Example with the configured keys/labels."""

    def __init__(self, spec):
        d = spec.data
        self._parse = example_proto.Example.FromString
        self.image_key, self.label_key = d.image_key, d.label_key
        self.offset = d.label_offset
        self.classes = max(d.num_classes, 2)  # num_classes = 1 is binary 0/1.
        self.skip = d.on_corrupt == "skip"

    def refuse(self, url: str, index: int, bad: _BadRecord, skipped) -> None:
        """Raises DataError naming a bad record, or (skip mode) tells `skipped`."""
        msg = f"{url}: record {index} {bad.problem}"
        if bad.reason != "bad_label":
            msg += f"; {tfrecord.REMEDY}"
        if not self.skip:
            raise DataError(msg) from None
        tfrecord.skip_record(skipped, index, bad.reason, msg)

    def check(self, data: bytes) -> tuple[bytes, int]:
        """(image bytes, 0-based label) of a good record; raises _BadRecord."""
        try:
            feature = self._parse(data).features.feature
        except Exception:  # protobuf's DecodeError, or anything odd in the bytes.
            raise _BadRecord(
                "not_example", "is not a serialized tf.train.Example"
            ) from None
        # Each repeated field fetched once: every upb attribute access builds
        # a wrapper object, and this runs for every record.
        image = feature.get(self.image_key)
        images = () if image is None else image.bytes_list.value
        if not images:
            raise _BadRecord(
                "missing_key",
                f"has no bytes feature {self.image_key!r} (data.image_key)",
            )
        label = feature.get(self.label_key)
        labels = () if label is None else label.int64_list.value
        if not labels:
            raise _BadRecord(
                "missing_key",
                f"has no int64 feature {self.label_key!r} (data.label_key)",
            )
        encoded = images[0]
        if not encoded.startswith(_IMAGE_MAGIC) and encoded[8:12] != b"WEBP":
            raise _BadRecord(
                "not_image", "holds image bytes that are not JPEG, PNG, GIF or BMP"
            )
        value = labels[0] - self.offset
        if not 0 <= value < self.classes:
            raise _BadRecord(
                "bad_label",
                f"has label {labels[0]} (minus label_offset "
                f"{self.offset} = {value}) outside [0, {self.classes}); check "
                "data.num_classes and data.label_offset",
            )
        if self.skip and not _decodes(encoded):
            raise _BadRecord(
                "undecodable", "holds image bytes that do not decode (truncated?)"
            )
        return encoded, value


# ---------------------------------------------------------------------------
# Concurrent shard readers and the deterministic interleave


@dataclasses.dataclass(frozen=True)
class _Reading:
    """How the shard readers of one pass read and check their records."""

    checker: _Checker | None  # None: raw serialized records, label -1.
    on_corrupt: str
    skip: Callable[[int, int, str], None] | None = None  # (shard id, index, reason)
    block_size: int | None = None  # None: tfrecord.block_size_for(url)
    stats: tfrecord.ReadStats | None = None


def _reading(spec, skip=None) -> _Reading:
    return _Reading(_Checker(spec), spec.data.on_corrupt, skip)


class _Producer:
    """Runs `items()` in a daemon thread, at most `maxsize` items ahead of `get()`.

    An error raised by `items` is handed over and raised by `get()`, in the
    consumer's thread. Setting `stop` ends the thread.
    """

    _END = object()

    def __init__(self, items, maxsize: int, stop: threading.Event, name=None):
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._stop = stop
        threading.Thread(
            target=self._run, args=(items,), daemon=True, name=name
        ).start()

    def _put(self, item) -> bool:
        # Waits for room with a timeout: a consumer that stopped early never
        # drains the queue, and the thread must notice `stop` and end.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items) -> None:
        it = items()
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # Handed to the consumer, raised there.
            self._put(e)
        finally:
            it.close()

    def get(self):
        """The next item; None once `items` is exhausted."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is self._END else item


class _ShardFeed:
    """One shard's chunks from record `start` on, made in the consumer's thread.

    Its blocks are read ahead by a thread from construction on (`tfrecord`'s
    read-ahead: I/O only, the GIL released); framing, CRCs and record checks
    run when `get()` asks for the next chunk. Per-shard threads that also
    framed and checked fought over the GIL, most at the start of a pass (at
    32 px the first batch came ~50 ms after native tf.data's; now ~20).
    """

    def __init__(self, url: str, gid: int, start: int, reading: _Reading, stop):
        # Skips of this shard, told to the pass's recorder with our shard id.
        skipped = None if reading.skip is None else functools.partial(reading.skip, gid)
        records = tfrecord.iter_shard(
            url,
            start=start,
            on_corrupt=reading.on_corrupt,
            block_size=reading.block_size,
            skipped=skipped,
            stats=reading.stats,
            read_ahead=READ_AHEAD_BLOCKS,
            stop=stop,
        )
        self._chunks = _shard_chunks(records, url, gid, reading.checker, skipped)

    def get(self) -> data_order.Chunk | None:
        """The next chunk; None once the shard is done."""
        return next(self._chunks, None)

    def close(self) -> None:
        self._chunks.close()


def _shard_chunks(
    records: Iterator[tuple[int, bytes]], url: str, gid: int, check, skipped
) -> Iterator[data_order.Chunk]:
    """(records, [record id, label] rows) chunks of one shard's `records`.

    With a checker the records are the checked image bytes, else the raw
    serialized records with label -1.
    """
    base = data_order.record_id(gid, 0)
    datas: list[bytes] = []
    indices: list[int] = []
    labels: list[int] = []
    size = 0
    # One loop for both kinds (raw or checked): a call less per record.
    fast = check.check if check is not None else lambda data: (data, -1)
    try:
        for index, data in records:
            try:
                data, label = fast(data)
            except _BadRecord as bad:
                check.refuse(url, index, bad, skipped)
                continue
            datas.append(data)
            indices.append(index)
            labels.append(label)
            size += len(data)
            if len(datas) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
                yield datas, _meta(base, indices, labels)
                datas, indices, labels, size = [], [], [], 0
        if datas:
            yield datas, _meta(base, indices, labels)
    finally:
        records.close()  # Ends its read-ahead when this stops early.


def _meta(base: int, indices: list[int], labels: list[int]) -> np.ndarray:
    """[n, 2] int64 rows of (record id, label)."""
    meta = np.empty((len(indices), 2), np.int64)
    meta[:, 0] = indices
    meta[:, 0] += base
    meta[:, 1] = labels
    return meta


class _Cursor:
    """A shard reader's current chunk and the next record in it."""

    def __init__(self, feed: _ShardFeed, lead: bool):
        self.feed = feed
        self.lead = lead  # Still owes its record of a partial round.
        self.datas: list[bytes] = []
        self.meta = np.zeros((0, 2), np.int64)
        self.pos = 0

    def left(self) -> int:
        return len(self.datas) - self.pos

    def refill(self) -> bool:
        """The shard's next chunk; False when the shard is done."""
        item = self.feed.get()
        if item is None:
            return False
        self.datas, self.meta = item
        self.pos = 0
        return True


def _round_robin(cursors: list[_Cursor]) -> Iterator[data_order.Chunk]:
    """One group's shards interleaved record by record, until all run out."""
    active = [c for c in cursors if c.refill()]
    # The partial round of a mid-group start: shards that have not yet given
    # their record of the current round go first, one each.
    lead = [c for c in active if c.lead]
    if lead and len(lead) < len(active):
        yield (
            [c.datas[0] for c in lead],
            np.asarray([c.meta[0] for c in lead], np.int64),
        )
        for c in lead:
            c.pos = 1
        active = [c for c in active if c.left() or c.refill()]
    while active:
        m = min(c.left() for c in active)
        k = len(active)
        out_d: list = [None] * (m * k)
        out_i = np.empty((m * k, 2), np.int64)
        for j, c in enumerate(active):
            out_d[j::k] = c.datas[c.pos : c.pos + m]
            out_i[j::k] = c.meta[c.pos : c.pos + m]
            c.pos += m
        yield out_d, out_i
        active = [c for c in active if c.left() or c.refill()]


def _stream(
    shards: list[str],
    counts: list[int],
    gids: list[int],
    start: int,
    *,
    reading: _Reading,
    parallelism: int,
    stop: threading.Event,
) -> Iterator[data_order.Chunk]:
    """Chunks (records, meta) of the interleaved stream of `shards` from `start`.

    `meta` is an int64 [n, 2] array of (record id, label). Shards go in groups
    of INTERLEAVE_CYCLE, interleaved record by record (`data_order`); whole
    groups before `start` are skipped without being opened. Up to
    `parallelism` shards read blocks ahead of the consumer; setting `stop`
    ends their reads.
    """
    plan = data_order.interleave_plan(counts, start)
    skip_at = {
        i: n
        for group, consumed, _ in plan
        for i, n in zip(group, consumed, strict=True)
    }
    feeds: dict[int, _ShardFeed] = {}
    opened = 0  # Shards before this one have been started (or never will be).
    cursors: list[_Cursor] = []  # The current group's.

    def launch(first: int, upto: int) -> None:
        nonlocal opened
        for i in range(max(opened, first), min(upto, len(shards))):
            if skip_at.get(i, 0) < counts[i]:  # Else empty, or all before `start`.
                args = (shards[i], gids[i], skip_at.get(i, 0), reading, stop)
                feeds[i] = _ShardFeed(*args)
        opened = max(opened, first, min(upto, len(shards)))

    try:
        for group, _, partial in plan:
            launch(group[0], max(group[-1] + 1, group[0] + parallelism))
            cursors = [
                _Cursor(feeds.pop(i), lead)
                for i, lead in zip(group, partial, strict=True)
                if i in feeds
            ]
            yield from _round_robin(cursors)
            launch(group[-1] + 1, group[-1] + 1 + parallelism)
    finally:  # Stopped early, or done: no read-ahead outlives the stream.
        stop.set()
        for feed in [*feeds.values(), *(c.feed for c in cursors)]:
            feed.close()


# ---------------------------------------------------------------------------
# Worker plans and the epoch's record order


def _parallelism(spec) -> int:
    n = spec.data.read_parallelism or min(16, 2 * (os.cpu_count() or 1))
    return max(n, data_order.INTERLEAVE_CYCLE)


def _workers(input_context) -> tuple[int, int, int]:
    """(workers, this worker, replicas on this worker)."""
    if input_context is None:
        return 1, 0, 1
    w = max(1, input_context.num_input_pipelines)
    local = max(1, input_context.num_replicas_in_sync // w)
    return w, input_context.input_pipeline_id, local


def _worker_share(info, order, workers: int, worker: int, what=None):
    """`data_order.worker_shards` of a split, warning (about `what`) when a
    worker has to stride over records."""
    if workers > 1 and len(order) < workers and what:
        logging.warning(
            "%s: %d shards for %d workers; every worker reads all shards and keeps "
            "every %d-th record (write more shards than workers to avoid this)",
            what,
            len(order),
            workers,
            workers,
        )
    return data_order.worker_shards(
        info["shards"], info["counts"], order, workers, worker
    )


class _WorkerEpoch:
    """One epoch's training stream, the same on every worker, read window by
    window; this worker keeps its slice of every global batch (`data_order`)."""

    def __init__(self, spec, info, epoch: int, input_context, tally=None):
        workers, self.worker, _ = _workers(input_context)
        self.seed, self.epoch, self.what = spec.train.seed, epoch, spec.data.train
        order = data_order.shard_order(self.seed, epoch, len(info["shards"]))
        self.share = data_order.worker_shards(
            info["shards"], info["counts"], order, 1, 0
        )
        self.length = self.share.records  # Records in the epoch's stream.
        self.slice = data_order.worker_slice(
            spec.train.global_batch_size, workers, self.worker
        )
        self.window = spec.data.shuffle_buffer or 4 * CHUNK_RECORDS
        self.shuffle = spec.data.shuffle_buffer > 0
        skip = None if tally is None else tally.recorder("train", epoch)
        self.reading = _reading(spec, skip)
        self.parallelism = _parallelism(spec)

    def _none_readable(self) -> str:
        """The stream gave no record of the `length` the shards' counts promise."""
        remedy = "re-create the shards with `trainer convert`"
        if self.reading.on_corrupt != "skip":
            remedy = tfrecord.REMEDY
        return (
            f"{self.what}: no readable training records, though the shards' counts "
            f"(manifest.json, or the counts cache) promise {self.length}: a shard "
            f"emptied or replaced since it was counted, or every record corrupt; "
            f"{remedy}"
        )

    def chunks(self, start: int, outer: threading.Event):
        """(images, labels, record ids) chunks of this worker's slice, from
        record `start` of the stream on, until `outer` is set."""
        # A stream short of records (corrupt ones skipped) wraps around, so
        # every worker gives the same batch count. `at` counts the positions
        # given, across wraps: the global batches stay aligned on all workers.
        p, at = start % self.length, start
        stream = None  # The stream, from the window being read on.
        stop = threading.Event()
        try:
            while not outer.is_set():
                w0 = p // self.window
                ws = w0 * self.window  # The window: records ws..we-1.
                we = min(ws + self.window, self.length)
                if stream is None:
                    stop = threading.Event()
                    stream = self._stream_from(ws, stop)
                datas, ids = stream.take(we - ws)
                n = len(datas)
                if n == 0:
                    raise DataError(self._none_readable())
                order = data_order.window_order(
                    self.seed, self.epoch, w0, n, self.shuffle
                )[p - ws :]
                mine = self.slice.keeps(np.arange(at, at + len(order)))
                yield from _in_chunks(datas, ids, order[mine])
                p, at = we, at + len(order)
                if p >= self.length or n < we - ws:  # End of stream: wrap around.
                    p = 0
                    stop.set()
                    stream = None
        finally:
            stop.set()

    def _stream_from(self, ws: int, stop: threading.Event) -> data_order.Rechunker:
        """The stream from its record `ws` on."""
        share = self.share
        raw = _stream(
            share.shards,
            share.counts,
            share.shard_ids,
            ws,
            reading=self.reading,
            parallelism=self.parallelism,
            stop=stop,
        )
        return data_order.Rechunker(raw)


def _in_chunks(datas: list[bytes], ids: np.ndarray, order: np.ndarray):
    """Records `order` of a window as (images, labels, record ids) chunks."""
    for i in range(0, len(order), CHUNK_RECORDS):
        sel = order[i : i + CHUNK_RECORDS]
        images = np.asarray([datas[j] for j in sel], dtype=object)
        yield images, ids[sel, 1].astype(np.int32), ids[sel, 0]


def _train_records(spec, info, epoch: int, start: int, input_context, tally=None):
    """Generator factory: (images, labels, ids) chunks of a worker's slice of
    the epoch from record `start` of the stream (all workers' records counted),
    `info` being the training split's `split_info`."""
    epoch_records = _WorkerEpoch(spec, info, epoch, input_context, tally)
    # In a thread, with room for one window of chunks: the next window is read
    # while tf.data drains this one, so decoding never waits for a window to
    # fill. Memory: about 2 x shuffle_buffer records.
    ahead = -(-epoch_records.window // CHUNK_RECORDS) + 1
    chunks = functools.partial(epoch_records.chunks, start)
    return lambda: _background(chunks, ahead)


def _background(make_iter, maxsize: int):
    """Runs `make_iter(stop)` in a thread, yielding its items through a queue."""
    stop = threading.Event()
    producer = _Producer(lambda: make_iter(stop), maxsize, stop, name="trainer-input")
    try:
        while (item := producer.get()) is not None:
            yield item
    finally:
        stop.set()


def _eval_records(share: data_order.WorkerShards, reading: _Reading, parallelism):
    """(images, labels, ids) chunks of a worker's share of the validation split."""
    stop = threading.Event()
    raw = _stream(
        share.shards,
        share.counts,
        share.shard_ids,
        share.offset,
        reading=reading,
        parallelism=parallelism,
        stop=stop,
    )
    try:
        for datas, meta in data_order.strided(raw, 0, share.stride):
            images = np.asarray(datas, dtype=object)
            yield images, meta[:, 1].astype(np.int32), meta[:, 0]
    finally:
        stop.set()


def _per_replica(input_context, global_batch: int) -> int:
    if input_context is None:
        return global_batch
    return input_context.get_per_replica_batch_size(global_batch)


def _train_stream(spec, epoch: int, start_step: int, input_context, tally):
    """(generator factory of the epoch's record chunks from `start_step` on,
    per-replica batch, batches this worker yields)."""
    info = split_info(spec, "train")
    steps = _steps(spec, info["records"])
    if not 0 <= start_step <= steps:
        raise ValueError(
            f"start_step: received {start_step}; expected 0..{steps} (steps per epoch)"
        )
    _, _, local = _workers(input_context)
    batch = _per_replica(input_context, spec.train.global_batch_size)
    start = start_step * spec.train.global_batch_size  # Records all workers gave.
    gen = _train_records(spec, info, epoch, start, input_context, tally)
    return gen, batch, (steps - start_step) * local


def _eval_stream(spec, input_context, tally, pass_key: int):
    """(generator factory of this worker's validation chunks, per-replica
    batch, batches every worker yields)."""
    info = split_info(spec, "validation")
    workers, worker, local = _workers(input_context)
    global_batch = spec.train.eval_batch_size or spec.train.global_batch_size
    batch = _per_replica(input_context, global_batch)
    order = np.arange(len(info["shards"]))
    # Every worker yields as many batches as the worker with the most records.
    lengths = [_worker_share(info, order, workers, w).records for w in range(workers)]
    steps = max(1, max(math.ceil(n / (batch * local)) for n in lengths))
    share = _worker_share(info, order, workers, worker, spec.data.validation)
    skip = None if tally is None else tally.recorder("validation", pass_key)
    gen = functools.partial(
        _eval_records, share, _reading(spec, skip), _parallelism(spec)
    )
    return gen, batch, steps * local

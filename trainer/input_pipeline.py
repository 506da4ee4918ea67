"""Shard listing, TFRecord streaming through fsspec, decode/augment, exact resume.

The training stream of one epoch is a pure function of (seed, epoch):

1. the shard list is permuted with `np.random.default_rng((seed, epoch))`;
2. each worker takes every W-th shard of that order (record-level striding,
   with a warning, when there are fewer shards than workers);
3. its shards are read INTERLEAVE_CYCLE at a time, record by record round robin
   (a shard leaves the round when it runs out), which mixes shards and keeps
   several reads in flight;
4. that stream is cut into windows of `data.shuffle_buffer` records and each
   window is permuted with `default_rng((seed, epoch, worker, window))`.

Every step of this is computable from record counts alone, so a run resumed at
(epoch, step) skips whole shards without reading them, reads only the window it
starts in, and yields exactly the batches the uninterrupted epoch yields from
that step on. The interleave cycle is a constant, not the reader parallelism,
so the order does not depend on the machine's core count.

Reading is plain Python over fsspec (so any protocol works: gs, s3, file,
memory, http): one thread per shard reads `BLOCK_SIZE` blocks with a bounded
queue ahead of the consumer (memory does not grow with shard size), parses the
TFRecord framing, checks both masked CRC32Cs with `google-crc32c` and parses
each tf.train.Example (upb, ~2 us), so that a bad record is named by shard URL,
byte offset or record index. Image bytes, labels and record ids cross into
tf.data as 1-D tensors of up to CHUNK_RECORDS records (one Python call per
chunk, not per record); decoding, resizing and augmentation run in tf.data with
AUTOTUNE parallelism (deterministic) and prefetch. Augmentation is stateless,
seeded by (seed, epoch, record id), so a resumed run sees the same images.

Errors raised in the reader reach the consumer as tf.errors.OpError; the train
loop recovers the DataError with `data_error_from(e)` / `reraise_data_error(e)`.
"""

from __future__ import annotations

import collections
import errno
import functools
import hashlib
import io
import logging
import math
import os
import queue
import re
import struct
import threading
import time
from typing import Any, Iterator

import google_crc32c
import numpy as np

from trainer import backend, storage
from trainer.errors import DataError, NotFound, PermissionDenied, StorageError

tf = backend.import_tensorflow()

MANIFEST = "manifest.json"
COUNTS_CACHE = ".trainer-record-counts.json"
BLOCK_SIZE = 4 * 1024 * 1024  # Bytes per read from a shard.
QUEUE_CHUNKS = 2  # Chunks a shard reader may hold ahead of the consumer.
CHUNK_RECORDS = 256  # Records per string tensor handed to tf.data.
CHUNK_BYTES = 4 * 1024 * 1024
INTERLEAVE_CYCLE = 4  # Shards interleaved record by record; fixes the order.
RETRIES = 5  # Attempts after a transient object-store error.
_ID_SHIFT = 32  # record id = shard index << 32 | record index in shard

_REMEDY = (
    're-create the shard with `trainer convert`, or set data.on_corrupt = "skip" '
    "to drop corrupt records (they are counted and reported in summary.json)"
)
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")
_HEADER = struct.Struct("<QI")
_U32 = struct.Struct("<I")


# ---------------------------------------------------------------------------
# Corrupt-record accounting (on_corrupt = "skip") and error reporting

_stats = {"max_buffer_bytes": 0}


def reader_stats() -> dict[str, int]:
    """High-water mark of one reader's block buffer (bytes), for memory checks."""
    return dict(_stats)


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
                self._seen[(split, pass_key, gid << _ID_SHIFT | index)] = reason

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


def _skip(skipped, index: int, reason: str, message: str) -> None:
    """Logs a skipped record and reports it to the run's tally (if any)."""
    if skipped is not None:
        skipped(index, reason)
    logging.warning("skipping corrupt data (data.on_corrupt = skip): %s", message)


def _fail(message: str) -> DataError:
    return DataError(message)


def data_error_from(e: BaseException) -> DataError | StorageError | None:
    """The DataError behind a tf.data error (raised inside the reader), if any.

    Errors raised in a `from_generator` reach the consumer as
    `tf.errors.InvalidArgumentError` (or `UnknownError`) whose message holds the
    Python exception; decode failures in tf.data come as InvalidArgumentError.
    """
    if isinstance(e, (DataError, StorageError)):
        return e
    message = getattr(e, "message", None) or str(e)
    match = re.search(
        r"(DataError|NotFound|PermissionDenied): (.*?)(?:\nTraceback|\n\n|$)",
        message,
        re.S,
    )
    if match:
        kind = {"NotFound": NotFound, "PermissionDenied": PermissionDenied}
        return kind.get(match.group(1), DataError)(match.group(2).strip())
    if isinstance(e, tf.errors.InvalidArgumentError) and re.search(
        r"decode|image|Unknown image file format", message, re.I
    ):
        first = message.strip().splitlines()[0] if message.strip() else message
        first = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", first)
        return DataError(
            f"a record's image bytes could not be decoded ({first}); {_REMEDY}"
        )
    return None


def reraise_data_error(e: BaseException) -> None:
    """Raises the DataError behind `e` (see `data_error_from`), else `e` itself.

    Use in the train loop:  `except tf.errors.OpError as e: reraise_data_error(e)`.
    """
    err = data_error_from(e)
    if err is not None:
        raise err from None
    raise e


# ---------------------------------------------------------------------------
# Listing and record counts


def list_shards(pattern: str) -> list[str]:
    """Sorted shard URLs matching the glob `pattern` (manifest.json excluded).

    Raises:
      FileNotFoundError: naming the glob, when nothing matches.
    """
    shards = [
        u
        for u in storage.glob(pattern)
        if storage.basename(u) not in (MANIFEST, COUNTS_CACHE)
    ]
    if not shards:
        raise NotFound(
            f"no TFRecord shards match {pattern!r}; check the [data] URL glob, or "
            "run `trainer convert --out=DIR` to write shards there"
        )
    return shards


_info_cache: dict[tuple[str, str], dict[str, Any]] = {}


def split_info(spec, split: str) -> dict[str, Any]:
    """Shards and record counts of a split, computed once per process.

    Counts come from `manifest.json` next to the shards (written by
    `trainer convert`), else from a counts file cached next to the shards (or
    in ~/.cache/trainer when that folder is not writable), else by reading the
    framing of every shard once.

    Args:
      spec: the JobSpec.
      split: "train" or "validation".

    Returns:
      {"shards": [url, ...], "records": total, "counts": [per shard]}.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split: received {split!r}; expected train or validation")
    pattern = spec.data.train if split == "train" else spec.data.validation
    key = (pattern, spec.data.on_corrupt)
    if key not in _info_cache:
        shards = list_shards(pattern)
        counts = _record_counts(shards, spec.data.on_corrupt)
        _info_cache[key] = {
            "shards": shards,
            "records": int(sum(counts)),
            "counts": counts,
        }
    info = _info_cache[key]
    return {**info, "shards": list(info["shards"]), "counts": list(info["counts"])}


def _record_counts(shards: list[str], on_corrupt: str) -> list[int]:
    found: dict[str, int] = {}
    by_dir: dict[str, list[str]] = collections.defaultdict(list)
    for url in shards:
        by_dir[storage.dirname(url)].append(url)
    for folder, urls in by_dir.items():
        known = _manifest_counts(folder)
        cached, cache_url = _cached_counts(folder)
        missing = [u for u in urls if storage.basename(u) not in known]
        fresh = {}
        for url in missing:
            name = storage.basename(url)
            size = storage.size(url)
            hit = cached.get(name)
            if hit and hit.get("size") == size:
                fresh[name] = hit["records"]
                continue
            n = sum(1 for _ in _iter_shard(url, verify=False, on_corrupt=on_corrupt))
            cached[name] = {"size": size, "records": n}
            fresh[name] = n
        if fresh and any(cached.get(n, {}).get("records") for n in fresh):
            _write_counts_cache(cache_url, folder, cached)
        for url in urls:
            name = storage.basename(url)
            found[url] = known[name] if name in known else fresh[name]
    return [int(found[u]) for u in shards]


def _manifest_counts(folder: str) -> dict[str, int]:
    url = storage.join(folder, MANIFEST)
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
    """Global training batches per epoch (remainder dropped), same on every worker."""
    records = split_info(spec, "train")["records"]
    steps = records // spec.train.global_batch_size
    if steps < 1:
        raise DataError(
            f"{spec.data.train}: {records} training records, fewer than one global "
            f"batch of {spec.train.global_batch_size}; lower train.global_batch_size "
            "or add data"
        )
    return steps


# ---------------------------------------------------------------------------
# Reading one shard: blocks through fsspec, TFRecord framing, CRC32C


def masked_crc32c(data) -> int:
    """TFRecord's masked CRC32C: rotate right by 15 and add a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.EPIPE):
        return True
    code = getattr(e, "code", None) or getattr(e, "status", None)
    if isinstance(code, int) and (code >= 500 or code == 429):
        return True
    return type(e).__name__ in (
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ServerTimeoutError",
        "TransportError",
    )


class _BlockFile:
    """Sequential block reads of one URL, reopened and retried on transient errors."""

    def __init__(self, url: str, offset: int = 0, block_size: int = BLOCK_SIZE):
        self.url, self.offset, self.block_size = url, offset, block_size
        self._f = None

    def _open(self):
        fs, path = storage.filesystem(self.url)
        # No fsspec cache layer: we already read big sequential blocks.
        try:
            f = fs.open(path, "rb", block_size=self.block_size, cache_type="none")
        except TypeError:  # Filesystems whose open() takes no cache_type.
            f = fs.open(path, "rb")
        if self.offset:
            f.seek(self.offset)
        return f

    def read(self) -> bytes:
        delay = 0.5
        for attempt in range(RETRIES + 1):
            try:
                if self._f is None:
                    self._f = self._open()
                data = self._f.read(self.block_size)
                self.offset += len(data)
                return data
            except FileNotFoundError:
                raise _fail(
                    f"{self.url}: shard not found at byte offset {self.offset} (it "
                    "was deleted or moved after the shards were listed); restore it, "
                    "or fix the [data] glob and start the run again"
                ) from None
            except Exception as e:
                if not _is_transient(e) or attempt == RETRIES:
                    if _is_transient(e):
                        raise _fail(
                            f"{self.url}: read failed at byte offset {self.offset} "
                            f"after {RETRIES} retries ({type(e).__name__}: {e}); "
                            "check the object store and run the same command again"
                        ) from None
                    raise
                logging.warning(
                    "transient error reading %s at byte %d (%s); retry %d in %.1fs",
                    self.url,
                    self.offset,
                    e,
                    attempt + 1,
                    delay,
                )
                self.close()
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def close(self):
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # Closing a broken connection may fail too.
                pass
            self._f = None


def _iter_shard(
    url: str,
    *,
    start: int = 0,
    verify: bool = True,
    on_corrupt: str = "error",
    block_size: int = BLOCK_SIZE,
    skipped=None,
) -> Iterator[tuple[int, bytes]]:
    """Yields (record index, record bytes) of one shard from record `start` on.

    Reads `block_size` blocks; the buffer holds at most one block plus one
    record, whatever the shard size. Records before `start` are framed but
    their CRCs are not computed. In skip mode, `skipped(index, reason)` hears
    of each record dropped.
    """
    f = _BlockFile(url, 0, block_size)
    buf = b""
    pos = 0  # Position of the next record in buf.
    base = 0  # Byte offset of buf[0] in the shard.
    index = 0
    eof = False
    skip_mode = on_corrupt == "skip"
    hwm = _stats["max_buffer_bytes"]

    def fill(need: int) -> bool:
        """Makes `need` bytes available from `pos`; False at end of file."""
        nonlocal buf, pos, base, eof, hwm
        parts = [buf[pos:]]
        have = len(parts[0])
        base += pos
        pos = 0
        while have < need and not eof:
            block = f.read()
            if not block:
                eof = True
                break
            parts.append(block)
            have += len(block)
        buf = b"".join(parts) if len(parts) > 1 else parts[0]
        if len(buf) > hwm:
            hwm = len(buf)
            if hwm > _stats["max_buffer_bytes"]:
                _stats["max_buffer_bytes"] = hwm
        return have >= need

    try:
        while True:
            if len(buf) - pos < 12 and not fill(12):
                if len(buf) - pos:
                    msg = (
                        f"{url}: truncated shard: {len(buf) - pos} stray bytes at "
                        f"byte offset {base + pos} (record {index}); {_REMEDY}"
                    )
                    if skip_mode:
                        _skip(skipped, index, "truncated", msg)
                        return
                    raise _fail(msg)
                return
            length, length_crc = _HEADER.unpack_from(buf, pos)
            offset = base + pos
            if verify or index >= start:
                if masked_crc32c(buf[pos : pos + 8]) != length_crc:
                    msg = (
                        f"{url}: corrupt record length (CRC mismatch) at byte offset "
                        f"{offset} (record {index}); the rest of the shard cannot be "
                        f"framed; {_REMEDY}"
                    )
                    if skip_mode:
                        msg += " (rest of shard skipped)"
                        _skip(skipped, index, "crc_mismatch", msg)
                        return
                    raise _fail(msg)
            end = pos + 16 + length
            if len(buf) < end and not fill(16 + length):
                msg = (
                    f"{url}: truncated shard: record {index} at byte offset {offset} "
                    f"needs {16 + length} bytes, {len(buf) - pos} remain; {_REMEDY}"
                )
                if skip_mode:
                    _skip(skipped, index, "truncated", msg)
                    return
                raise _fail(msg)
            if index >= start:
                end = pos + 16 + length
                data = buf[pos + 12 : end - 4]
                if verify and masked_crc32c(data) != _U32.unpack_from(buf, end - 4)[0]:
                    msg = (
                        f"{url}: CRC mismatch in record {index} at byte offset "
                        f"{offset}; {_REMEDY}"
                    )
                    if not skip_mode:
                        raise _fail(msg)
                    _skip(skipped, index, "crc_mismatch", msg)
                else:
                    yield index, data
            pos += 16 + length
            index += 1
    finally:
        f.close()


def read_records(url: str, *, start: int = 0, verify: bool = True) -> Iterator[bytes]:
    """The serialized records of one shard, CRC-checked (for tests and tools)."""
    for _, data in _iter_shard(url, start=start, verify=verify):
        yield data


# ---------------------------------------------------------------------------
# Record checks (in the reader threads: names shard and record on failure)


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


class _Checker:
    """Validates a record as a tf.train.Example with the configured keys/labels."""

    def __init__(self, spec):
        from tensorflow.core.example import example_pb2

        d = spec.data
        self._parse = example_pb2.Example.FromString
        self.image_key, self.label_key = d.image_key, d.label_key
        self.offset = d.label_offset
        self.classes = max(d.num_classes, 2)  # num_classes = 1 is binary 0/1.
        self.skip = d.on_corrupt == "skip"

    def __call__(
        self, url: str, index: int, data: bytes, skipped=None
    ) -> tuple[bytes, int] | None:
        """(image bytes, 0-based label) of a good record; None for a skipped one."""
        problem = reason = None
        try:
            feature = self._parse(data).features.feature
        except Exception:  # protobuf's DecodeError, or anything odd in the bytes.
            problem, reason = "is not a serialized tf.train.Example", "not_example"
        else:
            image = feature.get(self.image_key)
            label = feature.get(self.label_key)
            if image is None or not image.bytes_list.value:
                problem = f"has no bytes feature {self.image_key!r} (data.image_key)"
                reason = "missing_key"
            elif label is None or not label.int64_list.value:
                problem = f"has no int64 feature {self.label_key!r} (data.label_key)"
                reason = "missing_key"
            elif not image.bytes_list.value[0].startswith(_IMAGE_MAGIC) and not (
                image.bytes_list.value[0][8:12] == b"WEBP"
            ):
                problem = "holds image bytes that are not JPEG, PNG, GIF or BMP"
                reason = "not_image"
            else:
                value = label.int64_list.value[0] - self.offset
                if not 0 <= value < self.classes:
                    problem = (
                        f"has label {label.int64_list.value[0]} (minus label_offset "
                        f"{self.offset} = {value}) outside [0, {self.classes}); check "
                        "data.num_classes and data.label_offset"
                    )
                    reason = "bad_label"
                elif self.skip and not _decodes(image.bytes_list.value[0]):
                    problem = "holds image bytes that do not decode (truncated?)"
                    reason = "undecodable"
                else:
                    return image.bytes_list.value[0], value
        msg = f"{url}: record {index} {problem}"
        if reason != "bad_label":
            msg += f"; {_REMEDY}"
        if self.skip:
            _skip(skipped, index, reason, msg)
            return None
        raise _fail(msg)


# ---------------------------------------------------------------------------
# Concurrent shard readers and the deterministic interleave


class _Feed:
    """A thread reading one shard into a bounded queue of record chunks."""

    _END = object()

    def __init__(self, url, gid, start, checker, on_corrupt, stop, block_size, skip):
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self.args = (url, gid, start, checker, on_corrupt, block_size)
        # Skips of this shard, told to the pass's recorder with our shard id.
        self.skipped = None if skip is None else functools.partial(skip, gid)
        self.stop = stop
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        url, gid, start, checker, on_corrupt, block_size = self.args
        base = gid << _ID_SHIFT
        datas: list[bytes] = []
        meta: list[tuple[int, int]] = []  # (record id, label)
        size = 0
        try:
            for index, data in _iter_shard(
                url,
                start=start,
                on_corrupt=on_corrupt,
                block_size=block_size,
                skipped=self.skipped,
            ):
                label = -1
                if checker is not None:
                    checked = checker(url, index, data, self.skipped)
                    if checked is None:
                        continue
                    data, label = checked
                datas.append(data)
                meta.append((base + index, label))
                size += len(data)
                if len(datas) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
                    if not self._put((datas, np.asarray(meta, np.int64))):
                        return
                    datas, meta, size = [], [], 0
            if datas and not self._put((datas, np.asarray(meta, np.int64))):
                return
            self._put(self._END)
        except BaseException as e:  # Handed to the consumer, raised there.
            self._put(e)

    def get(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is self._END else item


def _group_start(counts: list[int], offset: int) -> tuple[list[int], list[bool]]:
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


def _stream(
    shards: list[str],
    counts: list[int],
    gids: list[int],
    start: int,
    *,
    checker,
    on_corrupt: str,
    parallelism: int,
    stop: threading.Event,
    block_size: int = BLOCK_SIZE,
    skip=None,
) -> Iterator[tuple[list[bytes], np.ndarray]]:
    """Chunks (records, meta) of the interleaved stream of `shards` from `start`.

    `meta` is an int64 [n, 2] array of (record id, label); with a `checker`
    the records are the image bytes and the labels checked, else the raw
    serialized records and -1.

    Shards go in groups of INTERLEAVE_CYCLE, interleaved record by record;
    whole groups before `start` are skipped without being opened. Up to
    `parallelism` shard readers run ahead of the consumer. `skip(shard id,
    record index, reason)` hears of each record skipped as corrupt.
    """
    groups = [
        list(range(i, min(i + INTERLEAVE_CYCLE, len(shards))))
        for i in range(0, len(shards), INTERLEAVE_CYCLE)
    ]
    feeds: dict[int, _Feed] = {}
    skip_at: dict[int, int] = {}  # Shard -> first record wanted (start group).
    bufs: dict[int, tuple[list[bytes], list[int]]] = {}
    pos: dict[int, int] = {}
    next_feed = 0

    def launch(upto: int) -> None:
        nonlocal next_feed
        while next_feed < min(upto, len(shards)):
            i = next_feed
            next_feed += 1
            skip_to = skip_at.get(i, 0)
            if skip_to >= counts[i]:
                continue  # Wholly before `start`: never opened.
            feeds[i] = _Feed(
                shards[i], gids[i], skip_to, checker, on_corrupt, stop, block_size, skip
            )

    def refill(i: int) -> bool:
        item = feeds[i].get()
        if item is None:
            return False
        bufs[i] = item
        pos[i] = 0
        return True

    first = True
    try:
        for group in groups:
            total = sum(counts[i] for i in group)
            if start >= total:
                start -= total
                continue
            partial = [False] * len(group)
            if first:
                consumed, partial = _group_start([counts[i] for i in group], start)
                skip_at.update(zip(group, consumed, strict=True))
                first = False
                start = 0  # Later groups are read from their beginning.
            next_feed = max(next_feed, group[0])
            launch(max(group[-1] + 1, group[0] + parallelism))
            active = [i for i in group if skip_at.get(i, 0) < counts[i]]
            bufs.clear()
            pos.clear()
            for i in list(active):
                if not refill(i):
                    active.remove(i)
            # The partial round from a mid-group start: shards that have not yet
            # given their record of the current round go first, one each.
            lead = [i for k, i in enumerate(group) if partial[k] and i in active]
            if lead and len(lead) < len(active):
                out_d, out_i = [], []
                for i in lead:
                    out_d.append(bufs[i][0][0])
                    out_i.append(bufs[i][1][0])
                    pos[i] = 1
                yield out_d, np.asarray(out_i, np.int64).reshape(-1, 2)
                for i in lead:
                    if pos[i] >= len(bufs[i][0]) and not refill(i):
                        active.remove(i)
            while active:
                m = min(len(bufs[i][0]) - pos[i] for i in active)
                k = len(active)
                out_d = [None] * (m * k)
                out_i = np.empty((m * k, 2), np.int64)
                for j, i in enumerate(active):
                    d, ids = bufs[i]
                    out_d[j::k] = d[pos[i] : pos[i] + m]
                    out_i[j::k] = ids[pos[i] : pos[i] + m]
                    pos[i] += m
                yield out_d, out_i
                for i in list(active):
                    if pos[i] >= len(bufs[i][0]) and not refill(i):
                        active.remove(i)
            for i in group:
                feeds.pop(i, None)
            launch(group[-1] + 1 + parallelism)
    finally:
        stop.set()


# ---------------------------------------------------------------------------
# Worker plans and the epoch's record order


def _parallelism(spec) -> int:
    n = spec.data.read_parallelism or min(16, 2 * (os.cpu_count() or 1))
    return max(n, INTERLEAVE_CYCLE)


def _workers(input_context) -> tuple[int, int, int]:
    """(workers, this worker, replicas on this worker)."""
    if input_context is None:
        return 1, 0, 1
    w = max(1, input_context.num_input_pipelines)
    local = max(1, input_context.num_replicas_in_sync // w)
    return w, input_context.input_pipeline_id, local


def _worker_shards(info, order: np.ndarray, workers: int, worker: int, what=None):
    """(shard urls, counts, ids, stride, offset) of one worker's share."""
    if workers > 1 and len(order) < workers and what:
        logging.warning(
            "%s: %d shards for %d workers; every worker reads all shards and keeps "
            "every %d-th record (write more shards than workers to avoid this)",
            what,
            len(order),
            workers,
            workers,
        )
    if workers > 1 and len(order) < workers:
        mine, stride, off = order, workers, worker
    else:
        mine, stride, off = order[worker::workers], 1, 0
    shards = [info["shards"][i] for i in mine]
    counts = [info["counts"][i] for i in mine]
    return shards, counts, [int(i) for i in mine], stride, off


def _strided(chunks, first: int, stride: int):
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


def _rechunk(chunks, n: int) -> tuple[list[bytes], np.ndarray]:
    """Takes up to `n` records from a chunk iterator (keeping the leftover)."""
    out_d: list[bytes] = []
    out_i: list[np.ndarray] = []
    have = 0
    while have < n:
        if chunks.pending is not None:
            datas, ids = chunks.pending
            chunks.pending = None
        else:
            try:
                datas, ids = next(chunks.it)
            except StopIteration:
                break
        take = n - have
        if len(datas) > take:
            chunks.pending = (datas[take:], ids[take:])
            datas, ids = datas[:take], ids[:take]
        out_d.extend(datas)
        out_i.append(ids)
        have += len(datas)
    ids = np.concatenate(out_i) if out_i else np.zeros((0, 2), np.int64)
    return out_d, ids


class _Chunks:
    def __init__(self, it):
        self.it, self.pending = it, None


def _train_records(spec, epoch: int, start: int, input_context, tally=None):
    """Generator factory: (records, ids) chunks of a worker's epoch from `start`."""
    info = split_info(spec, "train")
    workers, worker, _ = _workers(input_context)
    seed = spec.train.seed
    order = np.random.default_rng((seed, epoch)).permutation(len(info["shards"]))
    shards, counts, gids, stride, off = _worker_shards(
        info, order, workers, worker, spec.data.train
    )
    total = sum(counts)
    length = len(range(off, total, stride))  # Records in this worker's stream.
    if length == 0:
        raise DataError(
            f"{spec.data.train}: worker {worker} of {workers} gets no training "
            "records; write more records or shards"
        )
    window = spec.data.shuffle_buffer or 4 * CHUNK_RECORDS
    shuffle = spec.data.shuffle_buffer > 0
    checker = _Checker(spec)
    on_corrupt = spec.data.on_corrupt
    parallelism = _parallelism(spec)
    skip = None if tally is None else tally.recorder("train", epoch)

    def chunks_of_epoch(outer: threading.Event):
        # A worker whose shards hold fewer records than the epoch needs from it
        # wraps around its own stream, so all workers give the same batch count.
        p = start % length
        chunks = None
        stop = threading.Event()
        try:
            while not outer.is_set():
                w0 = p // window
                ws, we = w0 * window, min(w0 * window + window, length)
                if chunks is None:
                    stop = threading.Event()
                    raw = _stream(
                        shards,
                        counts,
                        gids,
                        ws * stride + off,
                        checker=checker,
                        on_corrupt=on_corrupt,
                        parallelism=parallelism,
                        stop=stop,
                        skip=skip,
                    )
                    chunks = _Chunks(_strided(raw, 0, stride))
                datas, ids = _rechunk(chunks, we - ws)
                n = len(datas)
                if n == 0:
                    raise _fail(
                        f"{spec.data.train}: no readable training records for worker "
                        f"{worker} (all skipped as corrupt?); {_REMEDY}"
                    )
                if shuffle:
                    rng = np.random.default_rng((seed, epoch, worker, w0))
                    perm = rng.permutation(n)
                else:
                    perm = np.arange(n)
                perm = perm[p - ws :] if p - ws < n else perm[:0]
                for i in range(0, len(perm), CHUNK_RECORDS):
                    sel = perm[i : i + CHUNK_RECORDS]
                    images = np.asarray([datas[j] for j in sel], dtype=object)
                    yield images, ids[sel, 1].astype(np.int32), ids[sel, 0]
                p = we
                if p >= length or n < we - ws:  # End of stream: wrap around.
                    p = 0
                    stop.set()
                    chunks = None
        finally:
            stop.set()

    # In a thread, with room for one window of chunks: the next window is read
    # while tf.data drains this one, so decoding never waits for a window to
    # fill. Memory: about 2 x shuffle_buffer records.
    ahead = -(-window // CHUNK_RECORDS) + 1
    return lambda: _background(chunks_of_epoch, ahead)


def _background(make_iter, maxsize: int):
    """Runs `make_iter(stop)` in a thread, yielding its items through a queue."""
    items: queue.Queue = queue.Queue(maxsize=maxsize)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        it = make_iter(stop)
        try:
            for item in it:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # Handed to the consumer, raised there.
            put(e)
        finally:
            it.close()

    threading.Thread(target=run, daemon=True, name="trainer-input").start()
    try:
        while True:
            item = items.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ---------------------------------------------------------------------------
# tf.data stages


def _to_uint8(image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _resize(image, size: int):
    shape = tf.shape(image)
    return tf.cond(
        tf.logical_and(shape[0] == size, shape[1] == size),
        lambda: image,
        lambda: _to_uint8(tf.image.resize(image, [size, size])),
    )


def _decode_fn(spec, *, epoch: int | None):
    """Decode, resize and (when `epoch` is given) augment one record."""
    size = spec.data.image_size
    mode = spec.data.augment if epoch is not None else "none"
    base = None
    if epoch is not None:
        base = (spec.train.seed * 1_000_003 + epoch) % (2**62)

    def decode(image_bytes, label, rid):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        if mode == "none":
            image = _resize(image, size)
        else:
            seed = tf.stack([tf.constant(base, tf.int64), rid])
            seeds = tf.random.experimental.stateless_split(seed, num=2)
            if mode in ("crop", "flip_crop"):
                image = _random_crop(image, size, seeds[0])
            else:
                image = _resize(image, size)
            if mode in ("flip", "flip_crop"):
                image = tf.image.stateless_random_flip_left_right(image, seeds[1])
        return tf.ensure_shape(image, [size, size, 3]), label

    return decode


def _random_crop(image, size: int, seed):
    """Small images: pad by size/8 and crop; larger: random resized crop."""
    if size <= 64:
        image = _resize(image, size)
        pad = max(1, size // 8)
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        return tf.image.stateless_random_crop(padded, [size, size, 3], seed)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.25, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, extent)
    return _to_uint8(tf.image.resize(crop, [size, size]))


def _records_dataset(gen) -> tf.data.Dataset:
    return tf.data.Dataset.from_generator(
        gen,
        output_signature=(
            tf.TensorSpec([None], tf.string),  # image bytes
            tf.TensorSpec([None], tf.int32),  # 0-based labels
            tf.TensorSpec([None], tf.int64),  # record ids (augmentation seeds)
        ),
    )


def _decoded(spec, records: tf.data.Dataset, epoch: int | None) -> tf.data.Dataset:
    # The reader threads already parsed each tf.train.Example (to check it and
    # name the record when it is bad), so image bytes and labels arrive here.
    ds = records.unbatch().map(
        _decode_fn(spec, epoch=epoch),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if spec.data.on_corrupt == "skip":
        # Bytes that pass the reader's checks yet fail to decode (e.g. a
        # truncated JPEG) are dropped here, with a logged warning.
        ds = ds.ignore_errors(log_warning=True)
    return ds


def _per_replica(input_context, global_batch: int) -> int:
    if input_context is None:
        return global_batch
    return input_context.get_per_replica_batch_size(global_batch)


def train_dataset(
    spec,
    *,
    epoch: int,
    start_step: int = 0,
    input_context: tf.distribute.InputContext | None = None,
    tally: CorruptTally | None = None,
) -> tf.data.Dataset:
    """One epoch of training batches from `start_step` on.

    Args:
      spec: the JobSpec.
      epoch: the global epoch counter (unique across phases); with
        `train.seed` it fixes the order and the augmentation.
      start_step: the global step within the epoch to start at.
      input_context: from `strategy.distribute_datasets_from_function`.
      tally: where records skipped as corrupt are counted (pass: `epoch`).

    Returns:
      (images uint8 [B, S, S, 3], labels int32 [B]) batches, B the per-replica
      batch, exactly (steps_per_epoch - start_step) * replicas-on-this-worker
      of them (that is steps_per_epoch - start_step without an input context).
    """
    steps = steps_per_epoch(spec)
    if not 0 <= start_step <= steps:
        raise ValueError(
            f"start_step: received {start_step}; expected 0..{steps} (steps per epoch)"
        )
    workers, _, local = _workers(input_context)
    batch = _per_replica(input_context, spec.train.global_batch_size)
    start = start_step * local * batch  # Records this worker already gave.
    gen = _train_records(spec, epoch, start, input_context, tally)
    ds = _decoded(spec, _records_dataset(gen), epoch)
    ds = ds.batch(batch, drop_remainder=True).take((steps - start_step) * local)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(
    spec,
    *,
    input_context: tf.distribute.InputContext | None = None,
    tally: CorruptTally | None = None,
    pass_key: int = 0,
) -> tf.data.Dataset:
    """The validation split: (images uint8, labels int32, weights float32) batches.

    Not augmented, in a fixed order. Every batch has the same shape: the last
    is padded with zero images of weight 0.0, and every worker yields the same
    number of batches. Records skipped as corrupt are counted in `tally`
    under `pass_key` (the run's epoch counter: one validation pass each).
    """
    info = split_info(spec, "validation")
    workers, worker, local = _workers(input_context)
    global_batch = spec.train.eval_batch_size or spec.train.global_batch_size
    batch = _per_replica(input_context, global_batch)
    order = np.arange(len(info["shards"]))
    lengths = []
    for w in range(workers):
        _, counts, _, stride, off = _worker_shards(info, order, workers, w)
        lengths.append(len(range(off, sum(counts), stride)))
    shards, counts, gids, stride, off = _worker_shards(
        info, order, workers, worker, spec.data.validation
    )
    steps = max(1, max(math.ceil(n / (batch * local)) for n in lengths))
    checker = _Checker(spec)
    parallelism = _parallelism(spec)

    def gen():
        stop = threading.Event()
        raw = _stream(
            shards,
            counts,
            gids,
            off,
            checker=checker,
            on_corrupt=spec.data.on_corrupt,
            parallelism=parallelism,
            stop=stop,
            skip=None if tally is None else tally.recorder("validation", pass_key),
        )
        try:
            for datas, meta in _strided(raw, 0, stride):
                images = np.asarray(datas, dtype=object)
                yield images, meta[:, 1].astype(np.int32), meta[:, 0]
        finally:
            stop.set()

    ds = _decoded(spec, _records_dataset(gen), None).batch(batch)
    # Padding whole batches, not records: a concatenate right behind the
    # parallel decode makes op determinism rewrite that decode into a
    # sequential MapDataset (one core, and an "E0000 NodeDef mentions
    # attribute use_unbounded_threadpool" line on stderr).
    size = spec.data.image_size
    zeros = tf.data.Dataset.from_tensors(
        (
            tf.zeros([batch, size, size, 3], tf.uint8),
            tf.zeros([batch], tf.int32),
            tf.zeros([batch], tf.float32),
        )
    ).repeat()
    ds = ds.map(functools.partial(_pad_batch, batch=batch)).concatenate(zeros)
    return ds.take(steps * local).prefetch(tf.data.AUTOTUNE)


def _pad_batch(images, labels, *, batch: int):
    """Weights 1.0 for a batch's examples; a short last batch is padded to
    `batch` with zero images of weight 0.0."""
    missing = batch - tf.shape(labels)[0]
    images = tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]])
    weights = tf.pad(tf.ones_like(labels, tf.float32), [[0, missing]])
    labels = tf.pad(labels, [[0, missing]])
    return (
        tf.ensure_shape(images, [batch, *images.shape[1:]]),
        tf.ensure_shape(labels, [batch]),
        tf.ensure_shape(weights, [batch]),
    )


def clear_cache() -> None:
    """Forgets the shard lists and counts read so far (they are kept per process)."""
    _info_cache.clear()

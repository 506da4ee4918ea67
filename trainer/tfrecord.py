"""TFRecord framing (write and read), masked CRC32C and block reads, no TensorFlow.

A TFRecord file is a sequence of frames: uint64 length, masked CRC32C of the
length, the record, masked CRC32C of the record. Reading is plain Python over
fsspec (so any protocol works: gs, s3, file, memory, http) in blocks
(`block_size_for`), reopened and retried after transient object-store errors,
so memory does not grow with shard size and a bad frame is named by shard URL,
byte offset and record index.
"""

from __future__ import annotations

import errno
import functools
import logging
import queue
import struct
import threading
import time
from typing import Callable, Iterator

import google_crc32c
import urllib3

from trainer import storage
from trainer.errors import DataError

MANIFEST = "manifest.json"  # Record counts per shard, written by `trainer convert`.
BLOCK_SIZE = 4 * 1024 * 1024  # Bytes per read from a shard in an object store.
# Local files: 1 MB frames as fast as 4 MB (0.32 against 0.35 CPU ms/MB, the
# blocks going into one reused buffer) with a quarter of the memory per
# reader. An object store keeps 4 MB: every read is a request, and its
# latency and overhead are paid per block (1 MB ranged GETs from the
# emulator: 0.63 client + 0.85 server CPU ms/MB; 4 MB: 0.50 + 0.44).
LOCAL_BLOCK_SIZE = 1024 * 1024
READ_AHEAD_THREAD = "trainer-read-ahead"  # The name of the block reading threads.
RETRIES = 5  # Attempts after a transient object-store error.
RETRY_DELAY = 0.5  # Seconds before the first retry; doubled for each next.
REMEDY = (
    're-create the shard with `trainer convert`, or set data.on_corrupt = "skip" '
    "to drop corrupt records (they are counted and reported in summary.json)"
)

_HEADER = struct.Struct("<QI")  # Record length, masked CRC32C of the length.
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

# skipped(record index, reason): hears of each record dropped as corrupt.
Skipped = Callable[[int, str], None]


def masked_crc32c(data) -> int:
    """TFRecord's masked CRC32C: rotate right by 15 and add a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked CRC of length, data, masked CRC of data."""
    length = _U64.pack(len(data))
    return b"".join(
        (
            length,
            _U32.pack(masked_crc32c(length)),
            data,
            _U32.pack(masked_crc32c(data)),
        )
    )


@functools.lru_cache(maxsize=4096)
def _length_crc(length: int) -> int:
    """The masked CRC of a record length, memoized: lengths repeat, and a
    hit costs a quarter of computing it (90 against 390 ns)."""
    return masked_crc32c(_U64.pack(length))


def skip_record(skipped: Skipped | None, index: int, reason: str, message: str) -> None:
    """Logs a record dropped under data.on_corrupt = "skip" and tells `skipped`."""
    if skipped is not None:
        skipped(index, reason)
    logging.warning("skipping corrupt data (data.on_corrupt = skip): %s", message)


class ReadStats:
    """The most bytes buffered for framing by the shard reads this is passed to.

    A memory check for tests and benchmarks: the buffer being framed holds at
    most one block plus one record, whatever the shard size (a reader that
    reads ahead holds its depth in more blocks besides).
    """

    def __init__(self):
        self._lock = threading.Lock()  # Streams in several threads may share one.
        self.max_buffer_bytes = 0

    def note_buffer(self, size: int) -> None:
        with self._lock:
            self.max_buffer_bytes = max(self.max_buffer_bytes, size)


# ---------------------------------------------------------------------------
# Block reads with retries


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
        # urllib3's (the gs:// transport, `_RangeReader`):
        "ProtocolError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "NewConnectionError",
        "IncompleteRead",
    )


class _BlockFile:
    """Sequential block reads of one URL, reopened and retried on transient errors.

    Blocks are read into the caller's buffer (`readinto`): no new bytes object
    per block. A fresh multi-MB object is fresh memory from the OS each time,
    and its page faults cost more than the framing (0.2 CPU ms/MB).
    """

    def __init__(self, url: str, offset: int = 0, block_size: int = BLOCK_SIZE):
        self.url, self.offset, self.block_size = url, offset, block_size
        self._f = None
        self._generation = None  # gs://: the object's generation, once read.

    def _open(self):
        if storage.protocol(self.url) in ("gs", "gcs"):
            return _RangeReader(self.url, self.offset, self._generation)
        fs, path = storage.filesystem(self.url)
        # No fsspec cache layer: we already read big sequential blocks.
        try:
            f = fs.open(path, "rb", block_size=self.block_size, cache_type="none")
        except TypeError:  # Filesystems whose open() takes no cache_type.
            f = fs.open(path, "rb")
        if self.offset:
            f.seek(self.offset)
        return f

    def readinto(self, into: memoryview) -> int:
        """Reads the next block (up to block_size bytes) into `into`; 0 at the end."""
        into = into[: self.block_size]
        delay = RETRY_DELAY
        for attempt in range(RETRIES + 1):
            try:
                if self._f is None:
                    self._f = self._open()
                n = _read_fully(self._f, into)
                self.offset += n
                self._generation = getattr(self._f, "generation", None)
                return n
            except FileNotFoundError:
                raise DataError(
                    f"{self.url}: shard not found at byte offset {self.offset} (it "
                    "was deleted, moved or replaced after the shards were listed); "
                    "restore it, or fix the [data] glob and start the run again"
                ) from None
            except Exception as e:
                if not _is_transient(e):
                    raise
                if attempt == RETRIES:
                    raise DataError(
                        f"{self.url}: read failed at byte offset {self.offset} "
                        f"after {RETRIES} retries ({type(e).__name__}: {e}); "
                        "check the object store and run the same command again"
                    ) from None
                logging.warning(
                    "transient error reading %s at byte %d (%s); retry %d in %.1fs",
                    self.url,
                    self.offset,
                    e,
                    attempt + 1,
                    delay,
                )
                self.close()  # Reopened at `offset`: a failed read counts nothing.
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


def _read_fully(f, into: memoryview) -> int:
    """Fills `into` from `f` (short only at the end of the file); bytes read."""
    if not hasattr(f, "readinto"):  # Some fsspec files only read().
        data = f.read(len(into))
        into[: len(data)] = data
        return len(data)
    have = 0
    while have < len(into):
        n = f.readinto(into[have:])
        if not n:
            break
        have += n
    return have


class _HttpStatus(OSError):
    """An object store's error answer to a ranged GET (`.status`: its code)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_PIECE = 256 * 1024  # Bytes per socket read of a ranged GET's body.


class _RangeReader:
    """Sequential reads of one gs:// object, one ranged GET per read.

    Through `storage.gcs_http` (urllib3), not gcsfs: half the client CPU per
    MB, and the socket reads release the GIL. Every read after the first asks
    for the generation the first one saw, so a shard replaced mid-read is
    "not found" rather than a splice of two files. Errors are left to
    `_BlockFile`'s retries: 5xx/429 and dropped connections are transient.
    """

    def __init__(self, url: str, offset: int, generation: str | None):
        self.url, self.offset, self.generation = url, offset, generation
        self._http = storage.gcs_http()
        self._media = storage.gcs_media_url(url)
        self._size: int | None = None

    def readinto(self, into: memoryview) -> int:
        if self._size is not None and self.offset >= self._size:
            return 0
        url = self._media
        if self.generation:
            url += f"&generation={self.generation}"
        want = len(into)
        r = self._http.urlopen(
            "GET",
            url,
            headers={"Range": f"bytes={self.offset}-{self.offset + want - 1}"},
            preload_content=False,
            retries=False,
        )
        try:
            if r.status == 416:  # Past the end (or an empty object).
                self._size = self.offset
                return 0
            self._check(r, want)
            have = _body_into(r, into)
        except BaseException:
            r.close()  # Not back to the pool: its body may be half read.
            raise
        r.release_conn()
        self.generation = r.headers.get("x-goog-generation", self.generation)
        total = r.headers.get("content-range", "").rpartition("/")[2]
        if r.status == 200:  # The whole object: the server ignored the range.
            total = str(have)
        self._size = int(total) if total.isdigit() else self._size
        self.offset += have
        return have

    def _check(self, r, want: int) -> None:
        if r.status == 206:
            return
        length = r.headers.get("content-length", "")
        if r.status == 200 and self.offset == 0 and length.isdigit():
            if int(length) <= want:  # A server that ignores ranges: small object.
                return
        body = r.read(256, decode_content=False).decode("utf-8", "replace")
        if r.status == 404:
            raise FileNotFoundError(self.url)
        message = f"HTTP {r.status} for a ranged read: {' '.join(body.split())}"
        if r.status in (401, 403):
            raise storage.PermissionDenied(storage._refusal(self.url, "read", message))
        raise _HttpStatus(r.status, message)

    def close(self) -> None:
        pass  # Each read returned its connection to the pool.


def _body_into(r, into: memoryview) -> int:
    """Reads the body of urllib3 response `r` into `into`; bytes read.

    Straight from the socket into the block buffer, through the response's
    http.client object: urllib3's own read() goes through two more copies
    and a new bytes object per call (from the emulator, 0.35 against 0.20
    client user CPU ms/MB). A body cut short raises IncompleteRead (which
    `_BlockFile` retries), as urllib3's read() would.
    """
    fp = getattr(r, "_fp", None)
    if not hasattr(fp, "readinto") or r.headers.get("content-encoding"):
        return _pieces_into(r, into)  # Not http.client underneath, or encoded.
    have, want = 0, len(into)
    while have < want and (n := fp.readinto(into[have:])):
        have += n
    length = r.headers.get("content-length", "")
    if length.isdigit() and have < min(int(length), want):
        raise urllib3.exceptions.IncompleteRead(have, int(length) - have)
    return have


def _pieces_into(r, into: memoryview) -> int:
    """`_body_into` through urllib3's read(), which raises on a short body."""
    have, want = 0, len(into)
    # In pieces that malloc recycles (a whole block would be fresh pages).
    while have < want and (piece := r.read(min(_PIECE, want - have))):
        into[have : have + len(piece)] = piece
        have += len(piece)
    return have


# ---------------------------------------------------------------------------
# Framing one shard


class _Unframeable(Exception):
    """The rest of a shard cannot be cut into frames (truncated, bad length)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class _Blocks:
    """The blocks of one shard, each in a buffer at offset `slack`.

    The room in front of a block takes the partial frame the previous block
    ended with, so a block is framed where it was read, never moved. With
    `depth` > 0 a thread reads up to `depth` blocks ahead of `get()`: reads
    release the GIL, so the I/O of many shards (a network filesystem's or an
    object store's latency) overlaps, while framing and checks stay in the
    consumer's thread (threads that frame fight over the GIL: see
    `records._stream`). With `depth` 0, `get()` reads in the caller's thread
    into one reused buffer.

    Args:
      url: the shard.
      block_size: bytes per read.
      depth: blocks read ahead in a thread (0: none, no thread).
      stop: ends the read-ahead thread when set (so does closing this, or
        dropping it).
    """

    def __init__(self, url: str, block_size: int, depth: int = 0, stop=None):
        self.slack = block_size // 4
        self._file = _BlockFile(url, 0, block_size)
        self._size = self.slack + block_size
        self._free: queue.Queue = queue.Queue()  # Buffers the consumer is done with.
        self._full: queue.Queue | None = None
        self._closed = threading.Event()
        if depth:
            self._full = queue.Queue()  # Bounded by the depth + 1 buffers.
            for _ in range(depth + 1):
                self._free.put(None)  # Allocated by the thread when first used.
            # The thread holds no reference to this object: a reader dropped
            # without close() is collected, and __del__ ends the thread.
            args = (self._file, self._size, self.slack, self._free, self._full)
            stops = (self._closed, stop or threading.Event())
            threading.Thread(
                target=_read_ahead,
                args=(*args, stops),
                daemon=True,
                name=READ_AHEAD_THREAD,
            ).start()

    def get(self) -> tuple[bytearray, int]:
        """The next block: (buffer, bytes at `slack`); 0 bytes at the end."""
        if self._full is None:
            try:
                buf = self._free.get_nowait()  # The one buffer, given back.
            except queue.Empty:
                buf = bytearray(self._size)
            with memoryview(buf) as view:
                return buf, self._file.readinto(view[self.slack :])
        item = self._full.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def give_back(self, buf: bytearray) -> None:
        """Returns a buffer from `get()` once its bytes are no longer needed."""
        self._free.put(buf)

    def close(self) -> None:
        self._closed.set()
        if self._full is None:
            self._file.close()  # Else the thread closes it on its way out.

    def __del__(self):
        self._closed.set()


def _read_ahead(file, size, slack, free, full, stops) -> None:
    """`_Blocks`' thread: reads blocks into free buffers until the end, an
    error (handed to the consumer) or a stop."""

    def take():
        while not any(s.is_set() for s in stops):
            try:
                return True, free.get(timeout=0.1)
            except queue.Empty:
                continue
        return False, None

    try:
        while True:
            ok, buf = take()
            if not ok:
                full.put(RuntimeError(f"{file.url}: read stopped"))
                return
            buf = buf or bytearray(size)
            with memoryview(buf) as view:
                n = file.readinto(view[slack:])
            full.put((buf, n))
            if not n:
                return
    except BaseException as e:  # Raised by the consumer's get().
        full.put(e)
    finally:
        file.close()


class _Frames:
    """The frames of one shard, one at a time, read block by block.

    Blocks come from `_Blocks`, in buffers reused from block to block; the
    memory held is at most (read-ahead depth + 1) blocks plus one record,
    whatever the shard size. Records leave as bytes copies.
    """

    def __init__(
        self,
        url: str,
        block_size: int,
        stats: ReadStats | None,
        read_ahead: int = 0,
        stop=None,
    ):
        self.url = url
        self.offset = 0  # Byte offset of the current frame in the shard.
        self._blocks = _Blocks(url, block_size, read_ahead, stop)
        self._stats = stats
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._owned = False  # Whether _buf came from _blocks (and goes back).
        self._end = 0  # Bytes of _buf that hold data.
        self._pos = 0  # Position of the current frame in _buf.
        self._base = 0  # Byte offset of _buf[0] in the shard.
        self._eof = False
        self.index = 0  # The next frame's index, after `whole`.

    def next(self, index: int, check_length: bool) -> bool:
        """Buffers frame `index` whole; False at a clean end of the shard.

        Raises:
          _Unframeable: stray bytes, a length whose CRC does not match (when
            `check_length`), or a frame cut short.
        """
        if self._end - self._pos < 12 and not self._fill(12):
            stray = self._end - self._pos
            if stray:
                raise _Unframeable(
                    "truncated",
                    f"{self.url}: truncated shard: {stray} stray bytes at byte "
                    f"offset {self._base + self._pos} (record {index}); {REMEDY}",
                )
            return False
        length, length_crc = _HEADER.unpack_from(self._buf, self._pos)
        self.offset = self._base + self._pos
        # The CRC is of the length's 8 bytes as stored: little-endian uint64.
        if check_length and length_crc != _length_crc(length):
            raise _Unframeable(
                "crc_mismatch",
                f"{self.url}: corrupt record length (CRC mismatch) at byte offset "
                f"{self.offset} (record {index}); the rest of the shard cannot be "
                f"framed; {REMEDY}",
            )
        if self._end < self._pos + 16 + length and not self._fill(16 + length):
            raise _Unframeable(
                "truncated",
                f"{self.url}: truncated shard: record {index} at byte offset "
                f"{self.offset} needs {16 + length} bytes, "
                f"{self._end - self._pos} remain; {REMEDY}",
            )
        return True

    def whole(self, index: int, start: int, verify: bool, bad) -> Iterator[tuple]:
        """Every whole frame buffered, from the current one (frame `index`,
        which `next` buffered and checked) on; the records from `start` on.

        One loop over the block rather than a few Python calls per record (a
        third of the reader's CPU per record at 32 px). Each record is copied
        out when it is asked for, not the block's all at once: 64 live 16 kB
        copies fall out of the CPU cache before the checker reads them (+25%
        reader CPU at 224 px). Stops before a frame cut off by the end of the
        buffer or with a bad length CRC, for `next` to fill or to raise at;
        `self.index` is then the next frame's index. A record whose CRC does
        not match goes to `bad(index, byte offset)` instead.

        Yields:
          (record index, record bytes)
        """
        buf, view, crc = self._buf, self._view, masked_crc32c
        pos, end = self._pos, self._end
        unpack, u32, length_crc_of = _HEADER.unpack_from, _U32.unpack_from, _length_crc
        while end - pos >= 12:
            length, length_crc = unpack(buf, pos)
            stop = pos + 16 + length
            if stop > end:
                break
            if (verify or index >= start) and length_crc != length_crc_of(length):
                break
            if index >= start:
                data = bytes(view[pos + 12 : stop - 4])
                self._pos = stop  # Before the yield: the consumer may stop here.
                if verify and crc(data) != u32(buf, stop - 4)[0]:
                    bad(index, self._base + pos)
                else:
                    yield index, data
            pos = stop
            index += 1
        self._pos = pos
        self.index = index

    def close(self) -> None:
        self._blocks.close()
        self._view.release()

    def _fill(self, need: int) -> bool:
        """Makes `need` bytes available from the current frame; False at end of file."""
        tail = self._view[self._pos : self._end].tobytes()  # The partial frame.
        have = len(tail)
        at = self._base + self._pos  # The partial frame's offset in the shard.
        self._view.release()
        if self._owned:
            self._blocks.give_back(self._buf)
        buf, n = (None, 0) if self._eof else self._blocks.get()
        self._eof = self._eof or not n
        slack = self._blocks.slack
        if buf is not None and have <= slack and (have + n >= need or self._eof):
            buf[slack - have : slack] = tail  # In front of the block.
            self._buf, self._owned = buf, True
            self._pos, self._end = slack - have, slack + n
        else:  # The end, or a frame longer than the room: gathered in its own.
            self._buf, self._owned = bytearray(tail), False
            while buf is not None:
                self._buf += memoryview(buf)[slack : slack + n]
                self._blocks.give_back(buf)
                buf = None
                if len(self._buf) < need and not self._eof:
                    buf, n = self._blocks.get()
                    self._eof = not n
            self._pos, self._end = 0, len(self._buf)
        self._base = at - self._pos
        self._view = memoryview(self._buf)
        if self._stats is not None:
            self._stats.note_buffer(self._end - self._pos)
        return self._end - self._pos >= need


def block_size_for(url: str) -> int:
    """Bytes per read: LOCAL_BLOCK_SIZE for local files, else BLOCK_SIZE."""
    return LOCAL_BLOCK_SIZE if storage.is_local(url) else BLOCK_SIZE


def iter_shard(
    url: str,
    *,
    start: int = 0,
    verify: bool = True,
    on_corrupt: str = "error",
    block_size: int | None = None,
    skipped: Skipped | None = None,
    stats: ReadStats | None = None,
    read_ahead: int = 0,
    stop: threading.Event | None = None,
) -> Iterator[tuple[int, bytes]]:
    """(record index, record bytes) of one shard from record `start` on.

    Args:
      url: the shard.
      start: the first record to yield; the records before it are only framed.
      verify: check the records' CRCs, and the length CRCs before `start` too
        (False: only the length CRCs from `start` on, enough to count records).
      on_corrupt: "error" raises DataError at the first bad frame; "skip"
        drops a bad record (and the rest of the shard when it cannot be framed).
      block_size: bytes per read (None: `block_size_for(url)`).
      skipped: `skipped(index, reason)` hears of each record dropped.
      stats: where the buffer's high-water mark is noted.
      read_ahead: blocks a thread reads ahead, from this call on (0: reads
        happen in the iterating thread, when the records are asked for).
      stop: ends the read-ahead thread when set (as does closing or dropping
        the iterator).

    Returns:
      An iterator; it raises DataError at a bad frame (on_corrupt =
      "error"), a shard gone, or reads that kept failing, naming the URL,
      byte offset and remedy.
    """
    size = block_size or block_size_for(url)
    frames = _Frames(url, size, stats, read_ahead, stop)
    return _records(frames, start, verify, on_corrupt == "skip", skipped)


def _records(
    frames: _Frames, start: int, verify: bool, skip_mode: bool, skipped
) -> Iterator[tuple[int, bytes]]:
    """`iter_shard`'s records; closes `frames` at the end."""
    url, index = frames.url, 0

    def crc_mismatch(i: int, offset: int) -> None:
        msg = f"{url}: CRC mismatch in record {i} at byte offset {offset}; {REMEDY}"
        if not skip_mode:
            raise DataError(msg)
        skip_record(skipped, i, "crc_mismatch", msg)

    try:
        while True:
            try:
                if not frames.next(index, check_length=verify or index >= start):
                    return
            except _Unframeable as e:
                if not skip_mode:
                    raise DataError(e.message) from None
                note = " (rest of shard skipped)" if e.reason == "crc_mismatch" else ""
                skip_record(skipped, index, e.reason, e.message + note)
                return
            yield from frames.whole(index, start, verify, crc_mismatch)
            index = frames.index
    finally:
        frames.close()


def read_records(url: str, *, start: int = 0, verify: bool = True) -> Iterator[bytes]:
    """The serialized records of one shard, CRC-checked (for tests and tools).

    Args:
      url: the shard.
      start: the first record to yield.
      verify: check the CRCs (see `iter_shard`).

    Yields:
      Each record's bytes.
    """
    for _, data in iter_shard(url, start=start, verify=verify):
        yield data

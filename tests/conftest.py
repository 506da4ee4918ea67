"""Shared fixtures: a real GCS-compatible server on loopback, tiny digits shards."""

from __future__ import annotations

import os
import uuid

import pytest

from tests import gcs_emulator


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """One persistent JAX compilation cache for every process the suite starts
    (JAX reads JAX_COMPILATION_CACHE_DIR itself). The JAX runs train the same
    small model, and compiling its steps is 40% of a run's CPU time on this
    machine (37 CPU-s fresh, 23 from the cache). The first process still
    compiles, so the compile path is tested too; a cached executable is the
    one a compile would give, so bit-exact comparisons are unchanged. Shared
    by the pytest-xdist workers: the folder above each worker's basetemp."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if base.name.startswith("popen-gw") else base
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax-cache"))
    # Every program, however small or quick to compile.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


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

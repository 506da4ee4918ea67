"""Keras on JAX (runtime.backend = "jax", issue 11), end to end through the CLI.

JAX runs on two forced host devices (XLA_FLAGS), so every step is data
parallel over both. Every run is a real `python -m trainer train` process with
its workdir in a fake-gcs-server bucket, with tests/test_resume.py's small
MobileNetV2 job.
"""

from __future__ import annotations

import json
import random
import signal
import time

import numpy as np
import pytest

from tests.test_resume import (
    TOTAL_STEPS,
    Run,
    Workdir,
    assert_same_run,
    copy_workdir,
    new_bucket,
    state_of,
    summary,
    train_args,
    wait_for,
)

pytestmark = pytest.mark.slow

# Two host devices: the JAX counterpart of two chips (design.md).
JAX_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
ON_JAX = "--set=runtime.backend=jax"
ON_TF = "--set=runtime.backend=tensorflow"

# A run resumed on the other backend continues from the very same weights,
# slots, counters and data position, but its steps are another program: XLA's
# CPU kernels (and JAX's two-device all-reduce) sum float32 products in
# another order than TensorFlow's, about one rounding (1e-7 relative) per op.
# Over the 4 to 6 steps left that stays far below these bounds (measured:
# at most 6e-9 apart); a checkpoint that lost or mixed up slots, counters or
# the data position misses them by orders of magnitude. Integer state
# (iterations, seed-generator states) must match exactly.
RTOL, ATOL = 1e-4, 1e-6


def run_jax(args, scratch, timeout=300) -> Run:
    run = Run(args, scratch, env=JAX_ENV)
    run.wait(timeout)
    return run


@pytest.fixture(scope="session")
def jax_reference(gcs_server, digits_dir, tmp_path_factory) -> Workdir:
    """One uninterrupted JAX run of test_resume's small job."""
    ref = Workdir(new_bucket(), "jax-reference")
    scratch = str(tmp_path_factory.mktemp("jax-reference"))
    run = run_jax(train_args(digits_dir, ref.url, ON_JAX), scratch)
    assert run.proc.returncode == 0, run.describe()
    assert "mirrored x2, backend jax" in run.stdout, run.stdout
    return ref


def assert_close_run(resumed: Workdir, ref: Workdir, resumed_from: int) -> None:
    """`resumed` ended where `ref` did, within RTOL/ATOL (see above): same
    steps and epochs, history equal up to the resumed step, final
    checkpoint arrays close (integers equal)."""
    from trainer import checkpoint

    sa, sb = summary(resumed.bucket, resumed.prefix), summary(ref.bucket, ref.prefix)
    assert sa["status"] == sb["status"] == "completed"
    assert sa["global_step"] == sb["global_step"] == TOTAL_STEPS
    ha, hb = sa["history"], sb["history"]
    assert [h["global_step"] for h in ha] == [h["global_step"] for h in hb]
    for a, b in zip(ha, hb, strict=True):
        if a["global_step"] <= resumed_from:
            assert a == b  # Carried over in the checkpoint, not recomputed.
        else:
            for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
                assert a[key] == pytest.approx(b[key], rel=RTOL, abs=ATOL), key
    arrays_a, state_a = checkpoint.CheckpointManager(
        resumed.url, is_chief=False
    ).restore()
    arrays_b, state_b = checkpoint.CheckpointManager(ref.url, is_chief=False).restore()
    assert state_a["phase_starts"] == state_b["phase_starts"]
    assert sorted(arrays_a) == sorted(arrays_b)
    for key, a in arrays_a.items():
        b = arrays_b[key]
        if np.issubdtype(a.dtype, np.integer):
            assert np.array_equal(a.astype(np.int64), b.astype(np.int64)), key
        else:
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.xdist_group("jax")
def test_jax_kill_9_and_resume_is_bit_exact_then_resumes_on_tf(
    jax_reference, gcs_bucket, digits_dir, tmp_path
):
    """kill -9 mid-run on JAX: resuming on JAX ends bit for bit where the
    uninterrupted JAX run did; the same checkpoint resumes on TensorFlow."""
    scratch = str(tmp_path)
    b = Workdir(gcs_bucket, "b")
    killed = Run(train_args(digits_dir, b.url, ON_JAX), scratch, env=JAX_ENV)
    # Past the first epoch's checkpoint: the restart restores Adam slots and
    # resumes in the middle of an epoch's data.
    wait_for(lambda: (b.bucket.latest(b.prefix) or 0) >= 4, killed, timeout=240)
    time.sleep(random.Random(11).uniform(0.0, 0.5))
    killed.kill(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, killed.describe()
    step = b.bucket.latest(b.prefix)
    assert 4 <= step < TOTAL_STEPS, step
    assert state_of(b.bucket, b.prefix, step)["runtime"]["backend"] == "jax"
    on_tf = copy_workdir(b, gcs_bucket, "on-tf")

    again = run_jax(train_args(digits_dir, b.url, ON_JAX), scratch)
    assert again.proc.returncode == 0, again.describe()
    assert f"resuming from step {step}" in again.stdout
    assert summary(b.bucket, b.prefix)["backend"] == "jax"
    assert_same_run(jax_reference, b, scratch)

    tf_run = Run(train_args(digits_dir, on_tf.url, ON_TF), scratch)
    assert tf_run.wait(300) == 0, tf_run.describe()
    assert "written on the jax backend on tensorflow" in tf_run.stdout
    assert summary(on_tf.bucket, on_tf.prefix)["backend"] == "tensorflow"
    assert_close_run(on_tf, jax_reference, step)


@pytest.mark.xdist_group("preempted")
def test_tf_checkpoint_resumes_on_jax(
    preempted, reference, gcs_bucket, digits_dir, tmp_path
):
    """A run preempted on TensorFlow (SIGTERM) finishes on JAX, where the
    uninterrupted TensorFlow run did (within RTOL/ATOL)."""
    assert preempted.code == 75, preempted.run.describe()
    w = copy_workdir(preempted, gcs_bucket, "to-jax")
    step = w.bucket.latest(w.prefix)
    state = state_of(w.bucket, w.prefix, step)
    assert state["runtime"].get("backend", "tensorflow") == "tensorflow"
    run = run_jax(train_args(digits_dir, w.url, ON_JAX), str(tmp_path))
    assert run.proc.returncode == 0, run.describe()
    assert f"resuming from step {step}" in run.stdout
    assert "written on the tensorflow backend on jax" in run.stdout
    s = summary(w.bucket, w.prefix)
    assert s["backend"] == "jax"
    # The export of a JAX run is TensorFlow's (a `trainer export` process).
    record = json.loads(w.bucket.read(f"{w.prefix}export/export.json"))
    assert record["saved_model"].endswith("/export/saved_model/1"), record
    assert_close_run(w, reference, step)

"""Keras on JAX (runtime.backend = "jax", issue 11), end to end through the CLI.

JAX runs on two forced host devices (XLA_FLAGS), so every step is data
parallel over both. Every run is a real `python -m trainer train` process with
its workdir in a fake-gcs-server bucket, with tests/test_resume.py's small
MobileNetV2 job.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_cli import ROOT, assert_bad_input, run, trainer
from tests.test_multiworker import _free_ports
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

# Two host devices: the JAX counterpart of two chips (design.md).
JAX_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
ON_JAX = "--set=runtime.backend=jax"
ON_TF = "--set=runtime.backend=tensorflow"
# test_resume's small job exports model.keras only; the tests about the export
# of a JAX run put the SavedModel back.
WITH_SAVED_MODEL = "--set=train.export_saved_model=true"

# A run resumed on the other backend continues from the very same weights,
# slots, counters and data position, but its steps are another program: XLA's
# CPU kernels (and JAX's two-device all-reduce) sum float32 products in
# another order than TensorFlow's, about one rounding (1e-7 relative) per op.
# Over the 4 to 6 steps left that stays far below these bounds (measured:
# at most 6e-9 apart); a checkpoint that lost or mixed up slots, counters or
# the data position misses them by orders of magnitude. Integer state
# (iterations, seed-generator states) must match exactly.
RTOL, ATOL = 1e-4, 1e-6


def run_jax(args, scratch, env=JAX_ENV, timeout=300) -> Run:
    run = Run(args, scratch, env=env)
    run.wait(timeout)
    return run


@pytest.fixture(scope="session")
def jax_reference(gcs_server, digits_dir, tmp_path_factory) -> Workdir:
    """One uninterrupted JAX run of test_resume's small job, as Colab's TPU
    runtime runs it: `import tensorflow` fails in the trainer process (a
    sitecustomize blocks it), and the shards are on gs://, read through
    np_input. Its batches are tf.data's bit for bit (tests/test_np_input.py),
    so a JAX run with TensorFlow importable (tf.data) ends exactly where this
    one does, and the tests that compare with it check that too. Its
    `no_tf_env` runs more processes without TensorFlow, `stdout` is its output."""
    from trainer import storage

    scratch = tmp_path_factory.mktemp("jax-reference")
    data = f"{new_bucket()}/digits"
    for name in sorted(os.listdir(digits_dir)):
        if name.startswith("train-") or name == "validation-00000-of-00007.tfrecord":
            storage.put(os.path.join(digits_dir, name), f"{data}/{name}")
    blocker = scratch / "no-tensorflow"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        'import sys\nsys.modules["tensorflow"] = None  # Any import of it fails.\n'
    )
    ref = Workdir(new_bucket(), "jax-reference")
    ref.no_tf_env = {**JAX_ENV, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"}
    # export_saved_model = true (test_resume's job says false): without
    # TensorFlow the export still writes model.keras only, and says why.
    args = train_args(data, ref.url, ON_JAX, WITH_SAVED_MODEL)
    run = run_jax(args, str(scratch), ref.no_tf_env)
    assert run.proc.returncode == 0, run.describe()
    assert "mirrored x2, backend jax" in run.stdout, run.stdout
    ref.stdout = run.stdout
    return ref


def assert_close_run(resumed: Workdir, ref: Workdir, carried: int) -> None:
    """`resumed` ended where `ref` did, within RTOL/ATOL (see above): same
    steps and epochs, the first `carried` records (those in the checkpoint it
    resumed from) equal, the rest and the final checkpoint arrays close
    (integers equal). Not "every record up to the resumed step": a
    step-interval checkpoint can land on an epoch's last step before its
    validation ran, which the resume recomputes (on the other backend:
    close, not equal)."""
    from trainer import checkpoint

    sa, sb = summary(resumed.bucket, resumed.prefix), summary(ref.bucket, ref.prefix)
    assert sa["status"] == sb["status"] == "completed"
    assert sa["global_step"] == sb["global_step"] == TOTAL_STEPS
    ha, hb = sa["history"], sb["history"]
    assert [h["global_step"] for h in ha] == [h["global_step"] for h in hb]
    for i, (a, b) in enumerate(zip(ha, hb, strict=True)):
        if i < carried:
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


@pytest.mark.slow
@pytest.mark.xdist_group("jax")
def test_jax_kill_9_and_resume_is_bit_exact_then_resumes_on_tf(
    jax_reference, gcs_bucket, digits_dir, tmp_path
):
    """kill -9 mid-run on JAX: resuming on JAX ends bit for bit where the
    uninterrupted JAX run did (that one without TensorFlow, on np_input; these
    on tf.data); the same checkpoint resumes on TensorFlow."""
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
    state = state_of(b.bucket, b.prefix, step)
    assert state["runtime"]["backend"] == "jax"
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
    assert_close_run(on_tf, jax_reference, len(state["history"]))


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
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
    # The SavedModel that test_resume's small job leaves out: written here
    # by a `trainer export` process on TensorFlow, as a JAX run's export is.
    args = train_args(digits_dir, w.url, ON_JAX, WITH_SAVED_MODEL)
    run = run_jax(args, str(tmp_path))
    assert run.proc.returncode == 0, run.describe()
    assert f"resuming from step {step}" in run.stdout
    assert "written on the tensorflow backend on jax" in run.stdout
    s = summary(w.bucket, w.prefix)
    assert s["backend"] == "jax"
    # The export of a JAX run is TensorFlow's (a `trainer export` process).
    record = json.loads(w.bucket.read(f"{w.prefix}export/export.json"))
    assert record["saved_model"].endswith("/export/saved_model/1"), record
    assert_close_run(w, reference, len(state["history"]))


@pytest.mark.slow
@pytest.mark.xdist_group("jax")
def test_two_jax_processes_match_one_process_on_two_devices(
    jax_reference, gcs_bucket, digits_dir, tmp_path
):
    """Multi-host through jax.distributed.initialize: a chief and a worker of
    one TF_CONFIG on 127.0.0.1, one CPU device each, each feeding its slice of
    every global batch. The global batches, the program and its two-operand
    all-reduce are those of one process with two devices, so training ends
    bit for bit where that run did. Validation reads its records in another
    order over two workers (interleaved), so its sums may differ in the last
    bit."""
    from trainer import checkpoint

    scratch = str(tmp_path)
    w = Workdir(gcs_bucket, "two-processes")
    ports = _free_ports(2)
    cluster = {"chief": [f"127.0.0.1:{ports[0]}"], "worker": [f"127.0.0.1:{ports[1]}"]}
    runs = [
        Run(
            train_args(digits_dir, w.url, ON_JAX),
            scratch,
            env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": task})},
        )
        for task in ({"type": "chief", "index": 0}, {"type": "worker", "index": 0})
    ]
    codes = [run.wait(400) for run in runs]
    assert codes == [0, 0], "\n".join(run.describe() for run in runs)
    assert "multiworker x2, backend jax" in runs[0].stdout
    assert "completed" in runs[1].stdout  # The worker trained to the end too.

    two, one = (
        summary(w.bucket, w.prefix),
        summary(jax_reference.bucket, jax_reference.prefix),
    )
    assert two["global_step"] == one["global_step"] == TOTAL_STEPS
    for a, b in zip(two["history"], one["history"], strict=True):
        assert (a["loss"], a["accuracy"]) == (b["loss"], b["accuracy"])
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    arrays_a, _ = checkpoint.CheckpointManager(w.url, is_chief=False).restore()
    arrays_b, _ = checkpoint.CheckpointManager(
        jax_reference.url, is_chief=False
    ).restore()
    assert sorted(arrays_a) == sorted(arrays_b)
    for key, a in arrays_a.items():
        assert np.array_equal(a, arrays_b[key]), f"{key} differs"


# ---------------------------------------------------------------------------
# Choosing the backend, and what it cannot run: exit 2 with the remedy


def test_auto_picks_jax_where_tensorflow_cannot_drive_the_machine(monkeypatch):
    from trainer import backend

    for key in ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID"):
        monkeypatch.delenv(key, raising=False)
    assert backend.resolve("jax") == "jax"
    assert backend.resolve("tensorflow") == "tensorflow"
    assert backend.resolve("auto") == "tensorflow"  # CPU, TensorFlow installed.
    # A TPU VM (Colab's and Kaggle's set this) whose TensorFlow is no TPU build.
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    assert not backend.tensorflow_drives_tpus()
    assert backend.resolve("auto") == "jax"
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE")
    # No TensorFlow at all (an import of it is blocked while this test runs).
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    assert backend.resolve("auto") == "jax"


def test_keras_already_on_another_backend_is_exit_2(capsys, tmp_path):
    """A notebook whose Keras runs on TensorFlow asks for JAX: one message
    naming runtime.backend, KERAS_BACKEND and both remedies."""
    import keras

    from trainer import config, train
    from trainer.errors import SpecError

    assert keras.backend.backend() == "tensorflow"  # This test process's Keras.
    args = ["--job=jobs/digits.toml", f"--workdir={tmp_path / 'w'}"]
    result = run(capsys, "train", *args, "--set=runtime.backend=jax")
    assert_bad_input(
        result,
        r'runtime.backend = "jax", but Keras in this process already runs on '
        r"'tensorflow'.*KERAS_BACKEND.*runtime.backend = \"tensorflow\"",
    )
    spec = config.load("jobs/digits.toml", ["runtime.backend=jax"])
    with pytest.raises(SpecError, match="restart the kernel|Restart the kernel"):
        train.run(spec, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # Refused before anything was written.
    result = run(capsys, "train", *args, "--set=runtime.backend=torch")
    assert_bad_input(result, r"runtime.backend.*torch.*auto.*tensorflow.*jax")


@pytest.mark.slow
def test_check_dry_runs_the_jax_steps(digits_dir, tmp_path):
    """`trainer check` with runtime.backend = "jax": the plan names the
    backend and the two devices, each phase dry-runs the jitted JAX step, and
    nothing is written."""
    proc = trainer(
        "check",
        "--job=jobs/digits.toml",
        f"--workdir={tmp_path / 'w'}",
        f"--set=data.train={digits_dir}/train-*.tfrecord",
        f"--set=data.validation={digits_dir}/validation-*.tfrecord",
        "--set=model.backbone=mobilenetv2",
        "--set=phases.finetune.trainable_from=block_16_expand",
        ON_JAX,
        env=JAX_ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"backend\s+jax\n", proc.stdout), proc.stdout
    assert re.search(r"num_replicas\s+2\n", proc.stdout), proc.stdout
    assert proc.stdout.count("2 steps of batch 4") == 2, proc.stdout
    assert proc.stdout.count("no (the JAX backend trains on images)") == 2
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


@pytest.mark.slow
@pytest.mark.xdist_group("jax")
def test_without_tensorflow_the_digits_job_runs_on_jax_from_gs_shards(
    jax_reference, tmp_path
):
    """Colab's TPU runtime, on this CPU (the `jax_reference` run): the job
    trains without TensorFlow, exports model.keras, says in export.json why
    there is no SavedModel, writes TensorBoard scalars, and `trainer
    predict` and `trainer evaluate`, still without TensorFlow, use model.keras.
    (test_jax_kill_9_... checks that it ended where a run with tf.data does.)"""
    ref = jax_reference
    assert "no SavedModel: TensorFlow is not installed here" in ref.stdout
    s = summary(ref.bucket, ref.prefix)
    assert s["status"] == "completed" and s["backend"] == "jax"
    assert s["global_step"] == TOTAL_STEPS
    record = json.loads(ref.bucket.read(f"{ref.prefix}export/export.json"))
    assert record["saved_model"] is None and "trainer export" in record["note"]
    names = [b.name for b in ref.bucket.client.list_blobs(ref.bucket.name)]
    assert f"{ref.prefix}export/model.keras" in names
    assert not [n for n in names if n.startswith(f"{ref.prefix}export/saved_model")]

    from tensorboard.backend.event_processing import event_accumulator

    logs = f"{ref.prefix}logs/"
    for name in (n for n in names if n.startswith(logs)):
        local = tmp_path / "logs" / name[len(logs) :]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(ref.bucket.read(name))
    events = event_accumulator.EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    steps = [h["global_step"] for h in s["history"]]
    assert [e.step for e in events.Scalars("val_accuracy")] == steps
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(
        [h["loss"] for h in s["history"]]
    )

    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
    predicted = _without_tensorflow(
        jax_reference, "predict", f"--workdir={ref.url}", str(image)
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    line = predicted.stdout.strip().splitlines()[-1].split("\t")
    assert line[0] == str(image) and 0.0 < float(line[2]) <= 1.0

    # The exported (best) weights on the run's validation shard: the accuracy
    # the run measured at that step; the loss to float32 summation order
    # (one device here, two in the run).
    evaluated = _without_tensorflow(jax_reference, "evaluate", f"--workdir={ref.url}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    best = next(h for h in s["history"] if h["global_step"] == record["step"])
    assert f"accuracy {best['val_accuracy']:.4f}" in evaluated.stdout
    metrics = json.loads(ref.bucket.read(f"{ref.prefix}eval/metrics.json"))
    assert metrics["accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def _without_tensorflow(jax_reference, *args: str) -> subprocess.CompletedProcess:
    """`trainer ARGS` in a process where `import tensorflow` fails."""
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=ROOT,
        env=dict(os.environ, **jax_reference.no_tf_env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # A JAX process each: CI, not the fast lane.
@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "runtime.mixed_precision=mixed_float16",
            r'runtime.mixed_precision = "mixed_float16".*"mixed_bfloat16"',
        ),
        (
            "data.cache_features=true",
            r'data.cache_features = true cannot be used with runtime.backend = "jax"'
            r'.*data.cache_features = "auto"',
        ),
        (
            "runtime.strategy=tpu",
            r'runtime.strategy = "tpu", but JAX finds no TPU.*runtime.strategy = "auto"',
        ),
        (
            "runtime.strategy=multiworker",
            r'runtime.strategy = "multiworker" with runtime.backend = "jax" needs '
            r'several processes.*runtime.strategy = "auto"',
        ),
    ],
)
def test_what_jax_cannot_do_is_exit_2(setting, message, digits_dir, tmp_path):
    proc = trainer(
        "train",
        "--job=jobs/digits.toml",
        f"--workdir={tmp_path / 'w'}",
        f"--set=data.train={digits_dir}/train-*.tfrecord",
        f"--set=data.validation={digits_dir}/validation-*.tfrecord",
        "--set=runtime.backend=jax",
        f"--set={setting}",
    )
    assert_bad_input(proc, message)
    assert not (tmp_path / "w").exists()  # Refused before anything is written.

"""Checkpoint manager, fence, format and retention on memory://, local and GCS."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import numpy as np
import pytest

from trainer import checkpoint_catalog, checkpoint_format, fence, storage
from trainer.background import BackgroundWriter
from trainer.checkpoint import CheckpointManager
from trainer.errors import CheckpointError, FencedError


@pytest.fixture(params=["memory", "local", "gcs"])
def workdir(request, tmp_path):
    """A fresh workdir URL on each backend."""
    if request.param == "memory":
        url = f"memory://ckpt-tests/{uuid.uuid4().hex}"
        yield url
        storage.rm(url, recursive=True)
    elif request.param == "local":
        yield str(tmp_path / "run")
    else:
        yield storage.join(request.getfixturevalue("gcs_bucket"), "run")


def arrays_at(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "model/conv1/kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
        "model/bn/moving_mean": rng.standard_normal(4).astype(np.float32),
        "model/seed_generator_state/0": np.array([step, 7], dtype=np.int64),
        "optimizer/iteration": np.array(step, dtype=np.int64),
        "flags": np.array([True, False, True]),
        "half": np.arange(5, dtype=np.float16),
    }


def assert_arrays_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def committed(workdir: str) -> list[int]:
    return [
        int(n.split("-")[1])
        for n in storage.listdir(storage.join(workdir, "checkpoints"))
        if n.startswith("ckpt-")
    ]


def manager(workdir: str, **kwargs) -> CheckpointManager:
    m = CheckpointManager(workdir, **kwargs)
    m.claim()
    return m


def test_round_trip(workdir):
    m = manager(workdir)
    assert m.restore() is None
    state = {"phase": "transfer", "epoch": 1, "global_step": 20, "seeds": [1, 2]}
    m.save(10, arrays_at(10), {**state, "global_step": 10})
    m.save(20, arrays_at(20), state)
    m.close()
    assert m.last_durable_step == 20
    assert m.latest_step() == 20
    arrays, got_state = CheckpointManager(workdir).restore()
    assert_arrays_equal(arrays, arrays_at(20))
    assert got_state == state
    files = storage.listdir(m.checkpoint_url(20))
    assert files == ["arrays-00000.bin", "arrays.json", "manifest.json", "state.json"]


def test_save_is_async_and_one_upload_at_a_time(gcs_bucket):
    workdir = storage.join(gcs_bucket, "run")
    m = manager(workdir)
    big = {"w": np.ones(48 << 20, dtype=np.uint8)}  # ~0.5-1 s to the emulator
    start = time.monotonic()
    m.save(1, big, {"step": 1})
    blocked = time.monotonic() - start
    assert m.last_durable_step is None  # Still uploading: save() did not wait.
    m.save(2, big, {"step": 2})  # Waits for step 1 first: never two in flight.
    assert m.last_durable_step == 1
    start = time.monotonic()
    m.wait()
    upload = time.monotonic() - start
    assert m.last_durable_step == 2
    assert blocked < upload, (blocked, upload)


def test_dict_is_copied_at_save(workdir):
    m = manager(workdir)
    arrays = {"w": np.zeros(1000, dtype=np.float32)}
    m.save(1, arrays, {})
    arrays["w"][:] = 5.0  # The loop keeps training while the upload runs.
    m.close()
    restored, _ = CheckpointManager(workdir).restore()
    assert not restored["w"].any()


def test_wait_reraises_background_failure(workdir):
    a = manager(workdir)
    a.save(1, arrays_at(1), {}, blocking=True)
    b = manager(workdir)
    a.save(2, arrays_at(2), {})  # Returns; the background commit is refused.
    with pytest.raises(FencedError, match="taken over by another trainer"):
        a.wait()
    a.wait()  # The error is raised once.
    assert b.latest_step() == 1


def test_close_without_raising_logs_the_failure(workdir, caplog):
    a = manager(workdir)
    a.save(1, arrays_at(1), {}, blocking=True)
    manager(workdir)
    a.save(2, arrays_at(2), {})  # Fenced in the background.
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        a.close(raise_errors=False)
    assert "failed too" in caplog.text and "taken over" in caplog.text
    a.close()  # Idempotent.
    with pytest.raises(CheckpointError, match="after close"):
        a.save(3, arrays_at(3), {})


def test_snapshot_is_taken_after_the_previous_upload(workdir):
    m = manager(workdir)
    m.save(1, arrays_at(1), {})
    durable_at_snapshot = []

    def snapshot():
        durable_at_snapshot.append(m.last_durable_step)
        return arrays_at(2)

    m.save(2, snapshot, {}, blocking=True)
    assert durable_at_snapshot == [1]  # At most two copies in host memory.
    assert m.last_durable_step == 2


def test_writer_surfaces_a_job_error_once_at_the_next_call():
    writer = BackgroundWriter("test")
    release = threading.Event()
    ran = []

    def upload():
        release.wait(10)
        raise OSError("upload refused")

    writer.submit(upload)  # Returns while the job runs.
    assert not ran
    release.set()
    with pytest.raises(OSError, match="upload refused"):
        writer.submit(ran.append, 1)  # Waits for the job; does not start its own.
    assert ran == []
    writer.wait()  # The error is raised once.
    writer.submit(ran.append, 2)
    writer.wait()
    assert ran == [2]
    writer.submit(upload)
    with pytest.raises(OSError, match="upload refused"):
        writer.close()


def test_writer_runs_one_job_at_a_time():
    writer = BackgroundWriter("test")
    running, overlaps = [], []

    def job(n):
        running.append(n)
        overlaps.append(len(running))
        time.sleep(0.05)
        running.remove(n)

    for n in range(3):
        writer.submit(job, n)
    writer.close()
    assert overlaps == [1, 1, 1]


def test_checkpoint_without_latest_is_ignored(workdir, caplog):
    m = manager(workdir)
    m.save(1, arrays_at(1), {"step": 1}, blocking=True)
    # A complete folder that LATEST does not name, as a crash leaves it.
    fs, path = storage.filesystem(m.checkpoint_url(1))
    fs.copy(path, storage.filesystem(m.checkpoint_url(2))[1], recursive=True)
    assert sorted(committed(workdir)) == [1, 2]
    arrays, state = CheckpointManager(workdir).restore()
    assert state == {"step": 1}
    assert_arrays_equal(arrays, arrays_at(1))

    # And with no LATEST at all, nothing exists: a warning, and a fresh start.
    storage.rm(storage.join(workdir, "checkpoints", "LATEST"))
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert CheckpointManager(workdir).restore() is None
    assert "no LATEST" in caplog.text


def test_latest_never_moves_backwards(workdir):
    m = manager(workdir)
    m.save(5, arrays_at(5), {}, blocking=True)
    with pytest.raises(CheckpointError, match="never moves backwards"):
        m.save(3, arrays_at(3), {})
    m.save(5, arrays_at(6), {"ignored": True}, blocking=True)  # Same step: no-op.
    assert CheckpointManager(workdir).restore()[1] == {}
    # A restart resumes from LATEST and cannot go behind it either.
    m2 = manager(workdir)
    with pytest.raises(CheckpointError, match="already has step 5"):
        m2.save(4, arrays_at(4), {})
    assert m2.latest_step() == 5


def flip_byte(url: str, offset: int = 100) -> None:
    data = bytearray(storage.read_bytes(url))
    data[offset] ^= 0xFF
    storage.write_bytes(url, bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda c: flip_byte(storage.join(c, "arrays-00000.bin")), id="flip"
        ),
        pytest.param(lambda c: storage.rm(storage.join(c, "state.json")), id="rm-file"),
        pytest.param(
            lambda c: storage.rm(storage.join(c, "manifest.json")), id="rm-manifest"
        ),
        pytest.param(lambda c: storage.rm(c, recursive=True), id="rm-folder"),
    ],
)
def test_corrupt_newest_falls_back(workdir, damage, caplog):
    m = manager(workdir)
    for step in (1, 2, 3):
        m.save(step, arrays_at(step), {"step": step})
    m.close()
    damage(m.checkpoint_url(3))
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        arrays, state = CheckpointManager(workdir).restore()
    assert state == {"step": 2}
    assert_arrays_equal(arrays, arrays_at(2))
    assert "checkpoint step 3" in caplog.text
    assert "restored step 2 instead of step 3" in caplog.text


def test_all_corrupt_raises(workdir, caplog):
    m = manager(workdir)
    for step in (1, 2):
        m.save(step, arrays_at(step), {"step": step})
    m.close()
    flip_byte(storage.join(m.checkpoint_url(1), "arrays-00000.bin"))
    storage.rm(m.checkpoint_url(2), recursive=True)
    with pytest.raises(CheckpointError, match="names step 2 but no checkpoint"):
        CheckpointManager(workdir).restore()


def test_resume_after_fallback_can_commit(workdir):
    m = manager(workdir)
    for step in (10, 20):
        m.save(step, arrays_at(step), {"step": step})
    m.close()
    flip_byte(storage.join(m.checkpoint_url(20), "arrays-00000.bin"))
    m2 = manager(workdir)
    _, state = m2.restore()
    assert state == {"step": 10}
    m2.save(15, arrays_at(15), {"step": 15}, blocking=True)  # Behind the lost 20.
    assert m2.latest_step() == 15
    _, state = CheckpointManager(workdir).restore()
    assert state == {"step": 15}


def test_retention_keeps_newest_and_best(workdir):
    m = manager(workdir, keep=2)
    # The caller's best step as it moves: 1, then 2, which stays the best.
    best = {1: 1, 2: 2, 3: 2, 4: 2, 5: 2}
    for step, best_step in best.items():
        m.save(step, arrays_at(step), {"step": step}, best_step=best_step)
    m.close()
    assert sorted(committed(workdir)) == [2, 4, 5]
    if workdir.startswith("gs://"):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        bucket = workdir.split("/")[2]
        client = gcs.Client(project="test", credentials=AnonymousCredentials())
        names = [b.name for b in client.list_blobs(bucket)]
        assert not [n for n in names if "ckpt-000000001" in n or "ckpt-000000003" in n]
        assert [n for n in names if "ckpt-000000002/" in n]


def test_retention_without_best_keeps_newest(workdir):
    m = manager(workdir, keep=1)
    for step in (1, 2, 3):
        m.save(step, arrays_at(step), {}, best_step=None)
    m.close()
    assert committed(workdir) == [3]


@pytest.mark.parametrize(
    "steps, keep, best_step, deleted",
    [
        ([], 3, None, []),
        ([1, 2], 3, None, []),
        ([1, 2, 3, 4, 5], 2, None, [1, 2, 3]),
        ([5, 1, 4, 2, 3], 2, 2, [1, 3]),  # Any order; the best is kept besides.
        ([1, 2, 3], 2, 3, [1]),  # The best among the newest: nothing extra kept.
        ([1, 2, 3], 1, 7, [1, 2]),  # A best step without a folder keeps nothing.
        ([1, 2, 3], 0, 2, [1, 3]),
    ],
)
def test_steps_to_delete(steps, keep, best_step, deleted):
    assert checkpoint_catalog.steps_to_delete(steps, keep, best_step) == deleted


def test_manifest_records_metric_and_writer(workdir):
    m = manager(workdir, monitor="val_loss", mode="min")
    m.save(3, arrays_at(3), {}, best_step=3, metric=0.25, blocking=True)
    url = storage.join(m.checkpoint_url(3), checkpoint_format.MANIFEST)
    manifest = storage.read_json(url)
    assert {
        k: manifest[k] for k in ("format", "step", "metric", "monitor", "mode")
    } == {
        "format": 1,
        "step": 3,
        "metric": 0.25,
        "monitor": "val_loss",
        "mode": "min",
    }
    assert set(manifest["writer"]) == {"host", "pid", "started"}
    assert sorted(manifest["files"]) == [
        "arrays-00000.bin",
        "arrays.json",
        "state.json",
    ]


def test_fencing(workdir):
    a = manager(workdir)
    a.save(1, arrays_at(1), {"by": "a"}, blocking=True)
    b = manager(workdir)
    _, state = b.restore()
    assert state == {"by": "a"}
    with pytest.raises(FencedError, match=r"host \S+, pid \d+, started"):
        a.save(2, arrays_at(2), {"by": "a"}, blocking=True)
    assert b.latest_step() == 1
    b.save(2, arrays_at(2), {"by": "b"}, blocking=True)
    with pytest.raises(FencedError):
        a.save(3, arrays_at(3), {"by": "a"}, blocking=True)
    assert b.latest_step() == 2
    assert CheckpointManager(workdir).restore()[1] == {"by": "b"}
    # After its last commit a displaced trainer still asks before the writes
    # no commit fences (train's completion: export, plots, summary.json).
    b.check_owner(2, "exporting and summarizing the run")
    with pytest.raises(FencedError, match=r"stops without exporting and summarizing"):
        a.check_owner(2, "exporting and summarizing the run")


def test_fencing_during_upload_gcs(gcs_bucket):
    """A claim while the old owner uploads: the old owner's commit is refused."""
    workdir = storage.join(gcs_bucket, "run")
    a = manager(workdir)
    a.save(1, {"w": np.ones(32 << 20, dtype=np.uint8)}, {"by": "a"})
    b = manager(workdir)  # While a's upload is (most likely) in flight.
    with pytest.raises(FencedError, match="taken over"):
        a.wait()
    assert b.latest_step() is None
    b.save(1, arrays_at(1), {"by": "b"}, blocking=True)
    assert CheckpointManager(workdir).restore()[1] == {"by": "b"}


def test_commit_refused_after_rival_claim(workdir):
    """The commit itself is fenced, even when the owner check came before the
    rival's claim: on gs:// by the LATEST generation alone."""
    directory = storage.join(workdir, "checkpoints")
    a = fence.Fence(directory, workdir)
    a.claim()
    a.check(1)
    a.commit(1)
    fence.Fence(directory, workdir).claim()  # Right after a checked, say.
    with pytest.raises(FencedError, match="taken over"):
        a.commit(2)
    assert checkpoint_catalog.latest_step(directory) == 1


def test_non_chief_writes_nothing_and_restores(workdir):
    chief = manager(workdir)
    chief.save(1, arrays_at(1), {"step": 1}, blocking=True)
    worker = CheckpointManager(workdir, is_chief=False)
    worker.claim()
    worker.save(2, arrays_at(2), {"step": 2}, blocking=True)
    worker.close()
    assert committed(workdir) == [1]
    assert worker.restore()[1] == {"step": 1}
    chief.save(2, arrays_at(2), {"step": 2}, blocking=True)  # Still the owner.


def test_save_before_claim_raises(tmp_path):
    with pytest.raises(CheckpointError, match="claim"):
        CheckpointManager(str(tmp_path)).save(1, {}, {})


# ---------------------------------------------------------------------------
# Keras variables


def small_model(keras):
    inputs = keras.Input((6,), name="x")
    x = keras.layers.Dense(8, name="hidden")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dropout(0.3, name="drop")(x)
    outputs = keras.layers.Dense(3, name="out")(x)
    return keras.Model(inputs, outputs)


def compiled_small_model(keras):
    """`small_model`, seeded and compiled with Adam, and its data to fit."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 32)
    model = small_model(keras)
    optimizer = keras.optimizers.Adam(1e-2)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(True))
    return model, optimizer, x, y


def test_device_snapshot_stays_exact_while_training_goes_on():
    """The checkpoint's snapshot defers its host copy (to the background
    thread): what it holds must not move with the updates that follow, from
    Keras' fit (XLA where it can) and from a jit-compiled apply alike."""
    keras = pytest.importorskip("keras")
    import tensorflow as tf

    from trainer import models

    model, optimizer, x, y = compiled_small_model(keras)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    held = models.device_snapshot(model, optimizer)
    before = models.snapshot_variables(model, optimizer)
    assert set(held) == set(before)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)

    @tf.function(jit_compile=True)
    def apply():
        grads = [tf.ones_like(v.value) for v in model.trainable_variables]
        optimizer.apply(grads, model.trainable_variables)

    apply()
    moved = models.snapshot_variables(model, optimizer)
    assert not np.array_equal(
        moved["model/hidden/kernel"], before["model/hidden/kernel"]
    )
    assert_arrays_equal({k: np.asarray(v) for k, v in held.items()}, before)


def test_snapshot_and_assign_keras(tmp_path):
    keras = pytest.importorskip("keras")
    from trainer import models

    model, optimizer, x, y = compiled_small_model(keras)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 4 steps
    snapshot = models.snapshot_variables(model, optimizer)
    assert int(snapshot["optimizer/iteration"]) == 4
    assert any(k.endswith("_momentum") for k in snapshot)
    assert any(k.endswith("_velocity") for k in snapshot)
    assert "model/bn/moving_mean" in snapshot
    assert "model/seed_generator_state/0" in snapshot
    before = {k: v.copy() for k, v in snapshot.items()}
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # Snapshot must not move.
    assert_arrays_equal(snapshot, before)

    m = manager(str(tmp_path / "run"))
    m.save(4, lambda: models.device_snapshot(model, optimizer), {}, blocking=True)
    arrays, _ = CheckpointManager(str(tmp_path / "run")).restore()

    fresh = small_model(keras)  # Same names; other global counters.
    fresh_opt = keras.optimizers.Adam(1e-2)
    fresh_opt.build(fresh.trainable_variables)
    models.assign_variables(fresh, fresh_opt, arrays)
    assert_arrays_equal(models.snapshot_variables(fresh, fresh_opt), arrays)
    assert int(fresh_opt.iterations.numpy()) == 8

    incomplete = dict(arrays)
    del incomplete["model/hidden/kernel"]
    with pytest.raises(
        CheckpointError, match="missing from the checkpoint: model/hidden/kernel"
    ):
        models.assign_variables(fresh, fresh_opt, incomplete)
    wrong = {**arrays, "model/out/bias": np.zeros(4, np.float32), "extra": np.zeros(1)}
    with pytest.raises(
        CheckpointError, match=r"extra.*model/out/bias \(variable \(3,\)"
    ):
        models.assign_variables(fresh, fresh_opt, wrong)

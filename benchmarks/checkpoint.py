"""Checkpoint cost for ResNet50 + Adam (~300 MB) on a local GCS emulator.

Prints, for the same state: the time training is blocked per checkpoint with
the async save, versus a synchronous save + upload (what Keras'
BackupAndRestore-style saving costs the loop), the checkpoint size, the time
until it is durable (LATEST committed), and the restore time (download +
verify, then assign into a fresh model and optimizer).

    .venv/bin/python benchmarks/checkpoint.py [--repeats=5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import gcs_emulator  # noqa: E402


def build(keras):
    model = keras.applications.ResNet50(weights=None)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    # Compiled, so Keras' own save_weights (the baseline) includes the optimizer.
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    server = gcs_emulator.start_emulator()
    try:
        import keras
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        from trainer import checkpoint, models, storage

        client = gcs.Client(project="test", credentials=AnonymousCredentials())
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(bucket)
        workdir = f"gs://{bucket}/run"

        model, optimizer = build(keras)
        host = lambda: models.snapshot_variables(model, optimizer)  # noqa: E731
        snapshot = lambda: models.device_snapshot(model, optimizer)  # noqa: E731
        state = {"global_step": 0}
        manager = checkpoint.CheckpointManager(workdir, keep=2)
        manager.claim()
        step = 0

        snap_times, host_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            held = snapshot()
            snap_times.append(time.perf_counter() - start)
            del held
            start = time.perf_counter()
            arrays = host()
            host_times.append(time.perf_counter() - start)
            size_mb = sum(a.nbytes for a in arrays.values()) / 1e6
            count = len(arrays)
            del arrays

        # Keras' BackupAndRestore way: save_weights to a local file, then upload.
        keras_times = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(min(args.repeats, 3)):
                start = time.perf_counter()
                path = os.path.join(tmp, "backup.weights.h5")
                model.save_weights(path)
                storage.put(path, f"gs://{bucket}/keras-baseline/{i}.weights.h5")
                keras_times.append(time.perf_counter() - start)

        # Interleaved (sync, async, sync, async, ...): load from other
        # processes hits both alike; each async save is set against its pair.
        sync_times, blocked, durable, ratios = [], [], [], []
        for _ in range(args.repeats):
            step += 1
            start = time.perf_counter()
            manager.save(step, snapshot, state, blocking=True)
            sync_times.append(time.perf_counter() - start)
            step += 1
            start = time.perf_counter()
            manager.save(step, snapshot, state)
            blocked.append(time.perf_counter() - start)
            manager.wait()  # The loop would be training meanwhile.
            durable.append(time.perf_counter() - start)
            ratios.append(blocked[-1] / sync_times[-1])
        manager.close()

        folder = manager.checkpoint_url(step)
        stored_mb = (
            sum(storage.size(storage.join(folder, n)) for n in storage.listdir(folder))
            / 1e6
        )

        fresh_model, fresh_optimizer = build(keras)
        restore_times, assign_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            arrays, _ = checkpoint.CheckpointManager(workdir).restore()
            restore_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            models.assign_variables(fresh_model, fresh_optimizer, arrays)
            assign_times.append(time.perf_counter() - start)
            del arrays

        med = statistics.median
        rows = [
            ("arrays in the checkpoint", f"{count}"),
            ("state size (model + Adam slots)", f"{size_mb:.0f} MB"),
            ("checkpoint size in the bucket", f"{stored_mb:.0f} MB"),
            (
                "snapshot taken by the loop (device_snapshot)",
                f"{med(snap_times):.3f} s",
            ),
            (
                "snapshot to host memory (snapshot_variables)",
                f"{med(host_times):.2f} s",
            ),
            ("Keras save_weights + upload: loop blocked", f"{med(keras_times):.2f} s"),
            ("sync save + upload: loop blocked", f"{med(sync_times):.2f} s"),
            ("async save: loop blocked", f"{med(blocked):.3f} s"),
            (
                "async blocked / sync, median [min-max] of pairs",
                f"{med(ratios):.1%} [{min(ratios):.1%}-{max(ratios):.1%}] "
                "(target <= 5%)",
            ),
            ("async save: time to durable", f"{med(durable):.2f} s"),
            ("restore: download + verify", f"{med(restore_times):.2f} s"),
            ("restore: assign to model + optimizer", f"{med(assign_times):.2f} s"),
        ]
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"\nResNet50 + Adam to fake-gcs-server, median of {args.repeats} "
            f"(load average now {load})\n"
        )
        print("| measure | value |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()

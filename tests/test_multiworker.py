"""Two `trainer train` worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy).

Real processes with one TF_CONFIG (or Vertex AI's CLUSTER_SPEC) each, the
workdir in the GCS emulator: agreed preemption (either worker told), a lost
worker, a worker that never comes up, resume on the same or another number of
workers.
"""

from __future__ import annotations

import json
import signal
import socket
import time

import numpy as np
import pytest

from tests.test_resume import (
    SMALL_BACKBONE,
    Bucket,
    Run,
    summary,
    wait_for,
    workdir_in,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiworker")]

# transfer: 1 epoch x 12 steps, finetune: 1 epoch x 4 steps; 2 replicas.
TOTAL_STEPS = 16
SMALL = [
    *SMALL_BACKBONE,
    "train.export_saved_model=false",  # These tests compare weights.
    "train.global_batch_size=16",
    "train.checkpoint_every_steps=4",
    "train.deterministic=true",
    "phases.transfer.epochs=1",
    "phases.transfer.learning_rate=0.01",
    "phases.transfer.steps_per_epoch=12",
    "phases.finetune.epochs=1",
    "phases.finetune.steps_per_epoch=4",
]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def train_args(digits_dir, url, *extra: str) -> list[str]:
    return [
        "train",
        "--job=jobs/digits.toml",
        f"--workdir={url}",
        f"--set=data.train={digits_dir}/train-*.tfrecord",
        f"--set=data.validation={digits_dir}/validation-00000-of-00007.tfrecord",
        *(f"--set={s}" for s in SMALL),
        *extra,
    ]


def start_workers(digits_dir, url, scratch, *, vertex=False, extra=()) -> list[Run]:
    """Two workers of one run; worker 0 (or Vertex's workerpool0) is the chief."""
    hosts = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    args = train_args(digits_dir, url, *extra)
    runs = []
    for i in range(2):
        if vertex:
            pools = {"workerpool0": hosts[:1], "workerpool1": hosts[1:]}
            task = {"type": f"workerpool{min(i, 1)}", "index": 0}
            env = {"CLUSTER_SPEC": json.dumps({"cluster": pools, "task": task})}
        else:
            task = {"type": "worker", "index": i}
            env = {
                "TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": task})
            }
        runs.append(Run(args, scratch, env=env))
    return runs


def wait_all(runs: list[Run], timeout: float = 240) -> list[int]:
    return [run.wait(timeout) for run in runs]


def final_arrays(url: str):
    from trainer import checkpoint

    return checkpoint.CheckpointManager(url, is_chief=False).restore()


def largest_difference(url_a: str, url_b: str) -> float:
    """The largest absolute difference between two runs' final float arrays."""
    (arrays_a, _), (arrays_b, _) = final_arrays(url_a), final_arrays(url_b)
    assert sorted(arrays_a) == sorted(arrays_b)
    return max(
        float(np.max(np.abs(arrays_a[k].astype(np.float64) - arrays_b[k])))
        for k in arrays_a
        if arrays_a[k].dtype.kind == "f"
    )


def stop_steps(runs: list[Run]) -> list[int]:
    return [
        int(run.stdout.split("saving a checkpoint at step ")[1].split()[0])
        for run in runs
    ]


def copy_workdir(bucket: Bucket, prefix: str, to: str) -> None:
    """Copies a workdir's objects under another prefix (a run's state, to resume
    it in two ways)."""
    for blob in bucket.client.list_blobs(bucket.name, prefix=prefix):
        bucket.bucket.copy_blob(blob, bucket.bucket, to + blob.name[len(prefix) :])


@pytest.fixture(scope="session")
def reference(gcs_server, digits_dir, tmp_path_factory):
    """One uninterrupted two-worker run, started as Vertex AI starts one.

    Its workdir URL and object prefix; the tests below only read it.
    """
    from tests import gcs_emulator

    name = "multiworker-reference"
    gcs_emulator.client().create_bucket(name)
    url, prefix = workdir_in(f"gs://{name}", "ref")
    scratch = str(tmp_path_factory.mktemp("reference"))
    runs = start_workers(digits_dir, url, scratch, vertex=True)
    assert wait_all(runs) == [0, 0], runs[0].describe() + runs[1].describe()
    return url, prefix, runs


def test_vertex_cluster_spec_runs_two_workers_and_only_the_chief_writes(reference):
    url, prefix, runs = reference
    bucket = Bucket(url)
    assert all("multiworker x2" in run.stdout for run in runs)
    # data.cache_features = "auto": several workers train the frozen phase uncached.
    assert all(
        "phase 'transfer' on cached features: no (2 workers" in run.stdout
        for run in runs
    )
    owner = json.loads(bucket.read(f"{prefix}checkpoints/OWNER"))
    assert owner["pid"] == runs[0].proc.pid  # workerpool0 is the chief.
    s = summary(bucket, prefix)
    assert s["status"] == "completed" and s["global_step"] == TOTAL_STEPS


def test_sigterm_to_one_worker_stops_both_at_one_step(gcs_bucket, digits_dir, tmp_path):
    """The non-chief preempted. (Resuming such a stop is the chief's test below:
    the checkpoint either stop leaves is the same kind.)"""
    bucket, scratch = Bucket(gcs_bucket), str(tmp_path)
    url_b, pb = workdir_in(gcs_bucket, "b")

    runs = start_workers(digits_dir, url_b, scratch)
    wait_for(lambda: (bucket.latest(pb) or 0) >= 4, runs[1])
    runs[1].kill(signal.SIGTERM)  # The non-chief is preempted.
    assert wait_all(runs, timeout=120) == [75, 75], runs[0].describe()
    stops = stop_steps(runs)
    assert stops[0] == stops[1] == bucket.latest(pb) < TOTAL_STEPS, stops
    assert "another worker was told to stop" in runs[0].stdout
    s = summary(bucket, pb)
    assert s["status"] == "preempted" and s["global_step"] == stops[0]
    # Only the chief claimed and wrote the workdir.
    owner = json.loads(bucket.read(f"{pb}checkpoints/OWNER"))
    assert owner["pid"] == runs[0].proc.pid, owner


def test_a_killed_worker_stops_the_other_and_the_rerun_is_bit_exact(
    reference, gcs_bucket, digits_dir, tmp_path
):
    """kill -9 of a worker: the other stops within the bound (no hang in a
    collective), and the rerun ends bit for bit where the uninterrupted
    two-worker run did."""
    bucket, scratch = Bucket(gcs_bucket), str(tmp_path)
    url, prefix = workdir_in(gcs_bucket, "w")
    runs = start_workers(digits_dir, url, scratch)
    wait_for(lambda: (bucket.latest(prefix) or 0) >= 4, runs[0])
    durable = bucket.latest(prefix)
    runs[1].kill(signal.SIGKILL)
    killed = time.monotonic()
    assert runs[0].wait(timeout=120) == 75, runs[0].describe()
    assert time.monotonic() - killed < 60  # Not a hang in a collective.
    assert "a worker of this run is gone (peers named: worker 1 (127.0.0.1:" in (
        runs[0].stderr
    ), runs[0].stderr[-2000:]
    assert "Traceback" not in runs[0].stderr
    stopped_at = bucket.latest(prefix)
    assert stopped_at >= durable
    runs[1].wait()

    again = start_workers(digits_dir, url, scratch)
    assert wait_all(again) == [0, 0], again[0].describe() + again[1].describe()
    assert all(f"resuming from step {stopped_at}" in run.stdout for run in again)
    url_a, pa, _ = reference
    sa, sb = summary(Bucket(url_a), pa), summary(bucket, prefix)
    assert sa["global_step"] == sb["global_step"] == TOTAL_STEPS
    assert sa["history"] == sb["history"]
    assert largest_difference(url_a, url) == 0.0


def _one_process(digits_dir, url, scratch, replicas: int) -> Run:
    # On images, not cached features: at feature speed the frozen phase is
    # over before a SIGTERM can land in it, and the test needs stops mid-run.
    args = train_args(digits_dir, url, "--set=data.cache_features=false")
    if replicas > 1:
        args.append("--set=runtime.strategy=mirrored")
    return Run(args, scratch, env={"TRAINER_CPU_DEVICES": str(replicas)})


def test_resume_on_one_then_two_then_one_replica(gcs_bucket, digits_dir, tmp_path):
    """Same global batch on other hardware: same positions, weights within float
    error of an uninterrupted one-replica run. (A change of worker count is
    `test_two_workers_resumed_on_one_see_the_same_records`.)"""
    bucket, scratch = Bucket(gcs_bucket), str(tmp_path)
    url_a, pa = workdir_in(gcs_bucket, "a")
    url_b, pb = workdir_in(gcs_bucket, "b")
    ref = _one_process(digits_dir, url_a, scratch, 1)
    assert ref.wait() == 0, ref.describe()

    stops = []
    for replicas, at_least in ((1, 4), (2, 8)):
        run = _one_process(digits_dir, url_b, scratch, replicas)
        floor = max(stops or [0])
        wait_for(
            lambda f=floor, n=at_least: (bucket.latest(pb) or 0) >= max(n, f + 1), run
        )
        run.kill(signal.SIGTERM)
        assert run.wait() == 75, run.describe()
        stops.append(bucket.latest(pb))
        if replicas == 2:
            assert "mirrored x2" in run.stdout
            assert f"resuming from step {stops[0]}" in run.stdout
    last = _one_process(digits_dir, url_b, scratch, 1)
    assert last.wait() == 0, last.describe()
    assert f"resuming from step {stops[1]}" in last.stdout
    assert stops[0] < stops[1] < TOTAL_STEPS

    sa, sb = summary(bucket, pa), summary(bucket, pb)
    assert sa["global_step"] == sb["global_step"] == TOTAL_STEPS
    assert [h["global_step"] for h in sa["history"]] == [
        h["global_step"] for h in sb["history"]
    ]
    (arrays_a, _), (arrays_b, _) = final_arrays(url_a), final_arrays(url_b)
    assert sorted(arrays_a) == sorted(arrays_b)
    # Two replicas sum the gradients in another order: equal within float error.
    worst = max(
        float(np.max(np.abs(arrays_a[k].astype(np.float64) - arrays_b[k])))
        for k in arrays_a
        if arrays_a[k].dtype.kind == "f"
    )
    print(f"largest weight difference from the one-replica run: {worst:.3g}")
    assert worst < 1e-3, worst
    assert abs(sa["metrics"]["val_accuracy"] - sb["metrics"]["val_accuracy"]) < 0.02


@pytest.fixture(scope="session")
def chief_stopped(gcs_server, digits_dir, tmp_path_factory):
    """A two-worker run whose chief got SIGTERM mid-phase.

    (workdir URL, object prefix, the two runs, their exit codes); the tests
    below resume copies of its workdir.
    """
    from tests import gcs_emulator

    name = "multiworker-chief-stopped"
    gcs_emulator.client().create_bucket(name)
    url, prefix = workdir_in(f"gs://{name}", "stopped")
    scratch = str(tmp_path_factory.mktemp("chief-stopped"))
    bucket = Bucket(url)
    runs = start_workers(digits_dir, url, scratch)
    wait_for(lambda: (bucket.latest(prefix) or 0) >= 4, runs[0])
    runs[0].kill(signal.SIGTERM)  # The chief is preempted.
    return url, prefix, runs, wait_all(runs, timeout=120)


def test_sigterm_to_the_chief_stops_both_at_one_step_then_resume_is_bit_exact(
    reference, chief_stopped, digits_dir, tmp_path
):
    url_a, pa, _ = reference
    url, prefix, runs, codes = chief_stopped
    assert codes == [75, 75], runs[0].describe() + runs[1].describe()
    bucket = Bucket(url)
    stops = stop_steps(runs)
    assert stops[0] == stops[1] == bucket.latest(prefix) < TOTAL_STEPS, stops
    assert "another worker was told to stop" in runs[1].stdout
    s = summary(bucket, prefix)
    assert s["status"] == "preempted" and s["global_step"] == stops[0]

    copy_workdir(bucket, prefix, "again/")
    url_b = url.rsplit("/", 1)[0] + "/again"
    again = start_workers(digits_dir, url_b, str(tmp_path))
    assert wait_all(again) == [0, 0], again[0].describe() + again[1].describe()
    assert all(f"resuming from step {stops[0]}" in run.stdout for run in again)
    sa, sb = summary(Bucket(url_a), pa), summary(bucket, "again/")
    assert sa["global_step"] == sb["global_step"] == TOTAL_STEPS
    assert sa["history"] == sb["history"]
    assert largest_difference(url_a, url_b) == 0.0


def test_two_workers_resumed_on_one_see_the_same_records(
    reference, chief_stopped, digits_dir, tmp_path
):
    """Every worker keeps its slice of one global order, so the rest of the run
    on one process trains on the same records at the same steps: the weights
    then differ from the uninterrupted two-worker run only by float summation
    order (one replica sums 16 examples' gradients, two sum 8 each)."""
    url_a, pa, _ = reference
    url, prefix, runs, codes = chief_stopped
    assert codes == [75, 75], runs[0].describe() + runs[1].describe()
    bucket = Bucket(url)
    copy_workdir(bucket, prefix, "one/")
    url_b = url.rsplit("/", 1)[0] + "/one"
    # XLA off as on the two workers (`auto` would compile the one-CPU
    # fine-tune): the difference measured is then the data's and the sums'.
    one = Run(
        train_args(digits_dir, url_b, "--set=train.jit_compile=false"), str(tmp_path)
    )
    assert one.wait() == 0, one.describe()
    assert "cpu x1" in one.stdout
    assert f"resuming from step {bucket.latest(prefix)}" in one.stdout
    sa, sb = summary(Bucket(url_a), pa), summary(bucket, "one/")
    assert sa["global_step"] == sb["global_step"] == TOTAL_STEPS
    assert [h["global_step"] for h in sa["history"]] == [
        h["global_step"] for h in sb["history"]
    ]
    worst = largest_difference(url_a, url_b)
    print(f"largest weight difference from the two-worker run: {worst:.3g}")
    assert worst < 1e-6, worst


def test_a_worker_whose_peer_never_comes_up_stops_within_the_bound(
    gcs_bucket, digits_dir, tmp_path
):
    """Only the chief of a two-worker TF_CONFIG is started: it stops (exit 75)
    once runtime.collective_timeout_seconds have passed, naming the peer.
    (A lone non-chief takes the same path: test_platforms' await_peers test.)"""
    started = 0
    url, prefix = workdir_in(gcs_bucket, "alone")
    hosts = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    task = {"type": "worker", "index": started}
    env = {"TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": task})}
    args = train_args(digits_dir, url, "--set=runtime.collective_timeout_seconds=8")
    began = time.monotonic()
    run = Run(args, str(tmp_path), env=env)
    assert run.wait(timeout=120) == 75, run.describe()
    # TensorFlow's import and start take some seconds of the bound's slack.
    assert time.monotonic() - began < 60
    peer = 1 - started
    assert (
        f"worker {peer} ({hosts[peer]}) did not come up within 8 s "
        "(runtime.collective_timeout_seconds)"
    ) in run.stderr, run.stderr[-2000:]
    assert "after a durable checkpoint" not in run.stderr
    assert "Traceback" not in run.stderr
    assert Bucket(gcs_bucket).latest(prefix) is None

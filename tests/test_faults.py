"""Faults nobody scripted: lost responses, a store that refuses writes, the GCE
notice, garbage where a checkpoint pointer should be, bad data, bad specs.

Network faults come from a seeded fault-injecting proxy (tests/fault_proxy.py)
between the real clients and fake-gcs-server; preemption is a real metadata
stand-in and a real process; every CLI case checks exit code and stderr.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests import gce_metadata
from tests.fault_proxy import FaultProxy
from tests.test_cli import ROOT, run, trainer
from tests.test_resume import (
    TOTAL_STEPS,
    Bucket,
    Run,
    Workdir,
    assert_same_run,
    run_to_end,
    summary,
    train_args,
    wait_for,
    workdir_in,
)
from trainer import storage, tfrecord


@pytest.fixture
def proxy(gcs_server):
    server = FaultProxy(os.environ["STORAGE_EMULATOR_HOST"], seed=7).start()
    yield server
    server.stop()


@pytest.fixture
def through(proxy, monkeypatch):
    """This process's google-cloud-storage client goes through `proxy`."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    monkeypatch.setattr(storage, "_gcs_client_cache", [])
    return proxy


def assert_one_line_error(run_or_proc, *patterns: str) -> str:
    """One `error: ...` message (a spec's may list its problems below it), no
    traceback; returns the message."""
    stderr = run_or_proc.stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    starts = [i for i, ln in enumerate(stderr.splitlines()) if ln.startswith("error: ")]
    assert len(starts) == 1, stderr[-3000:]
    message = "\n".join(stderr.splitlines()[starts[0] :])
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    return message


# ---------------------------------------------------------------------------
# Lost responses on conditional writes are not a rival trainer


def test_conditional_writes_survive_lost_responses(through, gcs_bucket):
    # Every write's first response is lost after it landed: the client's
    # retry meets 412, and the read-back must recognise the write as ours.
    through.script_writes = ["lost", None] * 8
    url = f"{gcs_bucket}/pointer"
    generation = 0
    for i in range(8):
        generation = storage.write_if_generation(
            url, f"value {i}\n".encode(), generation, landed=lambda: True
        )
    assert through.counts["lost"] == 8 and not through.script_writes, through.counts
    assert storage.read_generation(url) == (b"value 7\n", generation)


def test_a_rivals_write_is_still_refused(through, gcs_bucket):
    from tests import gcs_emulator

    through.script_writes = ["lost", None] * 3
    url = f"{gcs_bucket}/pointer"
    rival = gcs_emulator.client().bucket(gcs_bucket[5:]).blob("pointer")
    mine = storage.write_if_generation(url, b"mine\n", 0, landed=lambda: True)
    rival.upload_from_string(b"rival\n")  # Other bytes: a rival's write.
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if_generation(url, b"mine again\n", mine, landed=lambda: True)
    # Our very bytes, but the ownership check says a rival wrote them.
    _, now = storage.read_generation(url)
    rival.upload_from_string(b"same\n")
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if_generation(url, b"same\n", now, landed=lambda: False)
    assert through.counts["lost"] == 3 and not through.script_writes, through.counts


# ---------------------------------------------------------------------------
# Shard reads through a faulty network


def test_shard_reads_survive_a_faulty_network(through, gcs_bucket, caplog, monkeypatch):
    """The gs:// reader's ranged GETs meet 503s, resets, answers lost after
    the server sent them and bodies cut short; it retries from the byte it
    had, and every record comes back once, in order."""
    records = [os.urandom(2000 + 37 * i) for i in range(120)]  # ~0.5 MB
    url = f"{gcs_bucket}/faulty-00000-of-00001.tfrecord"
    storage.write_bytes(url, b"".join(tfrecord.frame_record(r) for r in records))
    through.rates = {"503": 0.12, "reset": 0.12, "lost": 0.12, "short": 0.12}
    monkeypatch.setattr(tfrecord, "RETRY_DELAY", 0.01)
    with caplog.at_level(logging.WARNING):
        got = [data for _, data in tfrecord.iter_shard(url, block_size=64 * 1024)]
    assert got == records
    faults = sum(through.counts[k] for k in ("503", "reset", "lost", "short"))
    assert faults >= 2 and through.counts["short"], through.counts
    assert caplog.text.count(f"transient error reading {url} at byte ") == faults


# ---------------------------------------------------------------------------
# A whole run through a faulty network ends where a clean one does


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_run_through_a_faulty_network_is_bit_exact(
    reference, proxy, gcs_bucket, digits_dir, tmp_path, monkeypatch
):
    """Ends bit for bit where the clean `reference` run (same arguments) ends."""
    faulty = Workdir(gcs_bucket, "faulty")  # Its client reads the emulator direct.
    proxy.rates = {"503": 0.04, "reset": 0.04, "lost": 0.04}
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    run = run_to_end(train_args(digits_dir, faulty.url), str(tmp_path), timeout=600)
    print("faults injected:", dict(proxy.counts))
    assert run.proc.returncode == 0, run.describe()
    for kind in ("503", "reset", "lost"):
        assert proxy.counts[kind] >= 3, proxy.counts
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.upstream_url)
    assert_same_run(reference, faulty, str(tmp_path))


@pytest.mark.slow
def test_a_store_that_refuses_writes_exits_2_naming_the_last_durable_step(
    proxy, gcs_bucket, digits_dir, tmp_path, monkeypatch
):
    bucket = Bucket(gcs_bucket)
    url, prefix = workdir_in(gcs_bucket, "w")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    run = Run(train_args(digits_dir, url), str(tmp_path))
    wait_for(lambda: (bucket.latest(prefix) or 0) >= 2, run)
    proxy.forbid_writes = True  # A service account that lost its role.
    assert run.wait() == 2, run.describe()
    durable = bucket.latest(prefix)
    assert_one_line_error(
        run,
        "refused to",
        gcs_bucket,
        "roles/storage.objectAdmin",
        f"The last durable checkpoint is step {durable}",
        "run the same command again",
    )


@pytest.mark.slow
def test_a_store_lost_mid_run_says_where_the_run_stands(
    proxy, gcs_bucket, digits_dir, tmp_path, monkeypatch
):
    """The store goes away (the proxy stops: connections refused) after a
    checkpoint. Once the clients' retries give up, the exit stays 1 (a spot
    VM's script retries that, and gives up on 2), and below the traceback
    come the last durable step and what to do."""
    bucket = Bucket(gcs_bucket)
    url, prefix = workdir_in(gcs_bucket, "w")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    run = Run(train_args(digits_dir, url), str(tmp_path))
    wait_for(lambda: (bucket.latest(prefix) or 0) >= 2, run)
    proxy.go_down()
    assert run.wait() == 1, run.describe()
    durable = bucket.latest(prefix)
    tail = run.stderr.rstrip().splitlines()[-2:]
    assert tail[0] == (
        f"{url}: The last durable checkpoint is step {durable} "
        f"({url}/checkpoints/ckpt-{durable:09d}): once fixed, run the same "
        "command again to resume from it"
    ), run.stderr[-3000:]
    assert tail[1].startswith("error: the store could not be reached ("), tail
    assert tail[1].endswith("run the same command again (nothing committed is lost)")


def test_a_workdir_in_a_missing_bucket_is_named(gcs_bucket):
    missing = "gs://no-such-bucket-3f9a/run/job.json"
    with pytest.raises(storage.NotFound, match=(
        r"cannot write gs://no-such-bucket-3f9a/run/job.json: the bucket "
        r"gs://no-such-bucket-3f9a does not exist.*gcloud storage buckets create"
    )):  # fmt: skip
        storage.write_json(missing, {})


# ---------------------------------------------------------------------------
# The GCE preemption notice, end to end


@pytest.mark.slow
def test_gce_notice_saves_and_exits_75(gcs_bucket, digits_dir, tmp_path):
    bucket = Bucket(gcs_bucket)
    url, prefix = workdir_in(gcs_bucket, "w")
    with gce_metadata.serve({"instance/preempted": "FALSE"}) as server:
        flag = f"{server.url}/instance/preempted"
        args = train_args(
            digits_dir, url, f"--set=train.preemption_metadata_url={flag}"
        )
        run = Run(args, str(tmp_path))
        wait_for(lambda: (bucket.latest(prefix) or 0) >= 2, run)
        assert server.hanging >= 1  # Watching with a hanging GET, not polling.
        flipped = time.monotonic()
        server.set("instance/preempted", "TRUE")
        code = run.wait()
        seconds = time.monotonic() - flipped
    assert code == 75, run.describe()
    assert seconds < 15, f"exit {seconds:.1f}s after the notice"
    assert "gce-preempted" in run.stderr
    s = summary(bucket, prefix)
    assert s["status"] == "preempted"
    assert 2 <= s["global_step"] < TOTAL_STEPS
    assert bucket.latest(prefix) == s["last_durable_step"] == s["global_step"]


# ---------------------------------------------------------------------------
# One clear line for what the user must fix


def test_garbage_in_latest_exits_2(digits_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints" / "LATEST").write_text("<html>oops</html>\n")
    proc = run(capsys, *train_args(digits_dir, str(workdir)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_line_error(
        proc,
        str(workdir / "checkpoints" / "LATEST"),
        "last durable step is unknown",
        "Write the name of the checkpoint to resume from into it",
    )


def test_a_file_that_is_not_a_tfrecord_exits_2(digits_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shard = data / "train-00000-of-00001.tfrecord"
    shard.write_bytes(b"\x89PNG this is a picture, not a TFRecord" * 10)
    proc = run(
        capsys,
        *train_args(digits_dir, str(tmp_path / "run")),
        f"--set=data.train={data}/train-*.tfrecord",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_line_error(proc, str(shard), "byte offset 0", "trainer convert")


def test_bad_spec_answers_before_tensorflow_is_imported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[data]\nimage_size = "big"\n')
    code = textwrap.dedent(
        f"""
        import sys
        from trainer import errors, main
        argv = ["trainer", "train", "--job={bad}", "--workdir={tmp_path}/w"]
        try:
            main.main(argv)
        except errors.SpecError as e:
            print("SpecError", "tensorflow" in sys.modules, "keras" in sys.modules)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.stdout.split() == ["SpecError", "False", "False"], proc.stderr
    cli = trainer("train", f"--job={bad}", f"--workdir={tmp_path}/w")
    assert cli.returncode == 2
    assert_one_line_error(cli, "data.image_size")


# ---------------------------------------------------------------------------
# Corrupt records: counted once per pass, across a resume


def _shards_with_bad_records(digits_dir: str, out) -> tuple[str, str]:
    """One real digits shard per split plus a shard of 2 (train) or 1
    (validation) records whose label is out of range, among good ones."""
    import shutil

    from tests.test_input_pipeline import _example, _write_shard

    out.mkdir()
    for split, bad in (("train", 2), ("validation", 1)):
        shutil.copy(f"{digits_dir}/{split}-00000-of-00007.tfrecord", out)
        records = [_example(label=3)] * 6 + [_example(label=99)] * bad
        _write_shard(str(out / f"{split}-extra.tfrecord"), records)
    return f"{out}/train-*.tfrecord", f"{out}/validation-*.tfrecord"


@pytest.mark.slow
def test_corrupt_records_counted_once_per_pass_across_a_resume(
    gcs_bucket, digits_dir, tmp_path
):
    train, validation = _shards_with_bad_records(digits_dir, tmp_path / "data")
    bucket = Bucket(gcs_bucket)
    url, prefix = workdir_in(gcs_bucket, "w")
    args = [
        *train_args(digits_dir, url),
        f"--set=data.train={train}",
        f"--set=data.validation={validation}",
        "--set=data.on_corrupt=skip",
        # Whole epochs, so every pass reads every record.
        "--set=phases.transfer.steps_per_epoch=0",
        "--set=phases.finetune.steps_per_epoch=0",
    ]
    run = Run(args, str(tmp_path))
    wait_for(lambda: (bucket.latest(prefix) or 0) >= 30, run)  # Mid epoch 2.
    run.kill(signal.SIGTERM)
    assert run.wait() == 75, run.describe()
    again = run_to_end(args, str(tmp_path))
    assert again.proc.returncode == 0, again.describe()
    # 3 passes (transfer x2, finetune x1), each with one validation pass.
    assert summary(bucket, prefix)["corrupt_records"] == {
        "train": {"skipped": 6, "records": 2, "reasons": {"bad_label": 6}},
        "validation": {"skipped": 3, "records": 1, "reasons": {"bad_label": 3}},
    }

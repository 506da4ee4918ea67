"""Preemption and exact resume, end to end (issue 4).

Every run is a real `python -m trainer train` subprocess with its workdir in a
fake-gcs-server bucket on 127.0.0.1; each start gets a fresh HOME and TMPDIR,
as a fresh machine would. The model is a small MobileNetV2 on a slice of the
real digits so the whole file stays within a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import pytest

from tests.test_cli import ROOT

pytestmark = pytest.mark.slow

# transfer: 2 epochs x 3 steps, finetune: 1 epoch x 4 steps = 10 steps,
# a checkpoint every 2 steps and at each epoch and phase boundary.
TOTAL_STEPS = 2 * 3 + 4
FINETUNE_STEPS = 4
# The small backbone of every test that is not about the model: MobileNetV2,
# a 32-unit head, fine-tuning its last block.
SMALL_BACKBONE = [
    "model.backbone=mobilenetv2",
    "model.dense=[32]",
    "phases.finetune.trainable_from=block_16_expand",
]
SMALL = [
    *SMALL_BACKBONE,
    "train.global_batch_size=8",
    "train.checkpoint_every_steps=2",
    "train.deterministic=true",
    "phases.transfer.epochs=2",
    "phases.transfer.learning_rate=0.001",
    "phases.transfer.steps_per_epoch=3",
    "phases.finetune.epochs=1",
    "phases.finetune.steps_per_epoch=4",
    "phases.finetune.jit_compile=false",
    # model.keras only: the SavedModel costs each run ~3 CPU-s, and these
    # tests compare weights (tests that need it set it back to true).
    "train.export_saved_model=false",
]


def train_args(digits_dir: str, workdir: str, *extra: str) -> list[str]:
    return [
        "train",
        "--job=jobs/digits.toml",
        f"--workdir={workdir}",
        f"--set=data.train={digits_dir}/train-*.tfrecord",
        # One validation shard: evaluation is not what these tests are about.
        f"--set=data.validation={digits_dir}/validation-00000-of-00007.tfrecord",
        *(f"--set={s}" for s in SMALL),
        *extra,
    ]


class Run:
    """One `trainer train` process on a fresh "machine" (HOME, TMPDIR)."""

    def __init__(self, args: list[str], scratch: str, env: dict | None = None):
        self.machine = tempfile.mkdtemp(prefix="machine-", dir=scratch)
        home, tmp = (
            os.path.join(self.machine, "home"),
            os.path.join(self.machine, "tmp"),
        )
        os.makedirs(home)
        os.makedirs(tmp)
        env = dict(
            os.environ,
            HOME=home,
            TMPDIR=tmp,
            TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONUNBUFFERED="1",
            **(env or {}),
        )
        self.out_path = os.path.join(self.machine, "out.txt")
        self.err_path = os.path.join(self.machine, "err.txt")
        self._out = open(self.out_path, "w")
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainer", *args],
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=self._err,
        )

    @property
    def stdout(self) -> str:
        with open(self.out_path) as f:
            return f.read()

    @property
    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def output(self) -> str:
        return self.stdout + self.stderr

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()
            self._err.close()

    def kill(self, signum=signal.SIGKILL) -> None:
        if self.running():
            self.proc.send_signal(signum)

    def describe(self) -> str:
        """Exit code and output tails; for a crash, also where it began (a
        fatal signal's stack dump outgrows the tail)."""
        err = self.stderr
        crash = _CRASH.search(err)
        start = ""
        if crash and crash.start() < len(err) - 4000:
            start = f"{err[crash.start() : crash.start() + 4000]}\n[...]\n"
        return (
            f"exit {self.proc.returncode}\n--- stdout\n{self.stdout[-3000:]}\n"
            f"--- stderr\n{start}{err[-4000:]}"
        )


# The first line of a crash in a child's stderr: absl/glog's fatal log line,
# a C++ exception that ends the process, Python's fatal-signal dump.
_CRASH = re.compile(
    r"^F\d{4} |terminate called|Fatal Python error|Check failed", re.MULTILINE
)


def run_to_end(args, scratch, timeout=240) -> Run:
    run = Run(args, scratch)
    run.wait(timeout)
    return run


class Bucket:
    """Direct, uncached access to the emulator bucket (google-cloud-storage)."""

    def __init__(self, url: str):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        assert url.startswith("gs://")
        self.name = url[len("gs://") :].split("/", 1)[0]
        self.client = gcs.Client(project="test", credentials=AnonymousCredentials())
        self.bucket = self.client.bucket(self.name)

    def read(self, path: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        try:
            return self.bucket.blob(path).download_as_bytes()
        except NotFound:
            return None

    def latest(self, workdir_path: str) -> int | None:
        text = self.read(f"{workdir_path}checkpoints/LATEST")
        if not text or not text.strip():
            return None
        return int(text.decode().strip().split("-")[1])

    def folders(self, workdir_path: str) -> set[int]:
        prefix = f"{workdir_path}checkpoints/"
        steps = set()
        for blob in self.client.list_blobs(self.name, prefix=prefix):
            m = re.match(r"ckpt-(\d+)/", blob.name[len(prefix) :])
            if m:
                steps.add(int(m.group(1)))
        return steps

    def delete_prefix(self, prefix: str) -> int:
        blobs = list(self.client.list_blobs(self.name, prefix=prefix))
        for blob in blobs:
            blob.delete()
        return len(blobs)


def wait_for(predicate, run: Run | None, timeout: float = 120, interval: float = 0.05):
    """Polls `predicate` until truthy; fails if `run` exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if run is not None and not run.running():
            pytest.fail(
                f"the trainer exited before the awaited moment: {run.describe()}"
            )
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s" + (f": {run.describe()}" if run else ""))


def workdir_in(bucket_url: str, name: str) -> tuple[str, str]:
    """(URL, object prefix) of a workdir inside the bucket."""
    return f"{bucket_url}/{name}", f"{name}/"


def new_bucket() -> str:
    """A fresh bucket on the session's emulator, for session fixtures."""
    from tests import gcs_emulator

    name = f"test-{uuid.uuid4().hex[:12]}"
    gcs_emulator.client().create_bucket(name)
    return f"gs://{name}"


def copy_workdir(source: Workdir, bucket_url: str, name: str) -> Workdir:
    """A byte-for-byte copy of a workdir, as a user's `gcloud storage cp -r`."""
    src, dst = Bucket(source.url), Bucket(bucket_url)
    _, prefix = workdir_in(bucket_url, name)
    for blob in src.client.list_blobs(src.name, prefix=source.prefix):
        rest = blob.name[len(source.prefix) :]
        src.bucket.copy_blob(blob, dst.bucket, prefix + rest)
    return Workdir(bucket_url, name)


class Workdir:
    """A workdir inside an emulator bucket: its URL, object prefix and bucket."""

    def __init__(self, bucket_url: str, name: str):
        self.url, self.prefix = workdir_in(bucket_url, name)
        self.bucket = Bucket(bucket_url)


def reference_run(digits_dir: str, scratch: str) -> Workdir:
    """One uninterrupted run of `train_args` (conftest's `reference` fixture)."""
    ref = Workdir(new_bucket(), "reference")
    run = run_to_end(train_args(digits_dir, ref.url), scratch)
    assert run.proc.returncode == 0, run.describe()
    ref.stdout = run.stdout
    return ref


def summary(bucket: Bucket, prefix: str) -> dict:
    return json.loads(bucket.read(f"{prefix}summary.json"))


def state_of(bucket: Bucket, prefix: str, step: int) -> dict:
    return json.loads(bucket.read(f"{prefix}checkpoints/ckpt-{step:09d}/state.json"))


def load_export(bucket: Bucket, prefix: str, scratch: str):
    import keras

    import trainer.models  # noqa: F401  (registers the custom objects)

    path = os.path.join(tempfile.mkdtemp(dir=scratch), "model.keras")
    with open(path, "wb") as f:
        f.write(bucket.read(f"{prefix}export/model.keras"))
    return keras.saving.load_model(path)


# ---------------------------------------------------------------------------
# 1. kill -9 at random moments, resume on a fresh machine: bit for bit


def assert_same_run(a: Workdir, b: Workdir, scratch: str) -> None:
    """Two completed runs ended in the same place: history (the resumed epochs'
    partial metric sums too), exported weights, final checkpoint arrays (model,
    BatchNorm statistics, seeds), all bit for bit."""
    from trainer import checkpoint

    sa, sb = summary(a.bucket, a.prefix), summary(b.bucket, b.prefix)
    assert sa["status"] == sb["status"] == "completed"
    assert sa["global_step"] == sb["global_step"] == TOTAL_STEPS
    assert sa["history"] == sb["history"]

    ma = load_export(a.bucket, a.prefix, scratch)
    mb = load_export(b.bucket, b.prefix, scratch)
    assert len(ma.weights) == len(mb.weights) > 0
    for wa, wb in zip(ma.weights, mb.weights, strict=True):
        assert wa.path == wb.path
        assert np.array_equal(np.asarray(wa), np.asarray(wb)), (
            f"{wa.path} differs after resume"
        )

    arrays_a, state_a = checkpoint.CheckpointManager(a.url, is_chief=False).restore()
    arrays_b, state_b = checkpoint.CheckpointManager(b.url, is_chief=False).restore()
    assert state_a["global_step"] == state_b["global_step"] == TOTAL_STEPS
    assert sorted(arrays_a) == sorted(arrays_b)
    for key in arrays_a:
        assert np.array_equal(arrays_a[key], arrays_b[key]), (
            f"{key} differs after resume"
        )


@pytest.mark.xdist_group("reference")
def test_kill_9_and_resume_is_bit_exact(reference, gcs_bucket, digits_dir, tmp_path):
    from trainer import checkpoint_catalog, checkpoint_format

    bucket = Bucket(gcs_bucket)
    scratch = str(tmp_path)
    url_b, pb = workdir_in(gcs_bucket, "b")

    rng = random.Random(20261127)
    kills = []

    def after_first_commit(run):  # A random moment once LATEST exists.
        wait_for(lambda: bucket.latest(pb) is not None, run)
        time.sleep(rng.uniform(0.0, 1.5))

    def during_upload(run):  # A folder newer than LATEST: an upload in flight.
        floor = bucket.latest(pb) or 0

        def uploading():
            latest = bucket.latest(pb) or 0
            return any(s > max(latest, floor) for s in bucket.folders(pb))

        wait_for(uploading, run)

    def mid_finetune(run):  # The next start resumes with restored Adam slots.
        wait_for(lambda: (bucket.latest(pb) or 0) >= TOTAL_STEPS - 2, run)
        time.sleep(rng.uniform(0.0, 0.2))

    moments = [after_first_commit, during_upload, mid_finetune]
    for moment in moments:
        run = Run(train_args(digits_dir, url_b), scratch)
        moment(run)
        step_before = bucket.latest(pb)
        run.kill(signal.SIGKILL)
        code = run.wait()
        kills.append((moment.__name__, step_before, code))
        if code == 0:  # Finished before the kill landed: nothing left to resume.
            break
        assert code == -signal.SIGKILL, run.describe()
    for _ in range(3):
        run = run_to_end(train_args(digits_dir, url_b), scratch)
        if run.proc.returncode == 0:
            break
    assert run.proc.returncode == 0, run.describe()
    print("kills (moment, LATEST step before the kill, exit code):", kills)
    # At least two of the kills interrupted a run that had something to resume.
    assert (
        sum(
            1 for _, step, code in kills if code == -signal.SIGKILL and step is not None
        )
        >= 2
    ), kills

    assert_same_run(reference, Workdir(gcs_bucket, "b"), scratch)

    # Optimizer steps: the last checkpoint holding the finetune optimizer has
    # taken exactly as many steps as the uninterrupted run.
    last_mid = TOTAL_STEPS - 2  # finetune step 2 of 4
    folder = f"checkpoints/{checkpoint_catalog.checkpoint_name(last_mid)}"
    ga, _ = checkpoint_format.read(f"{reference.url}/{folder}")
    gb, _ = checkpoint_format.read(f"{url_b}/{folder}")
    iterations = [k for k in ga if k == "optimizer/iteration"]
    assert iterations, sorted(k for k in ga if k.startswith("optimizer/"))[:10]
    for key in iterations:
        assert int(ga[key]) == int(gb[key]) == last_mid - (TOTAL_STEPS - FINETUNE_STEPS)
    for key in ga:
        assert np.array_equal(ga[key], gb[key]), f"{key} differs at step {last_mid}"


# ---------------------------------------------------------------------------
# 2. SIGTERM: a checkpoint at the current step within the budget, exit 75


def _preempt_with_sigterm(bucket, prefix, args, scratch, *, min_latest=1):
    run = Run(args, scratch)
    wait_for(lambda: (bucket.latest(prefix) or 0) >= min_latest, run)
    time.sleep(0.3)  # Mid-epoch, past the commit.
    sent = time.monotonic()
    run.kill(signal.SIGTERM)
    code = run.wait()
    return run, code, time.monotonic() - sent


class Preempted(Workdir):
    """A workdir left by a run stopped with SIGTERM, and how that run ended."""

    run: Run
    code: int
    seconds: float  # From SIGTERM to exit.


def preempted_run(digits_dir: str, scratch: str) -> Preempted:
    """One run stopped by SIGTERM past its 4th step (conftest's `preempted`
    fixture). Each test resumes its own byte-for-byte copy of the workdir
    (see `copy_workdir`)."""
    left = Preempted(new_bucket(), "preempted")
    args = train_args(digits_dir, left.url)
    left.run, left.code, left.seconds = _preempt_with_sigterm(
        left.bucket, left.prefix, args, scratch, min_latest=4
    )
    return left


@pytest.mark.xdist_group("reference")
def test_without_a_saved_model_the_export_says_how_to_write_one(
    reference, gcs_bucket, capsys
):
    """train.export_saved_model = false (SMALL): the completion writes
    model.keras only and says so; the `trainer export` it names writes the
    SavedModel from the same checkpoint."""
    from tests.test_cli import run

    step = summary(reference.bucket, reference.prefix)["export"]["step"]
    later = f"`trainer export --workdir={reference.url} --step={step}` writes one"
    note = f"no SavedModel: train.export_saved_model = false; {later}"
    assert f"serving: none ({note})" in reference.stdout, reference.stdout
    record = json.loads(reference.bucket.read(f"{reference.prefix}export/export.json"))
    assert (record["saved_model"], record["note"]) == (None, note)
    names = [b.name for b in reference.bucket.client.list_blobs(reference.bucket.name)]
    assert f"{reference.prefix}export/model.keras" in names
    assert not [n for n in names if "/saved_model/" in n]

    w = copy_workdir(reference, gcs_bucket, "exported")
    done = run(capsys, "export", f"--workdir={w.url}", f"--step={step}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"serving: {w.url}/export/saved_model/1 " in done.stdout, done.stdout
    record = json.loads(w.bucket.read(f"{w.prefix}export/export.json"))
    assert record["step"] == step and "note" not in record
    assert w.bucket.read(f"{w.prefix}export/saved_model/1/saved_model.pb")


@pytest.mark.xdist_group("reference")
def test_sigterm_saves_current_step_and_exits_75(
    preempted, gcs_bucket, digits_dir, tmp_path
):
    run = preempted.run
    assert preempted.code == 75, run.describe()
    assert preempted.seconds < 25, (
        f"exit {preempted.seconds:.1f}s after SIGTERM; the budget is 25s"
    )
    assert "SIGTERM" in run.output() and "run the same command again" in run.stderr
    # data.cache_features = "auto" on this short frozen phase: 1,438 + 52
    # records to build, 2 x (3 x 8 + 52) passes without the cache.
    assert (
        "phase 'transfer' on cached features: no (building it takes 1,490 backbone "
        "passes, more than the 152 the phase makes without it"
    ) in run.stdout
    w = copy_workdir(preempted, gcs_bucket, "w")
    s = summary(w.bucket, w.prefix)
    assert s["status"] == "preempted"
    assert 0 < s["global_step"] < TOTAL_STEPS
    latest = w.bucket.latest(w.prefix)
    assert latest == s["global_step"] == s["last_durable_step"]
    assert state_of(w.bucket, w.prefix, latest)["global_step"] == s["global_step"]

    again = run_to_end(train_args(digits_dir, w.url), str(tmp_path))
    assert again.proc.returncode == 0, again.describe()
    assert f"resuming from step {latest}" in again.stdout
    s = summary(w.bucket, w.prefix)
    assert s["status"] == "completed" and s["global_step"] == TOTAL_STEPS


# ---------------------------------------------------------------------------
# 3. A corrupt or missing newest checkpoint: warn, name the lost step, fall back


def _flip_a_byte(bucket, folder: str) -> None:
    blob = bucket.bucket.blob(f"{folder}arrays-00000.bin")
    data = bytearray(blob.download_as_bytes())
    data[len(data) // 2] ^= 0x01
    blob.upload_from_string(bytes(data))


def _delete_folder(bucket, folder: str) -> None:
    assert bucket.delete_prefix(folder) > 0


def _truncate_array_shard(bucket, folder: str) -> None:
    blob = bucket.bucket.blob(f"{folder}arrays-00000.bin")
    blob.upload_from_string(blob.download_as_bytes()[:-1000])


def _state_not_json(bucket, folder: str) -> None:
    """state.json garbled, and the manifest updated to match: only the JSON
    parse can tell."""
    import google_crc32c

    garbage = b"{this is not json"
    bucket.bucket.blob(f"{folder}state.json").upload_from_string(garbage)
    manifest = json.loads(bucket.read(f"{folder}manifest.json"))
    manifest["files"]["state.json"] = {
        "size": len(garbage),
        "crc32c": google_crc32c.value(garbage),
    }
    bucket.bucket.blob(f"{folder}manifest.json").upload_from_string(
        json.dumps(manifest)
    )


@pytest.mark.parametrize(
    "damage, reported",
    [
        (_flip_a_byte, "CRC32C"),
        (_delete_folder, "missing"),
        (_truncate_array_shard, "the manifest says"),
        (_state_not_json, "unreadable metadata"),
    ],
    ids=[
        "corrupt_newest",
        "deleted_latest_target",
        "truncated_shard",
        "state_not_json",
    ],
)
@pytest.mark.xdist_group("reference")
def test_bad_newest_checkpoint_falls_back(
    preempted, gcs_bucket, digits_dir, tmp_path, damage, reported
):
    assert preempted.code == 75, preempted.run.describe()
    w = copy_workdir(preempted, gcs_bucket, "w")
    bucket, prefix, args = w.bucket, w.prefix, train_args(digits_dir, w.url)
    newest = bucket.latest(prefix)
    older = sorted(s for s in bucket.folders(prefix) if s < newest)
    assert older, (newest, bucket.folders(prefix))

    damage(bucket, f"{prefix}checkpoints/ckpt-{newest:09d}/")

    again = run_to_end(args, str(tmp_path))
    assert again.proc.returncode == 0, again.describe()
    out = again.output()
    assert re.search(rf"checkpoint step {newest} .*{reported}", out), out[-4000:]
    assert f"restored step {older[-1]} instead of step {newest}" in out, out[-4000:]
    assert f"resuming from step {older[-1]}" in again.stdout
    assert summary(bucket, prefix)["global_step"] == TOTAL_STEPS


# ---------------------------------------------------------------------------
# 4. Two trainers on one workdir: the newer wins, the stale one exits 2


def test_two_trainers_newer_wins_latest_only_moves_forward(
    gcs_bucket, digits_dir, tmp_path
):
    bucket = Bucket(gcs_bucket)
    url, prefix = workdir_in(gcs_bucket, "w")
    args = train_args(digits_dir, url)
    seen: list[int] = []
    stop = threading.Event()

    def watch_latest():
        while not stop.is_set():
            step = bucket.latest(prefix)
            if step is not None and (not seen or seen[-1] != step):
                seen.append(step)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_latest, daemon=True)
    watcher.start()
    try:
        first = Run(args, str(tmp_path))
        wait_for(lambda: bucket.latest(prefix) is not None, first)
        # The old machine stalls (a VM still flushing, a Colab kernel left
        # behind) while the new one claims the workdir and resumes.
        first.proc.send_signal(signal.SIGSTOP)
        second = Run(args, str(tmp_path))
        wait_for(lambda: "resuming from step" in second.stdout, second)
        first.proc.send_signal(signal.SIGCONT)
        code1 = first.wait()
        code2 = second.wait()
    finally:
        stop.set()
        watcher.join()
    assert code1 == 2, first.describe()
    assert "taken over by another trainer" in first.stderr
    assert f"pid {second.proc.pid}" in first.stderr, first.stderr[-2000:]
    assert "Traceback" not in first.stderr
    assert code2 == 0, second.describe()
    assert seen == sorted(seen) and len(seen) == len(set(seen)), seen
    assert seen[-1] == TOTAL_STEPS
    assert summary(bucket, prefix)["status"] == "completed"


# ---------------------------------------------------------------------------
# 5 + 6. --deadline stops with a checkpoint; a shape change is refused on
# resume, a learning-rate change accepted


def test_deadline_then_spec_change_on_resume(gcs_bucket, digits_dir, tmp_path):
    bucket = Bucket(gcs_bucket)
    scratch = str(tmp_path)
    url, prefix = workdir_in(gcs_bucket, "w")
    # The deadline less the 25 s save budget has passed by the first step.
    run = run_to_end(train_args(digits_dir, url, "--deadline=26s"), scratch)
    assert run.proc.returncode == 75, run.describe()
    assert "deadline" in run.output()
    s = summary(bucket, prefix)
    assert s["status"] == "preempted" and 0 < s["global_step"] < TOTAL_STEPS
    assert bucket.latest(prefix) == s["global_step"]

    refused = run_to_end(train_args(digits_dir, url, "--set=model.dense=[64]"), scratch)
    assert refused.proc.returncode == 2, refused.describe()
    assert "model.dense: was [32], now [64]" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    assert bucket.latest(prefix) == s["global_step"]  # Nothing moved.

    lr = run_to_end(
        train_args(digits_dir, url, "--set=phases.transfer.learning_rate=0.002"),
        scratch,
    )
    assert lr.proc.returncode == 0, lr.describe()
    assert re.search(
        r"note: spec changed .*learning_rate.*0\.001 -> 0\.002", lr.stdout
    ), lr.stdout[-2000:]
    assert f"resuming from step {s['global_step']}" in lr.stdout
    s = summary(bucket, prefix)
    assert s["status"] == "completed" and s["global_step"] == TOTAL_STEPS


@pytest.mark.slow
def test_resnet50_xla_kill_9_mid_finetune_is_bit_exact(digits_dir, tmp_path):
    """The demo's own recipe (ResNet50, XLA fine-tune from res5a_branch2a), killed
    mid-finetune with Adam slots in the checkpoint, ends bit for bit equal."""
    args = [
        "--job=jobs/digits.toml",
        f"--set=data.train={digits_dir}/train-*.tfrecord",
        # One validation shard, and XLA only where the test looks (fine-tune):
        # each of the three starts compiles it.
        f"--set=data.validation={digits_dir}/validation-00000-of-00007.tfrecord",
        "--set=train.deterministic=true",
        "--set=train.global_batch_size=16",
        "--set=phases.transfer.jit_compile=false",
        "--set=train.checkpoint_every_steps=2",
        "--set=phases.transfer.epochs=1",
        "--set=phases.transfer.steps_per_epoch=4",
        "--set=phases.finetune.epochs=1",
        "--set=phases.finetune.steps_per_epoch=4",
        "--set=phases.finetune.jit_compile=true",
        "--set=train.export_saved_model=false",  # Weights are compared.
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "trainer", "train", *args]
    done = subprocess.run(
        [*cmd, f"--workdir={a}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]

    first = subprocess.Popen(
        [*cmd, f"--workdir={b}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = b / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "ckpt-000000006":
            break
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed"
    first.kill()  # SIGKILL: no handler runs, nothing is flushed.
    first.wait()

    again = subprocess.run(
        [*cmd, f"--workdir={b}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"resuming from step [68]: phase 'finetune'", again.stdout), (
        again.stdout
    )

    import keras

    import trainer.models  # noqa: F401  (registers the preprocessing layer)

    wa = keras.saving.load_model(a / "export" / "model.keras").get_weights()
    wb = keras.saving.load_model(b / "export" / "model.keras").get_weights()
    assert len(wa) == len(wb)
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))

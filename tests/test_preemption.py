"""Preemption watcher: real signals, a real metadata endpoint, deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests import gce_metadata
from trainer import preemption
from trainer.preemption import PreemptionWatcher, parse_duration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent(
    """
    import sys, time
    from trainer.preemption import PreemptionWatcher

    watcher = PreemptionWatcher()
    watcher.install()
    print("ready", flush=True)
    steps = 0
    while watcher.reason() is None:  # The training loop: one step at a time.
        time.sleep(0.01)
        steps += 1
        if steps > 3000:
            sys.exit(1)
    print("stopping:", watcher.reason(), flush=True)
    sys.exit(75)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_real_signal_in_subprocess_exits_75(signum):
    env = {**os.environ, "PYTHONPATH": REPO}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signum)
        out, _ = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 75
    assert f"stopping: {signal.Signals(signum).name}" in out


def test_second_sigint_raises_keyboard_interrupt():
    watcher = PreemptionWatcher()
    watcher.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python runs the handler at the next bytecode.
        assert watcher.reason() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        watcher.stop()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_install_outside_main_thread_raises():
    errors = []
    thread = threading.Thread(
        target=lambda: errors.append(
            pytest.raises(RuntimeError, PreemptionWatcher().install)
        )
    )
    thread.start()
    thread.join()
    assert "main thread" in str(errors[0].value)


def test_metadata_watch_hangs_until_the_flip():
    with gce_metadata.serve({"instance/preempted": "FALSE"}) as server:
        url = f"{server.url}/instance/preempted"
        # A 60 s poll period: only a hanging GET can see the flip in time.
        watcher = PreemptionWatcher(metadata_url=url, poll_seconds=60)
        try:
            assert watcher.start_metadata_watch()
            deadline = time.monotonic() + 5
            while server.hanging < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.hanging == 1
            assert watcher.reason() is None  # "FALSE" is not preempted.
            flipped = time.monotonic()
            server.set("instance/preempted", "TRUE")
            while watcher.reason() is None and time.monotonic() < flipped + 5:
                time.sleep(0.01)
            assert watcher.reason() == "gce-preempted"
            assert time.monotonic() - flipped < 1.0
            assert server.requests == 2  # One read, one hanging GET: no polling.
        finally:
            watcher.stop()


def test_metadata_watch_sees_a_notice_given_before_it_started():
    with gce_metadata.serve({"instance/preempted": "TRUE"}) as server:
        watcher = PreemptionWatcher(
            metadata_url=f"{server.url}/instance/preempted", poll_seconds=60
        )
        try:
            watcher.start_metadata_watch()
            deadline = time.monotonic() + 5
            while watcher.reason() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert watcher.reason() == "gce-preempted"
        finally:
            watcher.stop()


def test_metadata_watch_keeps_going_through_server_errors():
    with gce_metadata.serve({}) as server:  # 404 until the key exists.
        url = f"{server.url}/instance/preempted"
        watcher = PreemptionWatcher(metadata_url=url, poll_seconds=0.05)
        try:
            watcher.start_metadata_watch()
            deadline = time.monotonic() + 5
            while server.requests < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.requests >= 2 and watcher.reason() is None
            server.set("instance/preempted", "TRUE")
            while watcher.reason() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert watcher.reason() == "gce-preempted"
        finally:
            watcher.stop()


def test_metadata_url_auto_watches_on_gce_only():
    assert preemption.metadata_url("auto", "gce") == preemption.GCE_PREEMPTED_URL
    for platform in ("local", "vertex", "colab", "kaggle"):
        assert preemption.metadata_url("auto", platform) is None
    assert preemption.metadata_url("", "gce") is None
    assert preemption.metadata_url("http://x/y", "local") == "http://x/y"
    assert not PreemptionWatcher(metadata_url=None).start_metadata_watch()


def test_deadline_fires_a_budget_early():
    watcher = PreemptionWatcher(
        deadline_seconds=0.6, budget_seconds=0.3, started_at=time.time()
    )
    assert watcher.reason() is None
    time.sleep(0.35)
    assert watcher.reason() == "deadline"


def test_deadline_counts_from_process_start():
    started = preemption.process_start_time()
    age = time.time() - started
    assert 0 < age < 24 * 3600
    # This process has run for `age` seconds: a deadline a little shorter has
    # passed, one an hour longer has not.
    assert PreemptionWatcher(
        deadline_seconds=age - 0.01, budget_seconds=0
    ).reason() == ("deadline")
    assert (
        PreemptionWatcher(deadline_seconds=age + 3600, budget_seconds=0).reason()
        is None
    )


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("11h30m", 41400),
        ("90s", 90),
        ("1h", 3600),
        ("45m", 2700),
        ("1h5m30s", 3930),
        ("2.5h", 9000),
        (" 10M ", 600),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "90", "1d", "h", "30m1h", "0s", "1h 30m"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match='e.g. "11h30m"'):
        parse_duration(text)


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(ln for ln in f if ln.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (signum - 1) & 1)


def test_sigterm_before_training_began_exits_75(digits_dir, tmp_path):
    """From the moment `train` parses its flags, not only once the loop
    watches: a spot VM's script counts 143 (killed) as a failure, 75 as a
    preemption. Sent while TensorFlow is still being imported."""
    workdir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-m", "trainer", "train", "--job=jobs/digits.toml",
         f"--workdir={workdir}", f"--set=data.train={digits_dir}/train-*.tfrecord",
         f"--set=data.validation={digits_dir}/validation-*.tfrecord"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _catches(child.pid, signal.SIGTERM):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 75, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "stopped (stopping: SIGTERM before training began): run the same command "
        "again to resume"
    )
    assert not (workdir / "checkpoints").exists()

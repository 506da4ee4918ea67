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
from trainer.preemption import Preempted, PreemptionWatcher, parse_duration

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
        watcher.uninstall()
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


def test_metadata_poll_against_local_server():
    with gce_metadata.serve({"instance/preempted": "FALSE"}) as server:
        url = f"{server.url}/instance/preempted"
        watcher = PreemptionWatcher(metadata_url=url, poll_seconds=0.05)
        try:
            assert watcher.start_metadata_poll()
            deadline = time.monotonic() + 5
            while server.requests < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert watcher.reason() is None  # "FALSE" is not preempted.
            server.values["instance/preempted"] = "TRUE"
            while watcher.reason() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert watcher.reason() == "gce-preempted"
            with pytest.raises(Preempted, match="gce-preempted"):
                watcher.check()
        finally:
            watcher.uninstall()


def test_metadata_auto_is_off_outside_gce():
    if preemption.on_gce():
        pytest.skip("running on GCE")
    assert not PreemptionWatcher(metadata_url="auto").start_metadata_poll()
    assert not PreemptionWatcher(metadata_url=None).start_metadata_poll()


def test_deadline_fires_a_budget_early():
    watcher = PreemptionWatcher(
        deadline_seconds=0.6, budget_seconds=0.3, started_at=time.time()
    )
    assert watcher.reason() is None
    time.sleep(0.35)
    assert watcher.reason() == "deadline"


def test_deadline_counts_from_process_start():
    started = preemption.process_start_time()
    assert started <= time.time()
    assert time.time() - started < 24 * 3600
    assert PreemptionWatcher(deadline_seconds=1, budget_seconds=0).reason() in (
        None,
        "deadline",
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

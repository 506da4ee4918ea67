"""Preemption: SIGTERM/SIGINT, GCE's metadata `preempted` flag, session deadlines.

The watcher only records *that* the run must stop and why; the training loop
checks `reason()` after each step, saves a checkpoint synchronously within the
budget and exits 75. Signal handlers therefore do nothing but set a flag (a
second SIGINT still raises KeyboardInterrupt, for a user who means it).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
import urllib.request

log = logging.getLogger(__name__)

GCE_PREEMPTED_URL = (
    "http://metadata.google.internal/computeMetadata/v1/instance/preempted"
)

_DURATION_RE = re.compile(
    r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$"
)


class Preempted(Exception):
    """The run must stop now; `reason` says why ("SIGTERM", "deadline", ...)."""

    def __init__(self, reason: str):
        super().__init__(f"stopping: {reason}")
        self.reason = reason


def parse_duration(text: str) -> float:
    """Seconds in a duration such as "11h30m", "45m", "90s", "1h", "1h5m30s".

    Raises:
      ValueError: naming the text and the accepted forms.
    """
    match = _DURATION_RE.match(text.strip().lower()) if text else None
    total = 0.0
    if match:
        hours, minutes, seconds = (float(match.group(g) or 0) for g in "hms")
        total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(
            f"duration: received {text!r}; expected a positive duration in hours, "
            "minutes and/or seconds with units, largest first, e.g. "
            '"11h30m", "45m", "90s", "1h", "1h5m30s"'
        )
    return total


def on_gce() -> bool:
    """True on a Google Compute Engine VM (no network call, never hangs)."""
    if os.environ.get("GCE_METADATA_HOST"):
        return True
    try:
        with open("/sys/class/dmi/id/product_name", encoding="utf-8") as f:
            return "Google" in f.read()
    except OSError:
        return False


def process_start_time() -> float:
    """This process's start, in `time.time()` seconds (now if unknown)."""
    try:
        with open("/proc/self/stat", encoding="utf-8") as f:
            # Field 22 (starttime, in clock ticks since boot) follows the
            # parenthesized command name, which may itself hold spaces.
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", encoding="utf-8") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class PreemptionWatcher:
    """Tells the training loop when to save and stop.

    Args:
      deadline_seconds: the session's length from `started_at` (`--deadline`);
        None for no deadline.
      budget_seconds: the time a synchronous save needs. The deadline fires
        this much early, so the save completes before the session ends.
      metadata_url: the GCE metadata `instance/preempted` URL to poll; "auto"
        polls the real one only on GCE; None or "" polls nothing.
      poll_seconds: the metadata polling period.
      started_at: `time.time()` the deadline counts from; default: the start
        of this process.
    """

    def __init__(
        self,
        *,
        deadline_seconds: float | None = None,
        budget_seconds: float = 25.0,
        metadata_url: str | None = None,
        poll_seconds: float = 5.0,
        started_at: float | None = None,
    ):
        if deadline_seconds is not None and deadline_seconds <= 0:
            raise ValueError(
                f"deadline_seconds: received {deadline_seconds!r}; expected > 0"
            )
        if budget_seconds < 0:
            raise ValueError(
                f"budget_seconds: received {budget_seconds!r}; expected >= 0"
            )
        self.deadline_seconds = deadline_seconds
        self.budget_seconds = budget_seconds
        self.metadata_url = metadata_url
        self.poll_seconds = poll_seconds
        self.started_at = process_start_time() if started_at is None else started_at
        self._reason: str | None = None
        self._previous: dict[int, object] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- signals -------------------------------------------------------------

    def install(self) -> None:
        """Installs SIGTERM and SIGINT handlers that only set the reason.

        Raises:
          RuntimeError: when not called from the main thread (Python delivers
            signals there only).
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionWatcher.install() must run in the main thread "
                "(Python only delivers signals there)"
            )
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        """Restores the previous handlers and stops the metadata poll."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=self.poll_seconds + 5)
            self._poller = None

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self._reason == "SIGINT":
            # A second Ctrl-C: the user wants out now, checkpoint or not.
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
                return
            raise KeyboardInterrupt
        if self._reason is None:
            self._reason = name
            # Safe enough in a handler: logging takes its own lock, and the
            # main thread is between bytecodes of the loop, not inside logging.
            log.warning("received %s: saving a checkpoint and stopping", name)

    # -- metadata server -------------------------------------------------------

    def start_metadata_poll(self) -> bool:
        """Starts polling the GCE metadata `preempted` flag in a daemon thread.

        Returns:
          True when polling started (a URL is set, or "auto" on GCE).
        """
        url = self.metadata_url
        if url == "auto":
            url = GCE_PREEMPTED_URL if on_gce() else None
        if not url or self._poller is not None:
            return False
        self._stop.clear()
        self._poller = threading.Thread(
            target=self._poll, args=(url,), name="preemption-poll", daemon=True
        )
        self._poller.start()
        return True

    def _poll(self, url: str) -> None:
        request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        while not self._stop.is_set() and self._reason is None:
            try:
                with urllib.request.urlopen(request, timeout=2.0) as response:
                    body = response.read(64).decode("utf-8", "replace").strip()
                if body.upper() == "TRUE":
                    self._reason = self._reason or "gce-preempted"
                    log.warning("GCE reports this VM preempted: saving and stopping")
                    return
            except OSError as e:  # Network hiccups: keep polling.
                log.debug("metadata poll of %s failed: %s", url, e)
            self._stop.wait(self.poll_seconds)

    # -- the loop's question -----------------------------------------------------

    def deadline_at(self) -> float | None:
        """`time.time()` at which the deadline fires (budget subtracted)."""
        if self.deadline_seconds is None:
            return None
        return self.started_at + self.deadline_seconds - self.budget_seconds

    def reason(self) -> str | None:
        """Why the run must stop now, or None: "SIGTERM", "SIGINT", "deadline",
        "gce-preempted". The first reason sticks."""
        if self._reason is None:
            fire_at = self.deadline_at()
            if fire_at is not None and time.time() >= fire_at:
                self._reason = "deadline"
                log.warning(
                    "deadline of %.0f s from start less a %.0f s save budget reached: "
                    "saving and stopping",
                    self.deadline_seconds,
                    self.budget_seconds,
                )
        return self._reason

    def check(self) -> None:
        """Raises Preempted(reason) when the run must stop."""
        reason = self.reason()
        if reason is not None:
            raise Preempted(reason)

    def __enter__(self) -> PreemptionWatcher:
        self.install()
        self.start_metadata_poll()
        return self

    def __exit__(self, *exc_info) -> None:
        self.uninstall()

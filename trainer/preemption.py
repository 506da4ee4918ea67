"""Preemption: SIGTERM/SIGINT, GCE's metadata `preempted` flag, session deadlines.

The watcher only records *that* the run must stop and why; the training loop
checks `reason()` after each step, saves a checkpoint synchronously within the
budget and exits 75. Signal handlers therefore do nothing but set a flag (a
second SIGINT still raises KeyboardInterrupt, for a user who means it).
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import signal
import threading
import time
import urllib.parse
import urllib.request

from trainer.errors import UsageError

log = logging.getLogger(__name__)

GCE_PREEMPTED_URL = (
    "http://metadata.google.internal/computeMetadata/v1/instance/preempted"
)

_DURATION_RE = re.compile(
    r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$"
)


class Preempted(Exception):
    """The run must stop now; `reason` says why ("SIGTERM", "deadline", ...).

    `durable` is False when it stops before a checkpoint of its own (workers
    that never came up): the workdir holds what it held.
    """

    def __init__(self, reason: str, *, durable: bool = True):
        super().__init__(f"stopping: {reason}")
        self.reason = reason
        self.durable = durable


def parse_duration(text: str, name: str = "duration") -> float:
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
        raise UsageError(
            f"{name}: received {text!r}; expected a positive duration in hours, "
            "minutes and/or seconds with units, largest first, e.g. "
            '"11h30m", "45m", "90s", "1h", "1h5m30s"'
        )
    return total


def metadata_url(value: str | None, platform: str) -> str | None:
    """The `instance/preempted` URL to watch for `train.preemption_metadata_url`.

    Args:
      value: the spec's value: "auto", a URL, or ""/None for no watch.
      platform: `runtime.detect_platform()`; "auto" watches only on "gce"
        (Vertex AI and Colab VMs are GCE underneath, but their platforms stop
        the job themselves and their metadata is not the job's own VM's).
    """
    if value == "auto":
        return GCE_PREEMPTED_URL if platform == "gce" else None
    return value or None


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

    `start()` installs the signal handlers and starts watching the GCE
    metadata flag; `stop()` undoes both. The loop asks `reason()` after each
    step.

    Args:
      deadline_seconds: the session's length from `started_at` (`--deadline`);
        None for no deadline.
      budget_seconds: the time a synchronous save needs. The deadline fires
        this much early, so the save completes before the session ends.
      metadata_url: the GCE metadata `instance/preempted` URL to watch (see
        `metadata_url()`); None watches nothing.
      poll_seconds: the pause between metadata requests when the server does
        not hang (an old or stand-in server) or errs.
      hang_seconds: how long one `wait_for_change` request may hang.
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
        hang_seconds: float = 60.0,
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
        self.hang_seconds = hang_seconds
        self.started_at = process_start_time() if started_at is None else started_at
        self._reason: str | None = None
        self._previous: dict[int, object] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Installs the signal handlers and starts the metadata watch (if any)."""
        self.install()
        self.start_metadata_watch()

    def stop(self) -> None:
        """Restores the previous signal handlers and ends the metadata watch."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._stop.set()
        if self._watcher is not None:
            # The thread is a daemon blocked in a request at worst: don't wait
            # out a hanging GET, it ends with the process.
            self._watcher.join(timeout=0.5)
            self._watcher = None

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

    def start_metadata_watch(self) -> bool:
        """Starts watching the metadata `preempted` flag in a daemon thread.

        Returns:
          True when a watch started (a URL is set and none runs yet).
        """
        if not self.metadata_url or self._watcher is not None:
            return False
        self._stop.clear()
        self._watcher = threading.Thread(
            target=self._watch, name="preemption-watch", daemon=True
        )
        self._watcher.start()
        return True

    def _watch(self) -> None:
        """Hanging GETs on the flag, so the notice is seen the moment it flips.

        The metadata server's documented pattern: read the value and its ETag,
        then `?wait_for_change=true&last_etag=ETAG`, which answers when the
        value differs from that ETag's (at once if it already does) or after
        `timeout_sec`. A server that answers at once without a change, or errs,
        is polled every `poll_seconds` instead.
        """
        etag = None
        failures = 0
        while not self._stop.is_set() and self._reason is None:
            began = time.monotonic()
            try:
                body, new_etag = self._get(etag)
            except (OSError, http.client.HTTPException) as e:  # URLError is an OSError.
                failures += 1
                log.debug("metadata watch of %s failed: %s", self.metadata_url, e)
                self._stop.wait(min(self.poll_seconds * failures, 60.0))
                continue
            failures = 0
            if body.upper() == "TRUE":
                self._reason = self._reason or "gce-preempted"
                log.warning("GCE reports this VM preempted: saving and stopping")
                return
            unchanged = new_etag is None or new_etag == etag
            etag = new_etag
            if unchanged and time.monotonic() - began < 1.0:
                self._stop.wait(self.poll_seconds)  # The server did not hang.

    def _get(self, etag: str | None) -> tuple[str, str | None]:
        url = self.metadata_url
        timeout = 5.0
        if etag is not None:
            hang = max(1, int(self.hang_seconds))
            sep = "&" if "?" in url else "?"
            url += (
                f"{sep}wait_for_change=true&timeout_sec={hang}"
                f"&last_etag={urllib.parse.quote(etag)}"
            )
            timeout += hang
        request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(64).decode("utf-8", "replace").strip()
            return body, response.headers.get("ETag")

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

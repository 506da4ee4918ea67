"""One background job at a time, whose failure surfaces at the next call."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable


class BackgroundWriter:
    """Runs one job at a time on a worker thread (single flight).

    A job's exception is raised, once, by the next `submit`, `wait` or
    `close`: a background upload cannot fail silently, and the caller learns
    of it at a point where it can still act (stop before the next save).

    Args:
      name: the worker thread's name, for thread dumps and logs.
    """

    def __init__(self, name: str):
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name
        )
        self._future: concurrent.futures.Future | None = None

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        """Waits for the previous job, then starts `job(*args)` in the background.

        Raises:
          BaseException: whatever the previous job raised; `job` is not started.
        """
        self.wait()
        self._future = self._pool.submit(job, *args)

    def wait(self) -> None:
        """Blocks until no job is in flight; re-raises its exception, once."""
        future = self._future
        if future is None:
            return
        # An interrupt (Ctrl-C) while waiting leaves the job to wait for again.
        concurrent.futures.wait([future])
        self._future = None
        future.result()

    def close(self) -> None:
        """Waits for the job in flight (re-raising its exception); ends the thread."""
        try:
            self.wait()
        finally:
            # No job is left unless the wait was interrupted; then the
            # interrupt goes up now rather than after the upload.
            self._pool.shutdown(wait=False)

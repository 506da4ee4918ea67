"""Step checkpoints of one workdir: claim, save in the background, commit, restore."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Literal, Mapping

import numpy as np

from trainer import checkpoint_catalog, checkpoint_format, storage
from trainer import workdir as workdir_layout
from trainer.background import BackgroundWriter
from trainer.errors import CheckpointError
from trainer.fence import Fence

log = logging.getLogger(__name__)

Variables = Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]


class CheckpointManager:
    """Writes, commits, retains and restores the step checkpoints of one workdir.

    A checkpoint folder is written in full (data, then its manifest), every
    file is confirmed in the store, and only then LATEST is rewritten to name
    it, on condition that this trainer still owns the workdir (big_vision and
    Composer do the same: "File operations are cheap to make atomic"). Older
    committed folders are the fallbacks of `restore`, loaded only when
    complete and verified.

    The training loop calls, in order: `claim()` (chief), `restore()`, then
    `save(step, ...)` every N steps and at phase ends, `save(..., blocking=True)`
    on preemption, and `close()` at exit.

    Args:
      workdir: any fsspec URL or local path; checkpoints go to `{workdir}/checkpoints`.
      keep: how many of the newest checkpoints to keep (the `best_step` passed
        to `save` is kept besides).
      monitor: the name of the metric passed to `save(metric=...)`. Recorded
        in each manifest only: the caller decides which step is the best.
      mode: "max" if a larger metric is better (accuracy), "min" for a loss;
        recorded in each manifest only.
      is_chief: only the chief claims and writes; every worker can restore.
    """

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 3,
        monitor: str = "val_accuracy",
        mode: Literal["max", "min"] = "max",
        is_chief: bool = True,
    ):
        if keep < 1:
            raise ValueError(f"keep: received {keep!r}; expected an integer >= 1")
        if mode not in ("max", "min"):
            raise ValueError(f"mode: received {mode!r}; expected 'max' or 'min'")
        self.directory = workdir_layout.checkpoints(workdir)
        self.keep = keep
        self.monitor = monitor
        self.mode = mode
        self.is_chief = is_chief
        self._fence = Fence(self.directory, workdir)
        self._writer = BackgroundWriter("checkpoint")
        # Newest step committed or restored by us: LATEST never goes behind it.
        self._floor: int | None = None
        self._last_requested: int | None = None
        self._last_durable: int | None = None
        self._closed = False

    def checkpoint_url(self, step: int) -> str:
        """The URL of the folder of the checkpoint at `step`."""
        return storage.join(self.directory, checkpoint_catalog.checkpoint_name(step))

    def latest_step(self) -> int | None:
        """The step LATEST names, or None when nothing has been committed."""
        return checkpoint_catalog.latest_step(self.directory)

    @property
    def committed_step(self) -> int | None:
        """The newest step LATEST names that this manager committed, restored
        or found at `claim`: where running again resumes."""
        return self._floor

    @property
    def last_durable_step(self) -> int | None:
        """The newest step this manager committed (None before the first)."""
        return self._last_durable

    def claim(self) -> None:
        """Makes this trainer the owner of the workdir (chief only; no-op else).

        The newest claim wins at once: any earlier trainer's next commit is
        refused with FencedError.
        """
        if not self.is_chief:
            return
        self._fence.claim()
        self._floor = self.latest_step()
        owner = self._fence.owner
        log.info(
            "claimed %s for host %s pid %d (LATEST: %s)",
            self.directory,
            owner["host"],
            owner["pid"],
            self._floor,
        )

    def check_owner(self, step: int, doing: str) -> None:
        """Raises FencedError when another trainer claimed the workdir: before
        writes that no commit fences (the completion's export and summary)."""
        if self.is_chief:
            self._fence.check(step, doing)

    def save(
        self,
        step: int,
        variables: Variables,
        state: Mapping[str, Any],
        *,
        best_step: int | None = None,
        metric: float | None = None,
        blocking: bool = False,
    ) -> None:
        """Snapshots now, writes and commits in the background (chief only).

        Waits first for the previous save's upload (at most one in flight) and
        re-raises its failure. Then takes `variables` (a dict is copied; a
        callable is called and its fresh values are used: numpy arrays, or
        immutable tensors copied to the host in the background), serializes `state` to JSON, and returns while the background writer
        writes, confirms, commits LATEST and applies retention.

        Args:
          step: the global step; must not be behind a step committed or
            restored. The step saved or restored last is a no-op (after the
            wait), so the preemption path can always call save(blocking=True).
          variables: {key: array}, or a function returning that (e.g.
            `lambda: models.device_snapshot(model, optimizer)`).
          state: JSON-serializable loop state, returned by `restore` as is.
          best_step: the step of the best monitored metric so far (the
            training state tracks it), which retention keeps besides the
            newest; None when there is none yet.
          metric: the monitored validation metric at this step, recorded in
            the manifest; None when there is none.
          blocking: wait until the checkpoint is committed (preemption path).

        Raises:
          FencedError: another trainer claimed the workdir (possibly raised by
            the next `save`/`wait` when the background commit found it).
          CheckpointError: bad step, not claimed, or a background failure.
        """
        if not self.is_chief:
            return
        self._check_can_save()
        self.wait()
        if self._is_saved(step):
            return
        arrays = _host_copy(variables)
        state_bytes = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
        self._last_requested = step
        self._writer.submit(
            self._write_and_commit, step, arrays, state_bytes, best_step, metric
        )
        if blocking:
            self.wait()

    def wait(self) -> None:
        """Blocks until no save is in flight; re-raises a background failure."""
        self._writer.wait()

    def close(self, *, raise_errors: bool = True) -> None:
        """Drains the in-flight save; idempotent.

        Args:
          raise_errors: re-raise the save's failure (False while another error
            is already on its way up: that one is logged instead).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.close()
        except Exception as e:
            if raise_errors:
                raise
            log.warning("the checkpoint save in flight failed too: %s", e)

    def restore(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """Loads the newest valid committed checkpoint.

        Every file is checked against the manifest (size and CRC32C) before
        anything is returned. If the checkpoint LATEST names is incomplete or
        corrupt, a warning names the step lost and the previous one is tried.

        Returns:
          `(arrays, state)`, the arrays read-only views of one buffer, or None
          when nothing was ever committed (no LATEST, or an empty one).

        Raises:
          CheckpointError: LATEST names a checkpoint but none at or before it
            can be loaded. Starting from scratch then would silently throw a
            run's progress away, so the caller must decide (delete the folder).
        """
        self.wait()
        latest = self.latest_step()
        folders = checkpoint_catalog.folder_steps(self.directory)
        if latest is None:
            if folders:
                log.warning(
                    "%s holds checkpoint folders (steps %s) but no LATEST names one; "
                    "they were never committed and are ignored",
                    self.directory,
                    ", ".join(map(str, folders)),
                )
            return None
        candidates = sorted({latest, *(s for s in folders if s <= latest)})
        step, restored = self._load_newest_valid(candidates)
        if step != latest:
            log.warning(
                "restored step %d instead of step %d (LATEST): the steps after "
                "%d are lost and will be trained again",
                step,
                latest,
                step,
            )
        if self.is_chief:
            self._floor = step
        log.info("restored checkpoint step %d from %s", step, self.directory)
        return restored

    def _check_can_save(self) -> None:
        if self._closed:
            raise CheckpointError("save() after close()")
        if self._fence.owner is None:
            raise CheckpointError(
                "save() before claim(): the chief must claim the workdir first"
            )

    def _is_saved(self, step: int) -> bool:
        """Whether `step` is saved already; refuses a step behind the last one."""
        last = max(
            (s for s in (self._floor, self._last_requested) if s is not None),
            default=None,
        )
        if last is not None and step < last:
            raise CheckpointError(
                f"cannot save step {step}: {self.directory} already has step {last} "
                "and LATEST never moves backwards"
            )
        # E.g. a preemption right after a cadence save: the wait made it durable.
        return step == last

    def _write_and_commit(
        self,
        step: int,
        arrays: dict[str, Any],
        state: bytes,
        best_step: int | None,
        metric: float | None,
    ) -> None:
        """The background half of `save`: write, confirm, commit, retain."""
        start = time.monotonic()
        self._fence.check(step)
        folder = self.checkpoint_url(step)
        manifest = {
            "step": step,
            "metric": metric,
            "monitor": self.monitor,
            "mode": self.mode,
            "writer": {k: v for k, v in self._fence.owner.items() if k != "token"},
        }
        files = checkpoint_format.write(folder, _to_host(arrays), state, manifest)
        self._fence.commit(step)
        self._floor = self._last_durable = step
        log.info(
            "checkpoint step %d durable at %s (%.1f MB in %.1f s)",
            step,
            folder,
            sum(f["size"] for f in files.values()) / 1e6,
            time.monotonic() - start,
        )
        try:
            self._retain(best_step)
        except Exception as e:  # Old folders left behind cost space, not state.
            log.warning("retention in %s failed: %s", self.directory, e)

    def _retain(self, best_step: int | None) -> None:
        """Deletes committed folders beyond the newest `keep` and `best_step`."""
        steps = checkpoint_catalog.folder_steps(self.directory)
        committed = [s for s in steps if s <= self._floor]
        for step in checkpoint_catalog.steps_to_delete(committed, self.keep, best_step):
            storage.rm(self.checkpoint_url(step), recursive=True)
            log.info("deleted checkpoint step %d (retention)", step)

    def _load_newest_valid(
        self, candidates: list[int]
    ) -> tuple[int, tuple[dict[str, np.ndarray], dict[str, Any]]]:
        """The newest of `candidates` that loads, and its (arrays, state)."""
        problems = []
        for step in reversed(candidates):
            try:
                return step, checkpoint_format.read(self.checkpoint_url(step))
            except CheckpointError as e:
                problems.append(f"step {step}: {e}")
                log.warning(
                    "checkpoint step %d in %s cannot be used (%s); falling back to "
                    "the previous checkpoint: the training after it is lost",
                    step,
                    self.directory,
                    e,
                )
        raise CheckpointError(
            f"LATEST in {self.directory} names step {candidates[-1]} but no "
            f"checkpoint at or before it can be loaded ({'; '.join(problems)}). "
            f"Delete {self.directory} to start this run over, or point --workdir "
            "elsewhere."
        )


def _host_copy(variables: Variables) -> dict[str, Any]:
    """The arrays to save: a dict is copied now; a callable's fresh values
    (numpy arrays, or immutable tensors `_to_host` copies later) are used."""
    if callable(variables):
        arrays = dict(variables())
    else:
        arrays = {k: np.array(v, copy=True) for k, v in variables.items()}
    for key, value in arrays.items():
        if not isinstance(key, str) or not (
            isinstance(value, np.ndarray) or hasattr(value, "__array__")
        ):
            raise TypeError(
                f"variables: key {key!r} holds {type(value).__name__}; expected "
                "str keys and numpy arrays (or tensors)"
            )
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise TypeError(f"variables[{key!r}]: object arrays cannot be saved")
    return arrays


def _to_host(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """Host arrays of `arrays`, in the background thread; each tensor is let go
    as soon as it is copied (at most one extra copy of the state at a time)."""
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):
            arrays[key] = value = np.asarray(value)
        if value.dtype.hasobject:
            raise TypeError(f"variables[{key!r}]: object arrays cannot be saved")
    return arrays

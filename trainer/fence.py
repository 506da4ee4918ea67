"""Fencing a checkpoint directory: the OWNER claim, the conditional LATEST commit."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
import uuid
from typing import Any, Callable, Iterator

from trainer import storage
from trainer.checkpoint_catalog import LATEST, checkpoint_name
from trainer.errors import CheckpointError, FencedError

OWNER = "OWNER"


class Fence:
    """Makes this trainer the owner of a checkpoint directory; commits only as it.

    Fencing, not locking: `claim` makes this trainer the owner at once (the
    newest start always wins, nobody waits for a lease), and every LATEST
    commit is conditional on still being the owner. On gs:// this is a
    generation precondition: `claim` rewrites OWNER and then LATEST, so a
    stale writer's commit, conditional on the LATEST generation it last saw,
    is refused by GCS itself. On a local disk an fcntl lock covers "compare
    OWNER's token, write LATEST"; memory:// uses a process lock. A refused
    commit raises `FencedError` naming the new owner.

    Args:
      directory: the checkpoint directory, `{workdir}/checkpoints`.
      workdir: the run's workdir, for messages.
    """

    def __init__(self, directory: str, workdir: str):
        self.directory = directory
        self.workdir = workdir
        # This trainer's OWNER record, once claimed: {host, pid, started, token}.
        self.owner: dict[str, Any] | None = None
        self._latest_generation = 0  # gs:// only

    def claim(self) -> None:
        """Makes this trainer the owner; any earlier owner's next commit fails."""
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _now(),
            "token": uuid.uuid4().hex,
        }
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        if storage.supports_generations(self.directory):
            self._swap(self._url(OWNER), lambda _: data)
            # Rewrite LATEST too (same text): any commit still in flight from an
            # earlier owner is conditional on the old generation and now fails.
            self._latest_generation = self._swap(
                self._url(LATEST), lambda old: old or b""
            )
        else:
            storage.makedirs(self.directory)
            with self._locked():
                storage.write_bytes(self._url(OWNER), data)
        self.owner = record

    def check(self, step: int, doing: str = "") -> None:
        """Fails fast, before an upload, when another trainer has claimed.

        Args:
          step: the step about to be saved, for the message.
          doing: what this trainer stops short of (default: committing `step`).

        Raises:
          FencedError: OWNER holds another trainer's token.
        """
        current = self._read_owner()
        if not self._is_mine(current):
            raise self._fenced(step, current, doing)

    def commit(self, step: int) -> None:
        """Points LATEST at `step` iff this trainer still owns the directory.

        Args:
          step: the step whose folder is complete and confirmed in the store.

        Raises:
          FencedError: another trainer claimed the directory.
        """
        text = (checkpoint_name(step) + "\n").encode()
        latest_url = self._url(LATEST)
        if storage.supports_generations(self.directory):
            try:
                self._latest_generation = storage.write_if_generation(
                    latest_url, text, self._latest_generation, landed=self._owns
                )
            except storage.PreconditionFailed:
                raise self._fenced(step) from None
            return
        with self._locked():
            self.check(step)
            storage.write_bytes(latest_url, text)

    def _url(self, name: str) -> str:
        return storage.join(self.directory, name)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Excludes other trainers from read-compare-write on non-GCS stores."""
        proto = storage.protocol(self.directory)
        if not storage.is_local(self.directory) and proto != "memory":
            # s3:// and others: no conditional write wired up yet; the token
            # compare still catches a stale writer outside a narrow race.
            yield
            return
        with storage.exclusive_lock(self._url(".lock")):
            yield

    def _swap(self, url: str, new: Callable[[bytes | None], bytes]) -> int:
        """Read-modify-write of a gs:// object under a generation precondition."""
        for _ in range(20):
            old, generation = storage.read_generation(url)
            try:
                return storage.write_if_generation(url, new(old), generation)
            except storage.PreconditionFailed:
                time.sleep(0.05)  # Another claim raced us; read again.
        raise CheckpointError(f"could not update {url}: it kept changing under us")

    def _read_owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(storage.read_bytes(self._url(OWNER)))
        except FileNotFoundError:
            return None
        except ValueError:  # Not ours: whoever wrote it, it holds no token of ours.
            return {"host": "?", "pid": "?", "started": "? (OWNER is not JSON)"}
        return owner if isinstance(owner, dict) else {}

    def _is_mine(self, owner: dict[str, Any] | None) -> bool:
        """Whether an OWNER record holds this trainer's token."""
        mine = (self.owner or {}).get("token")
        return owner is not None and owner.get("token") == mine

    def _owns(self) -> bool:
        """Whether OWNER still holds this trainer's token.

        A rival's claim writes OWNER before it rewrites LATEST, so once LATEST
        has moved under us, this tells a rival's claim from our own commit
        whose response was lost.
        """
        return self._is_mine(self._read_owner())

    def _fenced(
        self, step: int, other: dict[str, Any] | None = None, doing: str = ""
    ) -> FencedError:
        if other is None:
            other = self._read_owner() or {}
        me = self.owner or {}
        return FencedError(
            f"workdir {self.workdir} was taken over by another trainer (host "
            f"{other.get('host', '?')}, pid {other.get('pid', '?')}, started "
            f"{other.get('started', '?')}); this trainer (host {me.get('host')}, pid "
            f"{me.get('pid')}, started {me.get('started')}) stops without "
            f"{doing or f'committing step {step}'}. The newer run owns the "
            "checkpoints now; let it continue."
        )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

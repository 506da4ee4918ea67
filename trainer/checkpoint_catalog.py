"""What a checkpoint directory holds: LATEST, the step folders, and which to retain."""

from __future__ import annotations

import re
from typing import Iterable

from trainer import storage
from trainer.errors import CheckpointError

# The layout of `{workdir}/checkpoints/` (a contract: names and formats fixed):
#
#     OWNER              {host, pid, started, token} of the owning trainer (fence.py)
#     LATEST             "ckpt-000000200": the only thing that makes a checkpoint exist
#     ckpt-000000200/    one checkpoint folder (checkpoint_format.py)
#
# A folder newer than LATEST (or any folder, with no LATEST) was never
# committed and does not exist for a restore; older folders are its fallbacks.
LATEST = "LATEST"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at `step`: `ckpt-000000200`."""
    return f"ckpt-{step:09d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint folder name (LATEST's text too); None if not one."""
    match = _CKPT_RE.match(name.strip())
    return int(match.group(1)) if match else None


def folder_steps(directory: str) -> list[int]:
    """The steps of every checkpoint folder in `directory`, committed or not, sorted."""
    fs, path = storage.filesystem(directory)
    fs.invalidate_cache(path)  # gcsfs caches listings; others write here too.
    steps = (parse_step(n) for n in storage.listdir(directory))
    return sorted(s for s in steps if s is not None)


def latest_step(directory: str) -> int | None:
    """The step LATEST names.

    Args:
      directory: the checkpoint directory, `{workdir}/checkpoints`.

    Returns:
      The step, or None when nothing has been committed (no LATEST, or an
      empty one).

    Raises:
      CheckpointError: LATEST holds something else than a checkpoint name.
    """
    url = storage.join(directory, LATEST)
    try:
        text = storage.read_text(url).strip()
    except FileNotFoundError:
        return None
    if not text:
        return None  # A claim on gs:// creates an empty LATEST to fence it.
    step = parse_step(text)
    if step is None:
        folders = folder_steps(directory)
        newest = (
            f"the newest checkpoint folder here is {checkpoint_name(folders[-1])}"
            if folders
            else "there is no checkpoint folder here"
        )
        raise CheckpointError(
            f"{url} holds {text[:80]!r}, not a checkpoint folder "
            f"name such as ckpt-000000200, so the last durable step is unknown "
            f"({newest}). Write the name of the checkpoint to resume from into "
            f"it, or delete {directory} to start the run over"
        )
    return step


def steps_to_delete(
    steps: Iterable[int], keep: int, best_step: int | None
) -> list[int]:
    """The committed checkpoints that retention deletes.

    Args:
      steps: the steps of the committed checkpoint folders, in any order.
      keep: how many of the newest to keep.
      best_step: the step of the best validation metric so far (the training
        state tracks it), kept besides the newest; None when there is none.

    Returns:
      The steps to delete, oldest first.
    """
    ordered = sorted(set(steps))
    newest = set(ordered[max(len(ordered) - keep, 0) :])
    return [s for s in ordered if s not in newest and s != best_step]

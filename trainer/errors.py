"""The errors a user can fix: `main` maps every `TrainerError` to exit 2.

Each message names the key, file, URL or offset at fault and the remedy, so the
CLI prints it as one line with no traceback. Anything else that escapes is a
bug: exit 1 with its traceback. The exit code follows the type alone, never
where the error was raised (design.md: "decided by the error's type").

The subclasses also derive from the builtin a caller would expect (ValueError
for a bad value, FileNotFoundError for a missing file, ...), so library users
can keep catching those.
"""

from __future__ import annotations


class TrainerError(Exception):
    """Bad input or a state the user must act on: exit 2, one message."""


class UsageError(TrainerError, ValueError):
    """A bad command line: flag, argument or command."""


class SpecError(TrainerError, ValueError):
    """A job spec key holds a value that cannot work (names the key)."""


class SpecChangedError(SpecError):
    """Resume refused: a shape-relevant spec field differs from the first run's."""


class SetupError(TrainerError, ValueError):
    """The machine or its environment (TF_CONFIG, devices) cannot run the job."""


class DataError(TrainerError, ValueError):
    """Bad training data: names the shard URL, offset or record, and the remedy."""


class WeightsError(TrainerError, ValueError):
    """Pretrained weights that cannot be found or loaded."""


class StorageError(TrainerError, OSError):
    """A URL that cannot be read or written: names it, the cause and the remedy."""


class BadURL(StorageError, ValueError):
    """A URL that names no place: a scheme with one slash, no or a bad bucket."""


class NotFound(StorageError, FileNotFoundError):
    """A file or URL the job needs does not exist."""


class PermissionDenied(StorageError, PermissionError):
    """The store refuses a read or write (credentials, roles, retention lock)."""


class CheckpointError(TrainerError, RuntimeError):
    """A checkpoint or the checkpoint directory is in a state we cannot use."""


class FencedError(CheckpointError):
    """Another trainer claimed the workdir; this one must stop without writing."""


class TrainingError(TrainerError, RuntimeError):
    """Training itself went wrong in a way the spec can fix (non-finite loss)."""


class SubmitError(TrainerError, ValueError):
    """`trainer submit` cannot render or launch the job for its target."""

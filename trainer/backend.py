"""Imports TensorFlow (which Keras runs on) once, with its start-up banner muted.

Every module that needs TensorFlow or Keras imports this first, so the cheap
paths (`trainer --help`, a bad flag, a bad job spec) answer without paying the
TensorFlow import, and the heavy ones print no C++ banner.
"""

from __future__ import annotations

import contextlib
import os
import sys


def import_tensorflow():
    """Imports and returns `tensorflow`, its C++ start-up banner kept off stderr.

    TensorFlow 2.21 logs oneDNN INFO lines before its logging is initialised,
    so TF_CPP_MIN_LOG_LEVEL cannot filter them, and they would bury the one-line
    error a user of the CLI needs. Python errors of the import still surface:
    stderr is restored before they propagate. TF_CPP_MIN_LOG_LEVEL=0 keeps all.
    """
    if (
        "tensorflow" not in sys.modules
        and os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0"
    ):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with _stderr_muted():
            import tensorflow  # noqa: F401
    import tensorflow

    return tensorflow


@contextlib.contextmanager
def _stderr_muted():
    """File descriptor 2 to /dev/null (C++ logging bypasses `sys.stderr`)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # No real stderr (some notebook hosts).
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)

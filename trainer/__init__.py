"""trainer: fine-tune pretrained Keras image backbones as preemption-proof jobs.

Importing the package registers its Keras layers (the in-model preprocessing),
so an exported `model.keras` loads with `keras.saving.load_model` in safe mode.
"""

import os as _os
import sys as _sys


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its C++ start-up banner kept off stderr.

    TensorFlow 2.21 logs oneDNN INFO lines before its logging is initialised,
    so TF_CPP_MIN_LOG_LEVEL cannot filter them, and they would bury the one-line
    error a user of the CLI needs. Python errors of the import still surface:
    stderr is restored before they propagate. TF_CPP_MIN_LOG_LEVEL=0 keeps all.
    """
    if _os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0" or "tensorflow" in _sys.modules:
        return
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        _sys.stderr.flush()
        saved = _os.dup(2)
    except (OSError, ValueError):  # No real stderr (some notebook hosts).
        import tensorflow  # noqa: F401

        return
    devnull = _os.open(_os.devnull, _os.O_WRONLY)
    try:
        _os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        _os.dup2(saved, 2)
        _os.close(saved)
        _os.close(devnull)


_import_tensorflow_quietly()

from trainer import models  # noqa: E402,F401  (registers the Preprocess layer)

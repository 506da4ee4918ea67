"""Which framework Keras runs on (`runtime.backend`), chosen before Keras is imported.

Every module that needs Keras calls `prepare_keras()` first, so the cheap
paths (`trainer --help`, a bad flag, a bad job spec) answer without paying the
TensorFlow import, and the heavy ones print no C++ banner.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import sys


def installed(module: str) -> bool:
    """Whether `module` can be imported here (without importing it)."""
    if module in sys.modules:  # None there: imports of it are blocked.
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def tensorflow_drives_tpus() -> bool:
    """Whether the installed TensorFlow has TPU kernels: only the TPU wheels do.

    Kaggle's TPU images ship tensorflow-cpu, Colab's TPU runtimes no
    TensorFlow at all (design.md); there TF's TPU start fails with "No
    registered 'ConfigureDistributedTPU' OpKernel".
    """
    for name in ("tensorflow-tpu", "tf-nightly-tpu"):
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def resolve(requested: str) -> str:
    """`runtime.backend` with "auto" resolved, by a fixed rule and no import.

    "auto" is JAX where TensorFlow cannot drive the hardware (a TPU is
    attached and no TPU build of TensorFlow is installed) or is not installed
    at all; TensorFlow otherwise, the backend with the longest record here
    (multi-worker collectives, op determinism, SavedModel export).
    """
    if requested != "auto":
        return requested
    if not installed("tensorflow"):
        return "jax"
    from trainer import runtime  # Imports config only: cheap.

    if runtime.tpu_address() and not tensorflow_drives_tpus():
        return "jax"
    return "tensorflow"


def select(requested: str) -> str:
    """Makes Keras run on `runtime.backend`; returns the backend's name.

    Before Keras is imported this sets KERAS_BACKEND (Keras reads it once, at
    its import). Afterwards, the backend Keras already runs on must be the
    one asked for.

    Raises:
      SpecError: the backend is not installed, or Keras already runs on
        another one in this process (a notebook that imported it earlier).
    """
    from trainer.errors import SpecError

    name = resolve(requested)
    shown = f'runtime.backend = "{requested}"' + (
        f' (resolved to "{name}")' if requested == "auto" else ""
    )
    module = {"tensorflow": "tensorflow", "jax": "jax"}[name]
    if not installed(module):
        extra = {"tensorflow": "cpu", "jax": "jax"}[name]
        raise SpecError(
            f"{shown} needs {module}, which is not installed; pip install "
            f"'trainer[{extra}]', or set runtime.backend to the other backend"
        )
    keras = sys.modules.get("keras")
    if keras is None:
        os.environ["KERAS_BACKEND"] = name
        return name
    current = keras.backend.backend()
    if current != name:
        raise SpecError(
            f"{shown}, but Keras in this process already runs on {current!r}: "
            "Keras reads KERAS_BACKEND once, when it is first imported. Restart "
            f'the kernel and run os.environ["KERAS_BACKEND"] = "{name}" before '
            "importing keras or trainer.train, or set runtime.backend = "
            f'"{current}"'
        )
    return name


def prepare_keras() -> None:
    """Call before `import keras`: picks the backend if nothing picked one, and
    imports TensorFlow (muted) where it is installed.

    Only a JAX choice is written to KERAS_BACKEND: TensorFlow is Keras' own
    default, so a user's ~/.keras/keras.json still counts elsewhere.
    """
    if "keras" not in sys.modules and not os.environ.get("KERAS_BACKEND"):
        if resolve("auto") == "jax":
            os.environ["KERAS_BACKEND"] = "jax"
    if installed("tensorflow"):
        # The JAX backend reads its data through tf.data where TF is here.
        import_tensorflow()


def import_tensorflow_or_none():
    """`tensorflow` when it is installed (imported muted), else None."""
    return import_tensorflow() if installed("tensorflow") else None


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

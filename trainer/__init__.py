"""trainer: fine-tune pretrained Keras image backbones as preemption-proof jobs.

Importing the package is cheap: it imports no TensorFlow, so the CLI answers a
bad flag or job spec at once. `trainer.models` (imported by every command that
builds or loads a model) registers the Keras layers of the in-model
preprocessing; `import trainer.models` before `keras.saving.load_model` on an
exported `model.keras` (safe mode). When Keras is already imported, `import
trainer` registers them too.
"""

import importlib as _importlib
import sys as _sys

if "keras" in _sys.modules:
    from trainer import models  # noqa: F401  (registers the Preprocess layer)


def __getattr__(name: str):
    """`trainer.models`, `trainer.train`, ... imported on first use."""
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return _importlib.import_module(f"trainer.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"trainer.{name}":
            raise  # A dependency of that module is missing: say so.
        raise AttributeError(f"module 'trainer' has no attribute {name!r}") from None

"""The backend-free parts of a training step: the optimizer and the step sums."""

from __future__ import annotations

from typing import Any

import keras


def make_optimizer(name: str, learning_rate: float, precision: str):
    """The spec's optimizer, with loss scaling under float16."""
    cls = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": lambda learning_rate: keras.optimizers.SGD(learning_rate, momentum=0.9),
        "rmsprop": keras.optimizers.RMSprop,
    }[name]
    optimizer = cls(learning_rate=learning_rate)
    if precision == "mixed_float16":
        # float16 gradients underflow without loss scaling (Keras mixed precision guide).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def accumulate(total: dict[str, Any], sums: dict[str, Any]) -> None:
    for k, v in sums.items():
        total[k] = total.get(k, 0.0) + v


def eval_metrics(total: dict[str, Any]) -> dict[str, Any]:
    """`val_loss`, `val_accuracy` and the confusion matrix from an eval
    step's sums over the validation split (weighted: padding counts 0)."""
    count = max(float(total.get("count", 0.0)), 1.0)
    return {
        "val_loss": float(total.get("loss", 0.0)) / count,
        "val_accuracy": float(total.get("correct", 0.0)) / count,
        "confusion": total.get("confusion"),
    }


def train_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Mean loss and accuracy from the sums of `train_steps`."""
    count = max(float(sums.get("count", 0.0)), 1.0)
    return {
        "loss": float(sums.get("loss", 0.0)) / count,
        "accuracy": float(sums.get("correct", 0.0)) / count,
    }

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


def train_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Mean loss and accuracy from the sums of `train_steps`."""
    count = max(float(sums.get("count", 0.0)), 1.0)
    return {
        "loss": float(sums.get("loss", 0.0)) / count,
        "accuracy": float(sums.get("correct", 0.0)) / count,
    }

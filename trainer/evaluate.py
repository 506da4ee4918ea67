"""`trainer evaluate` and `trainer predict`: use the model a run exported."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

from trainer import backend

tf = backend.import_tensorflow()  # Before Keras, which imports it loudly.

import keras  # noqa: E402
import numpy as np  # noqa: E402

from trainer import config, models, steps, storage, workdir  # noqa: E402,F401  (models registers layers)
from trainer.errors import DataError, NotFound  # noqa: E402


def load_run(root: str) -> tuple[config.JobSpec, keras.Model]:
    """The job spec and exported model of a completed run.

    Raises:
      NotFound: naming what is missing and the remedy.
    """
    job_url, model_url = workdir.job(root), workdir.model(root)
    if not storage.exists(job_url):
        raise NotFound(
            f"{job_url} not found: is {root} the --workdir of a `trainer train` run?"
        )
    if not storage.exists(model_url):
        raise NotFound(
            f"{model_url} not found: the run has not completed; run the same "
            "`trainer train` command again to finish it"
        )
    spec = config.from_dict(storage.read_json(job_url))
    with tempfile.TemporaryDirectory(prefix="trainer-model-") as tmp:
        path = os.path.join(tmp, "model.keras")
        storage.get(model_url, path)
        model = keras.saving.load_model(path)
    return spec, model


def evaluate(root: str, data: str | None = None) -> dict[str, Any]:
    """Accuracy, loss and the confusion matrix of the exported model on `data`."""
    spec, model = load_run(root)
    if data:
        spec = dataclasses.replace(
            spec, data=dataclasses.replace(spec.data, validation=data)
        )
    # The validation the training loop runs, on one device.
    strategy = tf.distribute.get_strategy()
    eval_fn = steps.make_eval_step(model, strategy, num_classes=spec.data.num_classes)
    val = steps.evaluate(eval_fn, spec, strategy)
    size = max(spec.data.num_classes, 2)
    confusion = np.zeros((size, size), np.int64)
    if val["confusion"] is not None:  # None: no validation records at all.
        confusion += np.rint(val["confusion"]).astype(np.int64)
    total = int(confusion.sum())
    accuracy = float(np.trace(confusion)) / max(total, 1)
    names = spec.class_names()
    print(f"{total} images from {spec.data.validation}: accuracy {accuracy:.4f}")
    print("confusion matrix (rows: true, columns: predicted):")
    width = max(len(n) for n in names) + 1
    print(" " * width + "".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, confusion, strict=False):
        print(f"{name:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    return {"accuracy": accuracy, "count": total, "confusion": confusion.tolist()}


def predict(root: str, urls: list[str]) -> list[dict[str, Any]]:
    """Top class and probability for each image file or URL."""
    spec, model = load_run(root)
    names = spec.class_names()
    size = spec.data.image_size
    results = []
    for url in urls:
        if not storage.exists(url):
            raise NotFound(f"image not found: {url}")
        try:
            image = tf.io.decode_image(
                storage.read_bytes(url), channels=3, expand_animations=False
            )
        except tf.errors.InvalidArgumentError:
            raise DataError(f"{url} is not a JPEG, PNG, GIF or BMP image") from None
        image = tf.image.resize(tf.cast(image, tf.float32), (size, size))
        probs = model.predict_on_batch(image[None])
        cls = int(steps.classes(probs, spec.data.num_classes)[0])
        p = float(probs[0][0] if spec.data.num_classes == 1 else probs[0][cls])
        if spec.data.num_classes == 1 and not cls:  # Sigmoid: P(class 1).
            p = 1.0 - p
        results.append({"url": url, "class": cls, "name": names[cls], "probability": p})
        print(f"{url}\t{names[cls]}\t{p:.4f}")
    return results

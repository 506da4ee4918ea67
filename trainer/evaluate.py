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

from trainer import config, input_pipeline, models, storage  # noqa: E402,F401  (models registers layers)
from trainer.errors import DataError, NotFound  # noqa: E402


def load_run(workdir: str) -> tuple[config.JobSpec, keras.Model]:
    """The job spec and exported model of a completed run.

    Raises:
      FileNotFoundError: naming what is missing and the remedy.
    """
    job_url = storage.join(workdir, "job.json")
    model_url = storage.join(workdir, "export", "model.keras")
    if not storage.exists(job_url):
        raise NotFound(
            f"{job_url} not found: is {workdir} the --workdir of a `trainer train` run?"
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


def evaluate(workdir: str, data: str | None = None) -> dict[str, Any]:
    """Accuracy, loss and the confusion matrix of the exported model on `data`."""
    spec, model = load_run(workdir)
    if data:
        spec = dataclasses.replace(
            spec, data=dataclasses.replace(spec.data, validation=data)
        )
    num_classes = max(spec.data.num_classes, 2)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for images, labels, weights in input_pipeline.eval_dataset(spec):
        probs = model.predict_on_batch(tf.cast(images, tf.float32))
        pred = _classes(probs, spec.data.num_classes)
        keep = weights.numpy() > 0
        np.add.at(confusion, (labels.numpy()[keep], pred[keep]), 1)
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


def predict(workdir: str, urls: list[str]) -> list[dict[str, Any]]:
    """Top class and probability for each image file or URL."""
    spec, model = load_run(workdir)
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
        probs = model.predict_on_batch(image[None])[0]
        cls = int(_classes(probs[None], spec.data.num_classes)[0])
        if spec.data.num_classes == 1:  # Sigmoid: probs[0] is P(class 1).
            p = float(probs[0]) if cls else 1.0 - float(probs[0])
        else:
            p = float(probs[cls])
        results.append({"url": url, "class": cls, "name": names[cls], "probability": p})
        print(f"{url}\t{names[cls]}\t{p:.4f}")
    return results


def _classes(probs: np.ndarray, num_classes: int) -> np.ndarray:
    probs = np.asarray(probs)
    if num_classes == 1:
        return (probs.reshape(-1) > 0.5).astype(np.int64)
    return probs.argmax(axis=-1)

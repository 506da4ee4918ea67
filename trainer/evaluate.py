"""`trainer evaluate` and `trainer predict`: use the model a run exported."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile
from typing import Any

from trainer import backend

backend.prepare_keras()  # Picks the backend; imports TensorFlow (muted) if installed.
# None where TensorFlow is not installed (Colab's TPU runtimes): `predict` then
# runs model.keras on Keras' JAX backend, its images decoded by np_image.
tf = backend.import_tensorflow_or_none()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from trainer import (  # noqa: E402,F401  (models registers the preprocessing layer)
    config,
    export,
    input_pipeline,
    models,
    np_image,
    reports,
    storage,
    workdir,
)
from trainer.errors import CheckpointError, DataError, NotFound  # noqa: E402


def load_run(root: str) -> tuple[config.JobSpec, keras.Model]:
    """The job spec and exported Keras model of a completed run.

    Raises:
      NotFound: naming what is missing and the remedy.
    """
    spec = export.load_spec(root)
    model_url = workdir.model(root)
    if not storage.exists(model_url):
        raise NotFound(
            f"{model_url} not found: the run has not completed; run the same "
            "`trainer train` command again to finish it, or `trainer export "
            f"--workdir={root}` to export its newest checkpoint"
        )
    with tempfile.TemporaryDirectory(prefix="trainer-model-") as tmp:
        path = os.path.join(tmp, "model.keras")
        storage.get(model_url, path)
        try:
            model = keras.saving.load_model(path)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            # A cut-short file reads to Keras as "File not found" (of our copy).
            raise CheckpointError(
                f"{model_url} cannot be loaded ({' '.join(str(e).split())[:200]}); "
                f"write it again from a checkpoint: `trainer export --workdir={root}`"
            ) from None
    return spec, model


def evaluate(root: str, data: str | None = None) -> dict[str, Any]:
    """Accuracy, loss, per-class precision/recall and the confusion matrix of
    the exported model on `data`, printed and written under `{workdir}/eval/`."""
    spec, model = load_run(root)
    if data:
        spec = dataclasses.replace(
            spec, data=dataclasses.replace(spec.data, validation=data)
        )
    val = _validation(spec, model)
    size = max(spec.data.num_classes, 2)
    confusion = np.zeros((size, size), np.int64)
    if val["confusion"] is not None:  # None: no validation records at all.
        confusion += np.rint(val["confusion"]).astype(np.int64)
    total = int(confusion.sum())
    names = spec.class_names()
    result = {
        "data": spec.data.validation,
        "model": workdir.model(root),
        "count": total,
        "accuracy": float(np.trace(confusion)) / max(total, 1),
        "loss": float(val["val_loss"]) if total else None,
        "per_class": per_class(confusion, names),
        "class_names": names,
        "confusion": confusion.tolist(),
    }
    print(
        f"{total} images from {spec.data.validation}: accuracy {result['accuracy']:.4f}"
    )
    print(format_per_class(result["per_class"]))
    print("confusion matrix (rows: true, columns: predicted):")
    print(format_confusion(confusion, names))
    _write_evaluation(root, result)
    print(f"evaluation: {workdir.evaluation(root, '')}")
    return result


def _validation(spec: config.JobSpec, model: keras.Model) -> dict[str, Any]:
    """The validation the training loop runs, on one device, on this Keras
    backend: TensorFlow's eval step on tf.data, or, on JAX (machines without
    TensorFlow: Colab's TPU runtimes), JAX's on the same batches (np_input's
    where TensorFlow is missing)."""
    if keras.backend.backend() != "jax":
        from trainer import steps

        strategy = tf.distribute.get_strategy()
        n = spec.data.num_classes
        eval_fn = steps.make_eval_step(model, strategy, num_classes=n)
        return steps.evaluate(eval_fn, spec, strategy)
    import jax

    from trainer import jax_steps, step_math

    eval_fn = jax.jit(jax_steps.eval_step_fn(model, num_classes=spec.data.num_classes))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    total: dict[str, Any] = {}
    batches = jax_steps.eval_batches(spec, worker=0, workers=1, tally=None, pass_key=0)
    for batch in batches:
        step_math.accumulate(total, eval_fn(trainable, non_trainable, *batch))
    return step_math.eval_metrics({k: np.asarray(v) for k, v in total.items()})


def per_class(confusion: np.ndarray, names: list[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall and support per class (None where undefined: 0/0)."""
    out = {}
    for i, name in enumerate(names):
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i].sum())
        hit = int(confusion[i, i])
        out[name] = {
            "precision": hit / predicted if predicted else None,
            "recall": hit / actual if actual else None,
            "support": actual,
        }
    return out


def format_per_class(rows: dict[str, dict[str, Any]]) -> str:
    width = max(len("class"), *(len(n) for n in rows))

    def cell(v) -> str:
        return f"{v:>9.4f}" if v is not None else f"{'-':>9}"

    lines = [f"{'class':>{width}} precision    recall  support"]
    for name, r in rows.items():
        lines.append(
            f"{name:>{width}} {cell(r['precision'])} {cell(r['recall'])} "
            f"{r['support']:>8}"
        )
    return "\n".join(lines)


def format_confusion(confusion: np.ndarray, names: list[str]) -> str:
    """The matrix as text, every column as wide as its widest name or count."""
    label = max(len(n) for n in names)
    width = max(label, len(str(int(confusion.max(initial=0))))) + 1
    lines = [" " * label + "".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, confusion, strict=True):
        lines.append(f"{name:>{label}}" + "".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)


def _write_evaluation(root: str, result: dict[str, Any]) -> None:
    """`{workdir}/eval/`: metrics.json, confusion_matrix.json and .png."""
    storage.write_json(
        workdir.evaluation(root, "metrics.json"),
        {k: v for k, v in result.items() if k != "confusion"},
    )
    storage.write_json(
        workdir.evaluation(root, "confusion_matrix.json"),
        {
            "rows": "true class",
            "columns": "predicted class",
            "class_names": result["class_names"],
            "matrix": result["confusion"],
        },
    )
    reports.plot_confusion(
        result["confusion"],
        result["class_names"],
        root,
        url=workdir.evaluation(root, "confusion_matrix.png"),
        title=storage.basename(result["data"]),
    )


def predict(root: str, urls: list[str]) -> list[dict[str, Any]]:
    """Top class and its probability for each image file or URL.

    Uses the exported SavedModel (the serving signature, bytes in); a run
    exported before it existed has only model.keras, used the same way.
    """
    spec = export.load_spec(root)
    serving = export.load_serving(root) if tf is not None else None
    keras_model = None if serving is not None else load_run(root)[1]
    names, binary = spec.class_names(), spec.data.num_classes == 1
    header = "image\tclass\tprobability of the class"
    print(header + (f"\tprobability of {names[1]!r}" if binary else ""))
    results = []
    for url in urls:
        data = _read_image(url)
        if serving is not None:
            probs = _serve(serving, data, url)
        else:
            pixels = _pixels(data, spec.data.image_size, url)
            probs = keras.ops.convert_to_numpy(
                keras_model.predict_on_batch(pixels.astype(np.float32)[None])
            )
        results.append(_result(url, np.asarray(probs[0], np.float64), names, binary))
        line = f"{url}\t{results[-1]['name']}\t{results[-1]['probability']:.4f}"
        print(line + (f"\t{results[-1]['positive']:.4f}" if binary else ""))
    return results


def _not_an_image(url: str) -> DataError:
    return DataError(f"{url} is not a JPEG, PNG, GIF or BMP image")


def _serve(serving, data: bytes, url: str) -> np.ndarray:
    """The SavedModel's serving signature on one image's bytes."""
    try:
        out = serving.signatures[export.SIGNATURE](
            **{export.INPUT: tf.constant([data])}
        )
    except tf.errors.InvalidArgumentError:
        raise _not_an_image(url) from None
    return out["probabilities"].numpy()


def _pixels(data: bytes, size: int, url: str) -> np.ndarray:
    """The model's input pixels: tf.data's decode, or its numpy twin without TF."""
    try:
        if tf is not None:
            return input_pipeline.decode_for_model(data, size).numpy()
        return np_image.resize(np_image.decode(data), size)
    except Exception as e:  # TF's InvalidArgumentError, Pillow's errors.
        if tf is not None and not isinstance(e, tf.errors.InvalidArgumentError):
            raise
        raise _not_an_image(url) from None


def _read_image(url: str) -> bytes:
    # One request per image; the store is asked why only when the read fails.
    try:
        return storage.read_bytes(url)
    except (FileNotFoundError, IsADirectoryError):  # NotFound is the first.
        if storage.isdir(url):
            raise NotFound(f"{url} is a folder; give the image files in it") from None
        raise NotFound(f"image not found: {url}") from None


def _result(url: str, probs: np.ndarray, names: list[str], binary: bool) -> dict:
    """One image's prediction; a binary job's output is P(names[1])."""
    # steps.classes' rule (sigmoid > 0.5, else argmax), on numpy.
    cls = int(probs[0] > 0.5) if binary else int(np.argmax(probs))
    if binary:
        positive = float(probs[0])
        p = positive if cls else 1.0 - positive
        return {
            "url": url,
            "class": cls,
            "name": names[cls],
            "probability": p,
            "positive": positive,
        }
    return {
        "url": url,
        "class": cls,
        "name": names[cls],
        "probability": float(probs[cls]),
    }

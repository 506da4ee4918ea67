"""What a run hands to users and servers: `model.keras` and a TF Serving SavedModel.

Both are written from one committed checkpoint's weights, loaded into a fresh
float32 model, so the export a training run writes on completion and the one
`trainer export --step=N` writes later are the same function of the same
checkpoint. The SavedModel's `serving_default` signature takes encoded image
bytes (`image_bytes`: the `_bytes` suffix is what Vertex AI's and TF Serving's
JSON `{"b64": ...}` convention keys on) and decodes and resizes them with the
training pipeline's own function, `input_pipeline.decode_for_model`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
from typing import Any

from trainer import backend

# Before Keras, which imports it loudly. None without TensorFlow (the JAX
# backend): then only model.keras is written (see `export_step`).
tf = backend.import_tensorflow_or_none()

import keras  # noqa: E402

from trainer import (  # noqa: E402
    checkpoint_catalog,
    checkpoint_format,
    config,
    models,
    reports,
    storage,
    workdir,
)
from trainer.errors import CheckpointError, NotFound  # noqa: E402

SIGNATURE = "serving_default"
INPUT = "image_bytes"


def choose_step(
    root: str, spec: config.JobSpec, step: int | None = None, best: int | None = None
) -> tuple[int, str]:
    """The committed checkpoint step to export, and which weights it holds.

    Args:
      root: the workdir.
      spec: the run's spec; `train.export` picks best or last when `step` is None.
      step: an explicit step (`trainer export --step=N`).
      best: the best step when the caller knows it (the training loop);
        otherwise read from summary.json or the newest checkpoint's state.

    Returns:
      (step, "best" | "last" | "step N"): "step N" for an explicit step that
      is neither the best nor the last.

    Raises:
      NotFound: nothing was ever committed.
      CheckpointError: `step` is not a committed checkpoint; names those that are.
    """
    directory = workdir.checkpoints(root)
    latest = checkpoint_catalog.latest_step(directory)
    if latest is None:
        raise NotFound(
            f"{directory} holds no committed checkpoint: run `trainer train` with "
            f"--workdir={root} first"
        )
    committed = [s for s in checkpoint_catalog.folder_steps(directory) if s <= latest]
    if best is None:
        best = _best_step(root, directory, latest)
    if step is not None:
        if step not in committed:
            raise CheckpointError(
                f"--step={step}: {directory} holds no committed checkpoint at step "
                f"{step}; available steps: {', '.join(map(str, committed))} "
                f"(best {best if best is not None else 'unknown'}, last {latest}); "
                "pass one of them, or leave --step "
                f'out for train.export = "{spec.train.export}"'
            )
        label = "best" if step == best else "last" if step == latest else "step"
        return step, label
    if spec.train.export == "best" and best in committed:
        return best, "best"
    if spec.train.export == "best" and best is not None:
        print(
            f"note: no checkpoint of a best step ({best}) is left; exporting the last"
        )
    return latest, "last"


def _best_step(root: str, directory: str, latest: int) -> int | None:
    """The best step as the run knows it: summary.json's, else the newest state's."""
    summary_url = workdir.summary(root)
    if storage.exists(summary_url):
        summary = storage.read_json(summary_url)
        if summary.get("global_step", -1) >= latest:
            return summary.get("best", {}).get("global_step")
    folder = storage.join(directory, checkpoint_catalog.checkpoint_name(latest))
    try:
        return storage.read_json(storage.join(folder, checkpoint_format.STATE)).get(
            "best_step"
        )
    except (OSError, ValueError):
        return None  # Read again, verified, when that checkpoint is exported.


def export_step(
    root: str, spec: config.JobSpec, step: int, weights: str, *, saved_model=True
) -> dict[str, Any]:
    """Writes model.keras and the next SavedModel version from checkpoint `step`.

    Args:
      root: the workdir.
      spec: the run's spec, with its class names resolved.
      step: a committed checkpoint step (see `choose_step`).
      weights: what the step is ("best", "last", "step"), for the record.
      saved_model: False writes model.keras only (the completion of a run
        with `train.export_saved_model = false`); export.json says so.

    Returns:
      The record also written to `{workdir}/export/export.json`.

    Raises:
      CheckpointError: the checkpoint is damaged or does not fit the spec.
    """
    if saved_model and keras.backend.backend() != "tensorflow" and tf is not None:
        return _export_on_tensorflow(root, step, weights)
    folder = storage.join(
        workdir.checkpoints(root), checkpoint_catalog.checkpoint_name(step)
    )
    arrays = _checkpoint_arrays(root, folder)
    model = _float32_model(spec)
    models.assign_variables(
        model, None, {k: v for k, v in arrays.items() if k.startswith("model/")}
    )
    reports.export(model, root)
    version = url = note = None
    later = f"`trainer export --workdir={root} --step={step}`"
    if not saved_model:
        note = f"no SavedModel: train.export_saved_model = false; {later} writes one"
    elif tf is None:
        note = (
            f"no SavedModel: TensorFlow is not installed here; run {later} where it is"
        )
        print(f"note: {note}")
    else:
        version, url = _write_saved_model(_serving_archive(model, spec), root)
    record = {
        "step": step,
        "weights": weights,
        "checkpoint": folder,
        "model": workdir.model(root),
        "saved_model": url,
        "version": version,
        "class_names": spec.class_names(),
        "positive_class": spec.class_names()[1] if spec.data.num_classes == 1 else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        **({"note": note} if note else {}),
    }
    storage.write_json(workdir.export_record(root), record)
    return record


def _checkpoint_arrays(root: str, folder: str) -> dict[str, Any]:
    """The arrays of the checkpoint `folder`; a damaged one is named, with the
    steps there are to export instead."""
    try:
        return checkpoint_format.read(folder)[0]
    except CheckpointError as e:
        others = checkpoint_catalog.folder_steps(workdir.checkpoints(root))
        raise CheckpointError(
            f"checkpoint {folder} cannot be exported: {e}; export another with "
            f"`trainer export --workdir={root} --step=N` (folders: "
            f"{', '.join(map(str, others)) or 'none'})"
        ) from None


def _export_on_tensorflow(root: str, step: int, weights: str) -> dict[str, Any]:
    """The export of a run on the JAX backend: `trainer export` on TensorFlow.

    The SavedModel's endpoint decodes image bytes with TensorFlow ops around
    the model; Keras on JAX can only put the model in one through jax2tf
    (keras-team/keras#19134, #20906), another program than the TensorFlow
    backend's. A TensorFlow process exports what a TensorFlow run would, from
    the same committed checkpoint, at the cost of its start (seconds).
    """
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    command = [sys.executable, "-m", "trainer", "export"]
    done = subprocess.run(
        [*command, f"--workdir={root}", f"--step={step}"],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"exporting step {step} on TensorFlow failed (exit {done.returncode}): "
            f"{done.stderr[-2000:]}"
        )
    record = storage.read_json(workdir.export_record(root))
    record["weights"] = weights
    storage.write_json(workdir.export_record(root), record)
    return record


def _float32_model(spec: config.JobSpec) -> keras.Model:
    """The spec's model in float32, without pretrained weights (a checkpoint's follow).

    float32 whatever the training's precision: the serving containers run on
    CPUs too, where float16 is slow and loses precision for nothing.
    """
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        bare = dataclasses.replace(spec.model, weights="none")
        return models.build_model(dataclasses.replace(spec, model=bare))
    finally:
        keras.config.set_dtype_policy(policy)


def serving_function(model: keras.Model, spec: config.JobSpec):
    """Encoded JPEG/PNG/GIF/BMP bytes of any size -> probabilities, class, name.

    Returns:
      fn(image_bytes: string [batch]) -> {"probabilities": the model's output
      (softmax [batch, N]; for a binary job [batch, 1], the probability of the
      positive class, class_names[1]), "class_index": int32 [batch],
      "class_name": string [batch], "class_probability": float32 [batch], the
      probability of the class returned}.
    """
    from trainer import input_pipeline, steps

    size, n = spec.data.image_size, spec.data.num_classes
    names = tf.constant(spec.class_names())
    pixels_spec = tf.TensorSpec([size, size, 3], tf.uint8)

    def serve(image_bytes):
        pixels = tf.map_fn(
            lambda b: input_pipeline.decode_for_model(b, size),
            image_bytes,
            fn_output_signature=pixels_spec,
        )
        probabilities = model(tf.cast(pixels, tf.float32), training=False)
        index = steps.classes(probabilities, n)
        if n == 1:
            positive = tf.reshape(probabilities, [-1])
            chosen = tf.where(index == 1, positive, 1.0 - positive)
        else:
            chosen = tf.gather(probabilities, index, batch_dims=1)
        return {
            "probabilities": probabilities,
            "class_index": index,
            "class_name": tf.gather(names, index),
            "class_probability": chosen,
        }

    return serve


def _serving_archive(model: keras.Model, spec: config.JobSpec):
    archive = keras.export.ExportArchive()
    # No `archive.track(model)`, the documented pattern: with it Keras 3 saves
    # every weight twice, as the Keras variables and as the tf.Variables the
    # endpoint captures (keras-team/keras#23553, open; 190 MB instead of 95
    # for ResNet50 here). The endpoint's captured variables are all it needs.
    archive.add_endpoint(
        name=SIGNATURE,
        fn=serving_function(model, spec),
        input_signature=[tf.TensorSpec([None], tf.string, name=INPUT)],
    )
    return archive


def versions(root: str) -> list[int]:
    """The SavedModel version numbers under `export/saved_model/`, ascending."""
    names = storage.listdir(workdir.saved_models(root))
    return sorted(int(n) for n in names if n.isdigit())


def _write_saved_model(archive, root: str) -> tuple[int, str]:
    """Writes the archive as the next version folder; (version, its URL).

    A new version each time, as TF Serving expects: a server watching the base
    folder moves to the newest version, and the previous one stays whole.
    """
    version = max(versions(root), default=0) + 1
    url = workdir.saved_model(root, version)
    with tempfile.TemporaryDirectory(prefix="trainer-saved-model-") as tmp:
        # Written locally, then copied through storage.py: TF writes only to
        # local disk and gs:// itself, and a workdir is any fsspec URL.
        archive.write_out(tmp, verbose=False)
        files = [
            os.path.relpath(os.path.join(d, f), tmp).replace(os.sep, "/")
            for d, _, names in os.walk(tmp)
            for f in names
        ]
        # saved_model.pb last: a server loads a version once that file is there,
        # so the variables it points to must be complete before it.
        for rel in sorted(files, key=lambda r: (r == "saved_model.pb", r)):
            storage.put(os.path.join(tmp, rel), storage.join(url, rel))
    return version, url


def load_serving(root: str):
    """The newest exported SavedModel, loaded; None when the run has none.

    Runs exported before the SavedModel existed have `model.keras` only.
    """
    found = versions(root)
    if not found:
        return None
    url = workdir.saved_model(root, found[-1])
    if storage.is_local(url):
        return tf.saved_model.load(storage.local_path(url))
    with tempfile.TemporaryDirectory(prefix="trainer-saved-model-") as tmp:
        for file_url in storage.glob(storage.join(url, "**")):
            rel = file_url[len(url) :].lstrip("/")
            storage.get(file_url, os.path.join(tmp, *rel.split("/")))
        # The variables are read at load: the folder can go right after.
        return tf.saved_model.load(tmp)


def load_spec(root: str) -> config.JobSpec:
    """The job spec of the run in `root`, with its class names resolved.

    Raises:
      NotFound: `root` holds no run.
    """
    from trainer import input_pipeline

    job_url = workdir.job(root)
    if not storage.exists(job_url):
        raise NotFound(
            f"{job_url} not found: is {root} the --workdir of a `trainer train` run?"
        )
    # Runs from before job.json recorded the manifest's names find them now.
    return input_pipeline.with_class_names(config.from_dict(storage.read_json(job_url)))


def run_export(root: str, step: int | None = None) -> dict[str, Any]:
    """`trainer export`: re-exports the workdir's run from a committed checkpoint.

    Args:
      root: the workdir of a `trainer train` run (finished or not).
      step: the checkpoint step; None for the spec's `train.export` choice.

    Returns:
      The export record (see `export_step`).
    """
    spec = load_spec(root)
    chosen, weights = choose_step(root, spec, step)
    record = export_step(root, spec, chosen, weights)
    summary = reports.completed_summary(root)
    if summary is not None:  # What a rerun of `train` prints: this export now.
        reports.write_summary(root, {**summary, "export": record})
    print(reports.describe_export(record))
    return record

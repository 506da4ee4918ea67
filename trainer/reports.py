"""What a run leaves for people: summary.json, TensorBoard logs, plots, the export."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from typing import Any

from trainer import backend

# Before Keras, which imports it loudly; None on a machine without TensorFlow
# (the JAX backend), where TensorBoard's own event writer takes over.
tf = backend.import_tensorflow_or_none()

import numpy as np  # noqa: E402

from trainer import storage, workdir  # noqa: E402


def completed_summary(root: str) -> dict | None:
    """The summary of a run that completed in `root`; None otherwise."""
    url = workdir.summary(root)
    if not storage.exists(url):
        return None
    try:
        summary = storage.read_json(url)
    except ValueError:  # Damaged: the checkpoints, not this file, say where a run is.
        logging.warning("%s is not valid JSON; resuming from the checkpoints", url)
        return None
    return summary if summary.get("status") == "completed" else None


def write_summary(root: str, summary: dict[str, Any]) -> None:
    storage.write_json(workdir.summary(root), summary)


def print_final(summary: dict[str, Any], monitor: str, name: str) -> None:
    metrics = ", ".join(
        f"{k} {v:.4f}" for k, v in summary["metrics"].items() if isinstance(v, float)
    )
    best = summary["best"]
    note = ""
    if best.get(monitor) is not None:
        note = f" (best {monitor} {best[monitor]:.4f} at step {best['global_step']})"
    print(f"completed {name} at step {summary['global_step']}: {metrics}{note}")
    if summary.get("export"):  # Only the chief exports.
        print(describe_export(summary["export"]))


def describe_export(record: dict[str, Any]) -> str:
    """Which weights an export holds (export.json's record) and where it went."""
    what = {
        "best": "the best weights",
        "last": "the last weights",
        "step": "the weights of the step asked for",
    }[record["weights"]]
    serving = (
        f"serving: {record['saved_model']} (TF Serving version {record['version']}, "
        "signature 'serving_default', input 'image_bytes')"
        if record.get("saved_model")
        else f"serving: none ({record.get('note', 'no SavedModel')})"
    )
    return (
        f"exported {what}, step {record['step']}\nmodel: {record['model']}\n{serving}"
    )


def print_record(record: dict[str, Any]) -> None:
    """One epoch's line: `phase: transfer - epoch: 1 - ... - val_accuracy: 0.9120`."""
    print(
        " - ".join(
            f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
            for k, v in record.items()
        )
    )


class Logs:
    """TensorBoard event files, written locally and mirrored to `{workdir}/logs`.

    tf.summary writes only to local disk and gs://; staging locally and copying
    through storage.py works for every fsspec workdir.
    """

    def __init__(self, root: str, enabled: bool):
        self.url = workdir.logs(root)
        self.enabled = enabled
        self.local = tempfile.mkdtemp(prefix="trainer-logs-")
        self.writer = None
        if enabled and tf is not None:
            self.writer = tf.summary.create_file_writer(self.local)
        elif enabled:
            self.writer = _EventWriter(self.local)

    def write(self, record: dict[str, Any], step: int) -> None:
        """The record's scalars at `step`, then the logs copied to the workdir."""
        if self.writer is None:
            return
        scalars = {k: v for k, v in record.items() if isinstance(v, float)}
        if isinstance(self.writer, _EventWriter):
            self.writer.scalars(scalars, step)
        else:
            with self.writer.as_default(step=step):
                for k, v in scalars.items():
                    tf.summary.scalar(k, v)
        self.writer.flush()
        storage.put(self.local, self.url)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        shutil.rmtree(self.local, ignore_errors=True)


class _EventWriter:
    """Scalars as TensorBoard event files without TensorFlow: the `tensorboard`
    package's own writer (which tensorboardX and PyTorch use too)."""

    def __init__(self, folder: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer = EventFileWriter(folder)

    def scalars(self, values: dict[str, float], step: int) -> None:
        import time

        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(tag=k, simple_value=v)
                for k, v in values.items()
            ]
        )
        event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary)
        self._writer.add_event(event)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def export(model, root: str) -> None:
    """Writes `{workdir}/export/model.keras` (loads in Keras' safe mode)."""
    with tempfile.TemporaryDirectory(prefix="trainer-export-") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        storage.put(path, workdir.model(root))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # No display on a training machine.
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(
    confusion: list[list[float]],
    names: list[str],
    root: str,
    *,
    url: str | None = None,
    title: str = "validation",
) -> None:
    """A confusion matrix (rows: true class) as PNG, by default the run's last
    validation's at `{workdir}/plots/confusion_matrix.png`."""
    if not confusion:
        return
    plt = _pyplot()
    matrix = np.asarray(confusion, dtype=np.int64)
    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n, 1.0 + 0.5 * n))
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(
                j, i, matrix[i, j], ha="center", va="center", color=color, fontsize=8
            )
    ax.set_xticks(range(n), names, rotation=90 if n > 12 else 0)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"{title}, accuracy {accuracy:.3f}")
    _save_png(plt, fig, url or workdir.plot(root, "confusion_matrix.png"))


def plot_history(history: list[dict[str, Any]], root: str) -> None:
    """Training curves (loss and accuracy per epoch, phases marked) as PNG."""
    if not history:
        return
    plt = _pyplot()
    x = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    starts = [
        i + 1
        for i, h in enumerate(history)
        if i == 0 or h["phase"] != history[i - 1]["phase"]
    ]
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(x, [h[key] for h in history], marker="o", label=f"train {key}")
        ax.plot(x, [h[f"val_{key}"] for h in history], marker="o", label=f"val {key}")
        for s in starts:
            ax.axvline(s - 0.5, color="grey", linestyle=":")
            top = ax.get_ylim()[1]
            ax.text(s - 0.4, top, history[s - 1]["phase"], va="top", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        if key == "loss":
            ax.set_yscale("log")  # The first epoch's loss would flatten the rest.
        ax.legend()
    _save_png(plt, fig, workdir.plot(root, "training_curves.png"))


def _save_png(plt, fig, url: str) -> None:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue())

"""The workdir layout (design.md): every path a run reads or writes, named once."""

from __future__ import annotations

from trainer import storage

# {workdir}/job.json            resolved spec of the first run
# {workdir}/summary.json        status, position and metrics, rewritten each epoch
# {workdir}/checkpoints/        step checkpoints and the LATEST pointer
# {workdir}/export/model.keras  the exported model (Keras), written on completion
# {workdir}/export/saved_model/N/  the same as a TF Serving SavedModel, version N
# {workdir}/export/export.json  which checkpoint step the export holds, and why
# {workdir}/eval/               `trainer evaluate`'s metrics, matrix as JSON and PNG
# {workdir}/logs/               TensorBoard event files
# {workdir}/plots/              PNG plots
# {workdir}/cache/              backbone features of frozen phases (feature_cache.py)


def job(workdir: str) -> str:
    return storage.join(workdir, "job.json")


def summary(workdir: str) -> str:
    return storage.join(workdir, "summary.json")


def checkpoints(workdir: str) -> str:
    return storage.join(workdir, "checkpoints")


def model(workdir: str) -> str:
    return storage.join(workdir, "export", "model.keras")


def saved_models(workdir: str) -> str:
    """The TF Serving base path: numbered version folders below it."""
    return storage.join(workdir, "export", "saved_model")


def saved_model(workdir: str, version: int) -> str:
    return storage.join(saved_models(workdir), str(version))


def export_record(workdir: str) -> str:
    return storage.join(workdir, "export", "export.json")


def evaluation(workdir: str, name: str) -> str:
    return storage.join(workdir, "eval", name)


def logs(workdir: str) -> str:
    return storage.join(workdir, "logs")


def plot(workdir: str, name: str) -> str:
    return storage.join(workdir, "plots", name)


def feature_cache(workdir: str, key: str) -> str:
    return storage.join(workdir, "cache", f"features-{key}")

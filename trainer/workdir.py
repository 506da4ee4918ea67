"""The workdir layout (design.md): every path a run reads or writes, named once."""

from __future__ import annotations

from trainer import storage

# {workdir}/job.json            resolved spec of the first run
# {workdir}/summary.json        status, position and metrics, rewritten each epoch
# {workdir}/checkpoints/        step checkpoints and the LATEST pointer
# {workdir}/export/model.keras  the final model, written on completion
# {workdir}/logs/               TensorBoard event files
# {workdir}/plots/              PNG plots


def job(workdir: str) -> str:
    return storage.join(workdir, "job.json")


def summary(workdir: str) -> str:
    return storage.join(workdir, "summary.json")


def checkpoints(workdir: str) -> str:
    return storage.join(workdir, "checkpoints")


def model(workdir: str) -> str:
    return storage.join(workdir, "export", "model.keras")


def logs(workdir: str) -> str:
    return storage.join(workdir, "logs")


def plot(workdir: str, name: str) -> str:
    return storage.join(workdir, "plots", name)

"""The Colab notebook `trainer submit` renders, executed for real on CPU.

nbclient runs every cell in a fresh Jupyter kernel, as Colab's "Run all" does;
only the install cell is turned off (INSTALL = False: this venv already has
the package). The job is a tiny ResNet50 run on real digits shards.
"""

from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "phases.transfer.epochs=1",
    "phases.finetune.epochs=1",
    "phases.transfer.steps_per_epoch=2",
    "phases.finetune.steps_per_epoch=2",
    "phases.finetune.jit_compile=false",
    "train.global_batch_size=8",
]


def _execute(notebook, cwd) -> str:
    """Runs every cell in a fresh kernel; returns the cells' printed text."""
    import nbclient

    nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": cwd}},
    ).execute()
    return "".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def _summary(workdir: str) -> dict:
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_colab_notebook_stops_at_deadline_and_resumes_to_completion(
    tmp_path, monkeypatch
):
    import nbformat

    from trainer import convert, submit

    data = str(tmp_path / "digits")
    convert.convert_sample_digits(data, shards=2)
    workdir = str(tmp_path / "run")
    overrides = [
        f"data.train={data}/train-*.tfrecord",
        f"data.validation={data}/validation-*.tfrecord",
        *TINY,
    ]
    # The kernel is a new process: let it import this checkout even when the
    # venv has no editable install of it.
    path = [ROOT, os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")

    def notebook(deadline: str):
        nb = submit.render_notebook(
            "colab",
            name="digits",
            job_url=os.path.join(ROOT, "jobs", "digits.toml"),
            workdir=workdir,
            package="unused",
            overrides=overrides,
            deadline=deadline,
            install=False,
        )
        nbformat.validate(nb)
        return nb

    start = time.monotonic()
    # A session whose deadline has already passed (less than the checkpoint
    # budget left): the run saves, stops, and the notebook tells the user.
    printed = _execute(notebook("1s"), str(tmp_path))
    assert "run this cell again to resume" in printed, printed[-2000:]
    assert _summary(workdir)["status"] == "preempted"
    assert os.path.exists(os.path.join(workdir, "checkpoints", "LATEST"))

    # The next session: the same notebook, a real deadline, runs to the end.
    printed = _execute(notebook("1h"), str(tmp_path))
    elapsed = time.monotonic() - start
    summary = _summary(workdir)
    assert summary["status"] == "completed", summary
    assert summary["phase"] == "finetune", summary
    assert summary["global_step"] == 4, summary
    assert os.path.exists(os.path.join(workdir, "export", "model.keras"))
    assert "completed" in printed, printed[-2000:]
    print(f"two notebook sessions in {elapsed:.1f} s")

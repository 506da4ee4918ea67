"""The Colab and Kaggle notebooks `trainer submit` renders, executed for real on CPU.

nbclient runs every cell in a fresh Jupyter kernel, as "Run all" does; only
the install cell is turned off (INSTALL = False: this venv already has the
package). The job is a tiny ResNet50 run on real digits shards. What only
the platform has is stood in for: `google.colab` (auth, drive) is a package
that records its calls, the platform's folders are parameters pointed at
temporary ones (the way papermill injects parameters), and Cloud Storage is
the emulator reached with credentials that name no project.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time

import pytest

from tests.test_resume import SMALL_BACKBONE

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow  # Each test trains in a fresh notebook kernel.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# test_resume's small MobileNetV2 (the runners are what these tests are about).
TINY = [
    *SMALL_BACKBONE,
    "train.export_saved_model=false",  # The runners are what is tested.
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


# A stand-in for Colab's `google.colab`: authenticate_user() and the Drive
# mount record their calls (one JSON line each) in $COLAB_CALLS.
_COLAB = {
    # No google/__init__.py: `google` is a namespace package (google-auth ...).
    "google/colab/__init__.py": "",
    "google/colab/auth.py": """
        import json, os
        def authenticate_user():
            with open(os.environ["COLAB_CALLS"], "a") as f:
                f.write(json.dumps(["authenticate_user"]) + "\\n")
    """,
    "google/colab/drive.py": """
        import json, os
        def _record(*call):
            with open(os.environ["COLAB_CALLS"], "a") as f:
                f.write(json.dumps(list(call)) + "\\n")
        def mount(path):
            os.makedirs(os.path.join(path, "MyDrive"), exist_ok=True)
            _record("mount", path)
        def flush_and_unmount():
            _record("flush_and_unmount")
    """,
}


def _colab_stand_in(tmp_path, monkeypatch) -> tuple[str, object]:
    root = tmp_path / "colab-stand-in"
    for rel, text in _COLAB.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    calls = tmp_path / "colab-calls.jsonl"
    monkeypatch.setenv("COLAB_CALLS", str(calls))
    return str(root), calls


def _kernel_path(monkeypatch, *extra: str) -> None:
    # The kernel is a new process: let it import this checkout (and stand-ins)
    # even when the venv has no editable install of it.
    path = [*extra, ROOT, os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")


def _with_parameters(notebook, **values):
    """Appends an injected-parameters cell after the parameters cell (papermill's way)."""
    import nbformat

    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, id="injected-parameters")
    notebook.cells.insert(2, cell)
    nbformat.validate(notebook)
    return notebook


def _calls(path) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def _digits_overrides(tmp_path) -> list[str]:
    from trainer import convert

    data = str(tmp_path / "digits")
    convert.convert_sample_digits(data, shards=2)
    return [
        f"data.train={data}/train-*.tfrecord",
        f"data.validation={data}/validation-00000-of-00002.tfrecord",
        *TINY,
    ]


@pytest.mark.slow
def test_colab_notebook_on_drive_stops_resumes_and_flushes(tmp_path, monkeypatch):
    from trainer import submit

    colab, calls = _colab_stand_in(tmp_path, monkeypatch)
    _kernel_path(monkeypatch, colab)
    overrides = _digits_overrides(tmp_path)
    drive = str(tmp_path / "drive")
    workdir = f"{drive}/MyDrive/runs/digits"

    def notebook(deadline: str):
        nb = submit.render_notebook(
            "colab",
            name="digits",
            job_url=os.path.join(ROOT, "jobs", "digits.toml"),
            workdir="/content/drive/MyDrive/runs/digits",
            package="unused",
            overrides=overrides,
            deadline=deadline,
            install=False,
        )
        return _with_parameters(nb, DRIVE=drive, WORKDIR=workdir)

    start = time.monotonic()
    # A session whose deadline has already passed (less than the checkpoint
    # budget left): the run saves, stops, flushes Drive, and tells the user.
    printed = _execute(notebook("1s"), str(tmp_path))
    assert "run all cells again to resume" in printed, printed[-2000:]
    assert _summary(workdir)["status"] == "preempted"
    assert os.path.exists(os.path.join(workdir, "checkpoints", "LATEST"))
    # Defect 10: without flush_and_unmount, Drive may not have the checkpoint.
    assert _calls(calls) == [["mount", drive], ["flush_and_unmount"]]

    # The next session: the same notebook, a real deadline, runs to the end.
    printed = _execute(notebook("1h"), str(tmp_path))
    elapsed = time.monotonic() - start
    summary = _summary(workdir)
    assert summary["status"] == "completed", summary
    assert summary["phase"] == "finetune", summary
    assert summary["global_step"] == 4, summary
    assert os.path.exists(os.path.join(workdir, "export", "model.keras"))
    assert "completed" in printed, printed[-2000:]
    assert _calls(calls)[2:] == [["mount", drive], ["flush_and_unmount"]]
    print(f"two notebook sessions in {elapsed:.1f} s")


@pytest.mark.slow
def test_colab_notebook_with_a_gcs_workdir_and_a_login_without_project(
    gcs_bucket, tmp_path, monkeypatch
):
    # Defect 1: after authenticate_user() the credentials name no project;
    # the first claim on a gs:// workdir raised "Project was not passed".
    from tests import user_login
    from trainer import storage, submit

    colab, calls = _colab_stand_in(tmp_path, monkeypatch)
    _kernel_path(monkeypatch, colab)
    overrides = _digits_overrides(tmp_path)
    workdir = f"{gcs_bucket}/runs/digits"
    with user_login.login_without_project(
        str(tmp_path), os.environ["STORAGE_EMULATOR_HOST"]
    ) as login:
        for key in list(os.environ):
            if key not in login["env"]:
                monkeypatch.delenv(key)
        for key, value in login["env"].items():
            monkeypatch.setenv(key, value)
        nb = submit.render_notebook(
            "colab",
            name="digits",
            job_url=os.path.join(ROOT, "jobs", "digits.toml"),
            workdir=workdir,
            package="unused",
            overrides=overrides,
            deadline="1h",
            install=False,
        )
        printed = _execute(nb, str(tmp_path))
        token_requests = len(login["server"].requests)
    monkeypatch.undo()  # Back to the emulator's own settings to read the result.
    assert "completed" in printed, printed[-3000:]
    assert _calls(calls) == [["authenticate_user"]]
    assert token_requests >= 1  # The login's credentials were used.
    summary = storage.read_json(f"{workdir}/summary.json")
    assert summary["status"] == "completed" and summary["global_step"] == 4


@pytest.mark.slow
def test_kaggle_notebook_resumes_from_the_previous_versions_output(
    tmp_path, monkeypatch
):
    # Defect 8: a /kaggle/working workdir lives on only as a version's output.
    # Version 2 gets version 1's output attached under /kaggle/input/<slug>/
    # (kernel_sources) and copies it back before training resumes.
    from trainer import submit

    _kernel_path(monkeypatch)
    overrides = _digits_overrides(tmp_path)

    def version(n: int, deadline: str, resume_from: str):
        working = tmp_path / f"v{n}" / "working"
        working.mkdir(parents=True)
        nb = submit.render_notebook(
            "kaggle",
            name="digits",
            job_url=os.path.join(ROOT, "jobs", "digits.toml"),
            workdir="/kaggle/working/run",
            package="unused",
            overrides=overrides,
            deadline=deadline,
            install=False,
            resume_from=resume_from,
        )
        nb = _with_parameters(
            nb,
            WORKING=str(working),
            INPUT=str(tmp_path / "input"),
            WORKDIR=str(working / "run"),
        )
        return _execute(nb, str(working)), working

    printed, working1 = version(1, "1s", resume_from="")
    assert "push again (or Run All) to resume" in printed, printed[-2000:]
    first = _summary(str(working1 / "run"))
    assert first["status"] == "preempted" and first["global_step"] >= 1
    # Kaggle saves version 1's /kaggle/working as its output; version 2 has it
    # attached (its own kernel as a source) under /kaggle/input/<slug>/.
    shutil.copytree(working1, tmp_path / "input" / "digits-resnet50")

    printed, working2 = version(2, "1h", resume_from="me/digits-resnet50")
    assert f"restored {working2 / 'run'} from" in printed, printed[-2000:]
    assert f"resuming from step {first['global_step']}" in printed, printed[-3000:]
    summary = _summary(str(working2 / "run"))
    assert summary["status"] == "completed" and summary["global_step"] == 4, summary

"""`trainer submit`: what each target renders, validates and runs.

Cloud CLIs are not here, so the launching commands are stand-in scripts on
PATH that record their argv; Cloud Storage is the GCS emulator; the GCE
startup script runs for real in bash against a loopback metadata server.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest

from tests import gce_metadata
from trainer import config, submit
from trainer.errors import SubmitError

ROOT = pathlib.Path(__file__).resolve().parents[1]
JOB = str(ROOT / "jobs" / "digits.toml")
PACKAGE = "trainer @ git+https://github.com/OWNER/REPO@main"
GCS_DATA = [
    "data.train=gs://bucket/digits/train-*.tfrecord",
    "data.validation=gs://bucket/digits/validation-*.tfrecord",
]
OPTIONS = {
    "vertex": {"image_uri": "us-docker.pkg.dev/p/r/trainer:1"},
    "gce": {"package": PACKAGE},
    "kaggle": {"package": PACKAGE, "kernel_id": "me/digits-resnet50"},
    "colab": {"package": PACKAGE},
}


def dry_run(target, tmp_path, workdir="gs://bucket/runs/r1", **options):
    opts = {"overrides": GCS_DATA, "out_dir": str(tmp_path / target), **OPTIONS[target]}
    opts.update(options)
    return submit.submit(target, JOB, workdir, dry_run=True, **opts)


def fake_tool(bin_dir: pathlib.Path, name: str, exit_code: int = 0) -> pathlib.Path:
    """A stand-in CLI that appends its argv (one JSON list a line) to NAME.log."""
    log = bin_dir / f"{name}.log"
    script = bin_dir / name
    script.write_text(
        "#!/usr/bin/env bash\n"
        f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\" >> {log}\n"
        f"exit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return log


def calls(log: pathlib.Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


# ---------------------------------------------------------------------------
# Dry runs: valid artifacts for every target, nothing touched


def test_vertex_custom_job_is_a_spot_job_that_derives_its_workdir(tmp_path, capsys):
    result = dry_run(
        "vertex", tmp_path, timeout="24h", accelerator_type="NVIDIA_TESLA_T4"
    )
    with open(result["files"]["custom_job.json"]) as f:
        custom_job = json.load(f)
    with open(result["files"]["custom_job_spec.json"]) as f:
        job_spec = json.load(f)
    assert custom_job["jobSpec"] == job_spec
    assert custom_job["displayName"] == "digits-resnet50"
    assert job_spec["scheduling"] == {
        "strategy": "SPOT",
        "restartJobOnWorkerRestart": True,
        "timeout": "86400s",
    }
    assert job_spec["baseOutputDirectory"] == {"outputUriPrefix": "gs://bucket/runs/r1"}
    (pool,) = job_spec["workerPoolSpecs"]
    assert pool["replicaCount"] == 1
    assert pool["machineSpec"] == {
        "machineType": "n1-standard-8",
        "acceleratorType": "NVIDIA_TESLA_T4",
        "acceleratorCount": 1,
    }
    container = pool["containerSpec"]
    assert container["imageUri"] == "us-docker.pkg.dev/p/r/trainer:1"
    args = container["args"]
    # No --workdir: `trainer train` takes AIP_CHECKPOINT_DIR's parent, which
    # Vertex derives from baseOutputDirectory.
    assert args[:2] == ["train", "--job=gs://bucket/runs/r1/job.toml"]
    assert not any(a.startswith("--workdir") for a in args)
    assert [a for a in args if a.startswith("--set=")] == [
        f"--set={s}" for s in GCS_DATA
    ]
    assert result["upload"] == (
        str(tmp_path / "vertex" / "job.toml"),
        "gs://bucket/runs/r1/job.toml",
    )
    assert result["command"] == [
        "gcloud", "ai", "custom-jobs", "create",
        "--region=us-central1",
        "--display-name=digits-resnet50",
        f"--config={result['files']['custom_job_spec.json']}",
    ]  # fmt: skip
    out = capsys.readouterr().out
    assert '"strategy": "SPOT"' in out
    assert "would upload" in out and "would run: gcloud ai custom-jobs create" in out


_DECODE = """
import json, sys
from apitools.base.py import encoding
from googlecloudsdk.generated_clients.apis.aiplatform.v1 import aiplatform_v1_messages as m

def unknown(msg, path):
    bad = [f"{path}.{k}" for k in msg.all_unrecognized_fields()]
    for field in msg.all_fields():
        value = getattr(msg, field.name)
        for v in value if isinstance(value, list) else [value]:
            if hasattr(v, "all_unrecognized_fields"):
                bad += unknown(v, f"{path}.{field.name}")
    return bad

for path, cls in [(sys.argv[1], m.GoogleCloudAiplatformV1CustomJobSpec),
                  (sys.argv[2], m.GoogleCloudAiplatformV1CustomJob)]:
    msg = encoding.DictToMessage(json.load(open(path)), cls)
    print(json.dumps(unknown(msg, cls.__name__)))
"""


def _gcloud_sdk():
    """(bundled python, sys.path entries) of an installed Google Cloud SDK, or None."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    root = pathlib.Path(os.path.realpath(gcloud)).parents[1]
    python = root / "platform" / "bundledpythonunix" / "bin" / "python3"
    messages = (
        root
        / "lib"
        / "googlecloudsdk"
        / "generated_clients"
        / "apis"
        / "aiplatform"
        / "v1"
    )
    if not python.exists() or not messages.exists():
        return None
    return str(python), [str(root / "lib"), str(root / "lib" / "third_party")]


def test_vertex_spec_decodes_with_gclouds_own_api_messages(tmp_path):
    # gcloud's --config is decoded into these apitools classes; an unknown or
    # misspelt field would show up as unrecognized here.
    sdk = _gcloud_sdk()
    if sdk is None:
        pytest.skip(
            "the Google Cloud SDK (gcloud, with its bundled Python) is not installed"
        )
    python, path = sdk
    result = dry_run(
        "vertex",
        tmp_path,
        timeout="24h",
        max_wait="2h",
        accelerator_type="NVIDIA_TESLA_T4",
    )
    proc = subprocess.run(
        [
            python,
            "-c",
            _DECODE,
            result["files"]["custom_job_spec.json"],
            result["files"]["custom_job.json"],
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [[], []]


def test_vertex_job_already_in_cloud_storage_is_used_as_is(tmp_path, monkeypatch):
    # A job URL is read where it is (here via memory://), never re-uploaded.
    import fsspec

    with fsspec.open("memory://jobs/digits.toml", "w") as f:
        f.write(pathlib.Path(JOB).read_text())
    result = submit.submit(
        "vertex",
        "memory://jobs/digits.toml",
        "gs://bucket/runs/r1",
        dry_run=True,
        overrides=GCS_DATA,
        out_dir=str(tmp_path),
        image_uri="img",
    )
    assert result["upload"] is None
    args = result["custom_job"]["jobSpec"]["workerPoolSpecs"][0]["containerSpec"][
        "args"
    ]
    assert args[1] == "--job=memory://jobs/digits.toml"


def _from_file(command: list[str]) -> dict[str, str]:
    (flag,) = [c for c in command if c.startswith("--metadata-from-file=")]
    return dict(e.split("=", 1) for e in flag.split("=", 1)[1].split(","))


def test_gce_renders_a_managed_group_of_one_spot_vm(tmp_path):
    result = dry_run(
        "gce",
        tmp_path,
        accelerator_type="nvidia-tesla-t4",
        service_account="runner@p.iam.gserviceaccount.com",
    )
    startup = result["files"]["startup.sh"]
    subprocess.run(["bash", "-n", startup], check=True)
    (template_step, _), (group_step, probe), *rest = result["steps"]
    template = template_step[4]
    assert template_step[:4] == ["gcloud", "compute", "instance-templates", "create"]
    assert template.startswith("digits-resnet50-")
    for flag in (
        "--provisioning-model=SPOT",
        "--instance-termination-action=STOP",
        "--scopes=cloud-platform",
        # Defect 3: a GPU gets a machine type it attaches to, not e2-standard-8.
        "--machine-type=n1-standard-8",
        "--accelerator=type=nvidia-tesla-t4,count=1",
        "--maintenance-policy=TERMINATE",
        # Defect 4: an image whose Python is new enough (driver installed at boot).
        "--image-project=debian-cloud",
        "--image-family=debian-12",
        "--service-account=runner@p.iam.gserviceaccount.com",
    ):
        assert flag in template_step, flag
    assert group_step == [
        "gcloud", "compute", "instance-groups", "managed", "create",
        "digits-resnet50", "--zone=us-central1-a", f"--template={template}",
        "--size=1", "--base-instance-name=digits-resnet50",
    ]  # fmt: skip
    assert probe[-3:] == ["describe", "digits-resnet50", "--zone=us-central1-a"]
    assert [c[4] for c, _ in rest] == ["set-instance-template", "resize"]
    entries = _from_file(template_step)
    assert entries["startup-script"] == startup
    values = {
        k: pathlib.Path(v).read_text()
        for k, v in entries.items()
        if k not in ("startup-script", "trainer-give-up-at")
    }
    assert values == {
        "trainer-job": "gs://bucket/runs/r1/job.toml",
        "trainer-workdir": "gs://bucket/runs/r1",
        # GPU VM: the [gpu] extra brings tensorflow[and-cuda].
        "trainer-package": "trainer[gpu] @ git+https://github.com/OWNER/REPO@main",
        "trainer-set": "\n".join(GCS_DATA),
        "trainer-on-done": "delete",
        "trainer-group": "digits-resnet50",
        "trainer-template": template,
        "trainer-gpu": "true",
    }
    give_up_at = int(pathlib.Path(entries["trainer-give-up-at"]).read_text())
    assert abs(give_up_at - (time.time() + 7 * 24 * 3600)) < 60


@pytest.mark.parametrize(
    "target,gpu,machine,expected",
    [
        ("gce", "nvidia-l4", "", ("g2-standard-8", None)),
        ("gce", "nvidia-tesla-a100", "a2-highgpu-2g", ("a2-highgpu-2g", None)),
        ("vertex", "NVIDIA_L4", "", ("g2-standard-8", 1)),
        ("vertex", "NVIDIA_TESLA_A100", "a2-highgpu-2g", ("a2-highgpu-2g", 2)),
        ("vertex", "NVIDIA_TESLA_T4", "", ("n1-standard-8", 1)),
    ],
)
def test_gpu_machine_types_follow_the_accelerator(
    target, gpu, machine, expected, tmp_path
):
    result = dry_run(target, tmp_path, accelerator_type=gpu, machine_type=machine)
    if target == "vertex":
        spec = result["custom_job"]["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]
        assert (spec["machineType"], spec["acceleratorCount"]) == expected
        assert spec["acceleratorType"] == gpu
    else:
        command = result["steps"][0][0]
        assert f"--machine-type={expected[0]}" in command
        # Accelerator-optimized types come with their GPUs: no --accelerator.
        assert not any(c.startswith("--accelerator=") for c in command)


@pytest.mark.parametrize("target", ["gce", "vertex"])
def test_a_gpu_on_a_machine_type_it_cannot_attach_to_is_refused(target, tmp_path):
    # Defect 3: e2-standard-8 (GCE's CPU default) takes no GPU.
    gpu = "nvidia-tesla-t4" if target == "gce" else "NVIDIA_TESLA_T4"
    with pytest.raises(
        submit.SubmitError,
        match=r"--machine_type: received 'e2-standard-8'; a nvidia-tesla-t4 GPU "
        r"attaches only to N1 machine types: pass --machine_type=n1-standard-8",
    ):
        dry_run(target, tmp_path, accelerator_type=gpu, machine_type="e2-standard-8")
    with pytest.raises(submit.SubmitError, match=r"--accelerator_type: received 'k80'"):
        dry_run(target, tmp_path, accelerator_type="k80")
    with pytest.raises(submit.SubmitError, match=r"a2-highgpu-2g comes with 2 GPU"):
        dry_run(
            target,
            tmp_path,
            accelerator_type=gpu.replace("TESLA_T4", "TESLA_A100").replace(
                "tesla-t4", "tesla-a100"
            ),
            machine_type="a2-highgpu-2g",
            accelerator_count=1,
        )


def test_gce_refuses_images_with_an_old_python(tmp_path):
    # Defect 4: Deep Learning VM families ship Python 3.10 (Debian 11).
    with pytest.raises(
        submit.SubmitError,
        match=r"--image_family: received 'common-cu121-debian-11-py310', whose "
        r"Python is older than 3.11.*debian-12",
    ):
        dry_run(
            "gce",
            tmp_path,
            accelerator_type="nvidia-tesla-t4",
            image_family="common-cu121-debian-11-py310",
            image_project="deeplearning-platform-release",
        )


def job_named(tmp_path, name: str) -> pathlib.Path:
    """The digits job under another `name` (which submit derives names from)."""
    job = tmp_path / f"{name.replace(' ', '-')}.toml"
    job.write_text(
        pathlib.Path(JOB)
        .read_text()
        .replace('name = "digits-resnet50"', f"name = {json.dumps(name)}")
    )
    return job


def test_gce_names_start_with_a_letter(tmp_path):
    job = job_named(tmp_path, "2024 run")
    result = submit.submit(
        "gce", str(job), "gs://bucket/runs/r1", dry_run=True, overrides=GCS_DATA,
        out_dir=str(tmp_path / "o"), package=PACKAGE,
    )  # fmt: skip
    assert result["steps"][1][0][5] == "trainer-2024-run"
    with pytest.raises(submit.SubmitError, match=r"--vm_name: received '9vm'"):
        dry_run("gce", tmp_path, vm_name="9vm")


def test_kaggle_renders_notebook_and_kernel_metadata(tmp_path, capsys):
    import nbformat

    result = dry_run(
        "kaggle",
        tmp_path,
        accelerator="tpu",
        dataset_sources=["me/digits-shards"],
        overrides=[],
        workdir="/kaggle/working/run",
    )
    meta_path = result["files"]["kernel-metadata.json"]
    with open(meta_path) as f:
        meta = json.load(f)
    for key in ("id", "title", "code_file", "language", "kernel_type"):
        assert meta[key], key
    assert meta["id"] == "me/digits-resnet50"
    assert meta["language"] == "python" and meta["kernel_type"] == "notebook"
    assert (meta["enable_gpu"], meta["enable_tpu"], meta["enable_internet"]) == (
        False,
        True,
        True,
    )
    assert meta["machine_shape"] == "TpuV5E8"
    assert meta["dataset_sources"] == ["me/digits-shards"]
    assert meta["kernel_sources"] == []  # A dry run cannot know of a previous version.
    notebook_path = os.path.join(os.path.dirname(meta_path), meta["code_file"])
    notebook = nbformat.read(notebook_path, as_version=4)
    nbformat.validate(notebook)
    source = "\n".join(cell.source for cell in notebook.cells)
    # The platform's TensorFlow stays: no extra on the requirement.
    assert f"PACKAGE = {PACKAGE!r}" in source
    assert "[cpu]" not in source.replace("[cpu]/[gpu]", "")
    assert "DEADLINE = '8h30m'" in source  # TPU sessions end at 9 h.
    assert (
        "trainer.train.run(" in source and "push again (or Run All) to resume" in source
    )
    # A local job spec is embedded: the notebook needs nothing from this machine.
    assert 'name = "digits-resnet50"' in source
    assert result["command"] == [
        "kaggle",
        "kernels",
        "push",
        "-p",
        str(tmp_path / "kaggle"),
    ]
    assert "would run: kaggle kernels push -p" in capsys.readouterr().out


def test_colab_renders_a_notebook_and_says_there_is_no_submit_api(tmp_path, capsys):
    import nbformat

    result = dry_run("colab", tmp_path, workdir="/content/drive/MyDrive/runs/r1")
    (path,) = result["files"].values()
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert result["command"] == []
    params = notebook.cells[1]
    assert params.metadata["tags"] == ["parameters"]
    assert "WORKDIR = '/content/drive/MyDrive/runs/r1'" in params.source
    assert "DEADLINE = '11h30m'" in params.source
    out = capsys.readouterr().out
    assert "Colab has no submit API" in out and "Run all" in out


def test_committed_notebook_templates_are_current():
    for rel, text in submit.template_files().items():
        assert (ROOT / "deploy" / rel).read_text() == text, (
            f"deploy/{rel} is stale: run `python -m trainer.submit`"
        )


@pytest.mark.parametrize("platform", ["kaggle", "colab"])
def test_notebook_code_cells_compile_with_an_embedded_job(platform):
    # A job spec full of quotes and backslashes must survive embedding.
    import nbformat

    notebook = submit.render_notebook(
        platform,
        name="x",
        job_url=JOB,
        workdir="gs://b/r",
        package=PACKAGE,
        overrides=["name='a\\b\"c'"],
        gcs_secret="KEY",
    )
    nbformat.validate(notebook)
    namespace: dict = {}
    for cell in notebook.cells:
        if cell.cell_type == "code":
            compile(cell.source, f"<{platform}:{cell.id}>", "exec")
    exec(notebook.cells[1].source, namespace)  # The parameters cell.
    assert namespace["JOB_TOML"] == pathlib.Path(JOB).read_text()
    assert namespace["OVERRIDES"] == ["name='a\\b\"c'"]
    assert namespace["INSTALL"] is True
    assert ("GCS_SECRET" in namespace) == (platform == "kaggle")
    assert ("RESUME_FROM" in namespace) == (platform == "kaggle")
    assert ("DRIVE" in namespace) == (platform == "colab")


# ---------------------------------------------------------------------------
# Bad input: one clear error naming the flag or key and the remedy


def test_unknown_target_lists_the_choices(tmp_path):
    with pytest.raises(
        submit.SubmitError,
        match=r"--target: received 'sagemaker'; expected one of vertex, gce, kaggle, colab",
    ):
        submit.submit("sagemaker", JOB, "gs://b/r", dry_run=True)


@pytest.mark.parametrize("target", ["vertex", "gce"])
def test_cloud_targets_need_a_gcs_workdir(target, tmp_path):
    with pytest.raises(
        submit.SubmitError, match=r"--workdir: received 'runs/r1'.*gs://BUCKET"
    ):
        dry_run(target, tmp_path, workdir="runs/r1")


def test_notebook_targets_refuse_a_workdir_the_session_wipes(tmp_path):
    with pytest.raises(submit.SubmitError, match=r"--workdir.*/content/drive/MyDrive"):
        dry_run("colab", tmp_path, workdir="/content/run")
    with pytest.raises(submit.SubmitError, match=r"--workdir.*/kaggle/working"):
        dry_run("kaggle", tmp_path, workdir="/tmp/run")


def test_cloud_targets_need_data_in_cloud_storage(tmp_path):
    with pytest.raises(
        submit.SubmitError,
        match=r"data.train: received 'data/digits/train-\*.tfrecord'.*--set=data.train=gs://",
    ):
        dry_run("vertex", tmp_path, overrides=[])


def test_the_job_must_parse(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(pathlib.Path(JOB).read_text().replace("image_size", "imag_size"))
    with pytest.raises(config.SpecError, match="did you mean 'image_size'"):
        submit.submit("colab", str(bad), "gs://b/r", dry_run=True, package=PACKAGE)
    with pytest.raises(FileNotFoundError, match="job spec not found"):
        submit.submit(
            "colab",
            str(tmp_path / "none.toml"),
            "gs://b/r",
            dry_run=True,
            package=PACKAGE,
        )


def test_missing_required_options_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("TRAINER_PACKAGE", raising=False)
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    with pytest.raises(
        submit.SubmitError, match=r"--image_uri is required.*deploy/docker/Dockerfile"
    ):
        dry_run("vertex", tmp_path, image_uri="")
    with pytest.raises(submit.SubmitError, match=r"--package is required"):
        dry_run("gce", tmp_path, package="")
    with pytest.raises(submit.SubmitError, match=r"--image_project is required"):
        dry_run("gce", tmp_path, image_family="ubuntu-2404-lts-amd64")
    with pytest.raises(submit.SubmitError, match=r"--give_up_after: duration"):
        dry_run("gce", tmp_path, give_up_after="soon")
    with pytest.raises(submit.SubmitError, match=r"--kernel_id"):
        dry_run("kaggle", tmp_path, kernel_id="")
    with pytest.raises(submit.SubmitError, match=r"--accelerator: received 'h100'"):
        dry_run("kaggle", tmp_path, accelerator="h100")
    with pytest.raises(
        submit.SubmitError, match=r"unknown submit option\(s\) \['regoin'\]"
    ):
        dry_run("vertex", tmp_path, regoin="x")


# ---------------------------------------------------------------------------
# Real submits: the job is uploaded, then the CLI runs


def test_missing_cli_is_a_clear_error_before_anything_is_uploaded(
    tmp_path, monkeypatch
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(
        submit.SubmitError,
        match=r"`gcloud` not found on PATH.*install the Google Cloud CLI.*--dry_run",
    ):
        submit.submit(
            "vertex", JOB, "gs://no-such-bucket/r", overrides=GCS_DATA,
            out_dir=str(tmp_path / "out"), image_uri="img",
        )  # fmt: skip
    with pytest.raises(submit.SubmitError, match=r"`kaggle` not found.*kaggle.json"):
        submit.submit(
            "kaggle", JOB, "gs://b/r", out_dir=str(tmp_path / "k"), **OPTIONS["kaggle"]
        )


def test_vertex_submit_uploads_the_job_then_runs_gcloud(
    gcs_bucket, tmp_path, monkeypatch
):
    from trainer import storage

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = fake_tool(bin_dir, "gcloud")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    workdir = f"{gcs_bucket}/runs/r1"
    result = submit.submit(
        "vertex",
        JOB,
        workdir,
        overrides=GCS_DATA,
        out_dir=str(tmp_path / "out"),
        image_uri="img",
    )
    assert storage.read_text(f"{workdir}/job.toml") == pathlib.Path(JOB).read_text()
    assert calls(log) == [result["command"][1:]]
    config_path = result["command"][-1].split("=", 1)[1]
    with open(config_path) as f:
        assert json.load(f)["scheduling"]["strategy"] == "SPOT"


def test_upload_to_a_missing_bucket_is_one_clear_error(
    gcs_server, tmp_path, monkeypatch
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = fake_tool(bin_dir, "gcloud")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(
        submit.SubmitError,
        match=r"could not upload the job spec to gs://no-such-bucket-x1/r/job.toml.*gcloud auth",
    ):
        submit.submit(
            "vertex", JOB, "gs://no-such-bucket-x1/r", overrides=GCS_DATA,
            out_dir=str(tmp_path / "o"), image_uri="img",
        )  # fmt: skip
    assert calls(log) == []  # Nothing launched without its job spec.


def test_failing_cli_raises(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tool(bin_dir, "kaggle", exit_code=1)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # The tool printed why; ours is one line (exit 2), not a traceback.
    with pytest.raises(
        SubmitError, match=r"kaggle kernels push -p .* failed with exit code 1"
    ):
        submit.submit(
            "kaggle", JOB, "gs://b/r", out_dir=str(tmp_path / "k"), **OPTIONS["kaggle"]
        )


# ---------------------------------------------------------------------------
# The GCE startup script, run for real against a loopback metadata server


@pytest.fixture
def metadata_server():
    with gce_metadata.serve() as server:
        yield server


def run_startup(
    tmp_path, metadata_server, exit_codes: list[int], path_first="", **attributes
):
    """Runs deploy/gce/startup.sh with a stand-in `trainer` exiting with `exit_codes`."""
    if shutil.which("curl") is None:
        pytest.skip("curl is needed by the startup script")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud_log = fake_tool(bin_dir, "gcloud")
    codes = tmp_path / "codes"
    codes.write_text("\n".join(map(str, exit_codes)) + "\n")
    trainer_log = tmp_path / "trainer.log"
    trainer = bin_dir / "trainer"
    trainer.write_text(
        "#!/usr/bin/env bash\n"
        f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\" >> {trainer_log}\n"
        f"code=$(head -n1 {codes}); sed -i 1d {codes}; exit $code\n"
    )
    trainer.chmod(0o755)
    metadata_server.values = {
        "instance/name": "vm-1",
        "instance/zone": "projects/123/zones/us-central1-a",
        **{
            f"instance/attributes/{k.replace('_', '-')}": v
            for k, v in attributes.items()
        },
    }
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    env = {
        "PATH": f"{path_first}{os.pathsep}{path}" if path_first else path,
        "TRAINER_METADATA_URL": metadata_server.url,
        "TRAINER_HOME": str(tmp_path / "home"),
        "TRAINER_RETRY_SECONDS": "0",
    }
    proc = subprocess.run(
        ["bash", str(submit.GCE_STARTUP_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    trainer_calls = calls(trainer_log)
    return proc, trainer_calls, calls(gcloud_log)


JOB_META = {
    "trainer_job": "gs://b/runs/r1/job.toml",
    "trainer_workdir": "gs://b/runs/r1",
    "trainer_set": "train.seed=1\nphases.finetune.epochs=1",
    "trainer_group": "digits",
    "trainer_template": "digits-0123abcd",
}
MIG = ["compute", "instance-groups", "managed"]
LEAVE = [*MIG, "abandon-instances", "digits", "--instances=vm-1",
         "--zone=us-central1-a", "--quiet"]  # fmt: skip
DELETE_GROUP = [
    [*MIG, "delete", "digits", "--zone=us-central1-a", "--quiet"],
    ["compute", "instance-templates", "delete", "digits-0123abcd", "--quiet"],
]


def vm(action: str) -> list[str]:
    return ["compute", "instances", action, "vm-1", "--zone=us-central1-a", "--quiet"]


def test_startup_script_tears_the_group_down_when_the_run_completes(
    tmp_path, metadata_server
):
    proc, trainer_calls, gcloud_calls = run_startup(
        tmp_path, metadata_server, [0], **JOB_META
    )
    assert proc.returncode == 0, proc.stderr
    assert trainer_calls == [[
        "train", "--job=gs://b/runs/r1/job.toml", "--workdir=gs://b/runs/r1",
        "--set=train.seed=1", "--set=phases.finetune.epochs=1",
    ]]  # fmt: skip
    # Out of the group first (else it would recreate the VM), then the group
    # and its template, then the VM itself.
    assert gcloud_calls == [LEAVE, *DELETE_GROUP, vm("delete")]


def test_startup_script_just_exits_when_preempted(tmp_path, metadata_server):
    # 75: a durable checkpoint is written and GCE is stopping the VM; the
    # group recreates it, and this script, run again, resumes.
    proc, trainer_calls, gcloud_calls = run_startup(
        tmp_path, metadata_server, [75], **JOB_META
    )
    assert proc.returncode == 0, proc.stderr
    assert len(trainer_calls) == 1
    assert gcloud_calls == []
    assert "preempted" in proc.stderr


def test_startup_script_retries_failures_then_completes(tmp_path, metadata_server):
    proc, trainer_calls, gcloud_calls = run_startup(
        tmp_path, metadata_server, [1, 1, 0], **JOB_META, trainer_on_done="stop"
    )
    assert proc.returncode == 0, proc.stderr
    assert len(trainer_calls) == 3
    assert gcloud_calls == [LEAVE, *DELETE_GROUP, vm("stop")]


def test_startup_script_leaves_the_group_and_stops_on_bad_input(
    tmp_path, metadata_server
):
    proc, trainer_calls, gcloud_calls = run_startup(
        tmp_path, metadata_server, [2, 0], **JOB_META
    )
    assert proc.returncode == 2
    assert len(trainer_calls) == 1  # Retrying a bad spec cannot help.
    # Stopped, not deleted: its logs stay; out of the group: not recreated.
    assert gcloud_calls == [LEAVE, vm("stop")]


def test_startup_script_gives_up_after_the_retry_window(tmp_path, metadata_server):
    proc, trainer_calls, gcloud_calls = run_startup(
        tmp_path,
        metadata_server,
        [0],
        **JOB_META,
        trainer_give_up_at=str(int(time.time()) - 1),
    )
    assert proc.returncode == 0, proc.stderr
    assert trainer_calls == []
    assert "past its give-up time" in proc.stderr
    assert gcloud_calls == [LEAVE, *DELETE_GROUP, vm("stop")]


def test_startup_script_refuses_a_python_older_than_3_11(tmp_path, metadata_server):
    # Defect 4: on an image whose python3 is 3.10 pip would fail on our
    # requires-python; the script says why, and which image works.
    bin_dir = tmp_path / "old-python"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1" == "-V" ]]; then echo "Python 3.10.12"; exit 0; fi\n'
        "exit 1\n"
    )
    python3.chmod(0o755)
    proc, trainer_calls, gcloud_calls = run_startup(
        tmp_path,
        metadata_server,
        [0],
        **JOB_META,
        trainer_package="trainer[cpu] @ git+https://example.invalid/x",
        path_first=str(bin_dir),
    )
    assert proc.returncode == 2, proc.stderr
    assert "python3 is Python 3.10.12; trainer needs Python >= 3.11" in proc.stderr
    assert "debian-12" in proc.stderr
    assert trainer_calls == []
    assert gcloud_calls == [LEAVE, vm("stop")]


def _fake_trainer_wheel(directory: pathlib.Path, log: pathlib.Path) -> pathlib.Path:
    """A real wheel whose `trainer` console script logs its argv and exits 0."""
    import base64
    import hashlib
    import zipfile

    name = "fake_trainer-0.1.dist-info"
    files = {
        "fake_trainer.py": (
            "import json, sys\n"
            "def main():\n"
            f"    with open({str(log)!r}, 'a') as f:\n"
            "        f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        ),
        f"{name}/METADATA": "Metadata-Version: 2.1\nName: fake-trainer\nVersion: 0.1\n",
        f"{name}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{name}/entry_points.txt": "[console_scripts]\ntrainer = fake_trainer:main\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(
            hashlib.sha256(text.encode()).digest()
        ).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{name}/RECORD,,")
    files[f"{name}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / "fake_trainer-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def test_startup_script_installs_the_package_into_a_venv_once(
    tmp_path, metadata_server
):
    # The install branch for real: python3 -m venv, pip install of a wheel with
    # the [cpu] extra submit adds, then the venv's `trainer` runs the job.
    wheel_log = tmp_path / "wheel-trainer.log"
    wheel = _fake_trainer_wheel(tmp_path, wheel_log)
    meta = {**JOB_META, "trainer_package": f"{wheel}[cpu]"}
    proc, stand_in_calls, gcloud_calls = run_startup(
        tmp_path, metadata_server, [0], **meta
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stand_in_calls == []  # The venv's trainer ran, not the one on PATH.
    assert calls(wheel_log)[0][:3] == [
        "train",
        "--job=gs://b/runs/r1/job.toml",
        "--workdir=gs://b/runs/r1",
    ]
    assert gcloud_calls[-1][:3] == ["compute", "instances", "delete"]
    assert (tmp_path / "home" / "venv" / "bin" / "trainer").exists()


# ---------------------------------------------------------------------------
# The command line, in process: `trainer submit`'s flags reach `submit.submit`


def test_cli_submit_dry_run_and_bad_input(tmp_path, capsys):
    from trainer import main

    def trainer(*args):
        code = main.run(["trainer", "submit", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    ok = trainer(
        "--target=vertex", f"--job={JOB}", "--workdir=gs://bucket/runs/r1",
        "--image_uri=img", *(f"--set={s}" for s in GCS_DATA),
        f"--out_dir={tmp_path}", "--dry_run",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (
        '"strategy": "SPOT"' in ok.stdout
        and "would run: gcloud ai custom-jobs create" in ok.stdout
    )
    bad = trainer("--target=gce", f"--job={JOB}", "--workdir=runs/r1", "--dry_run")
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert (
        "--workdir: received 'runs/r1'" in bad.stderr and "Traceback" not in bad.stderr
    )
    bad = trainer(
        "--target=sagemaker", f"--job={JOB}", "--workdir=gs://b/r", "--dry_run"
    )
    assert (
        bad.returncode == 2
        and "expected one of vertex, gce, kaggle, colab" in bad.stderr
    )
    # Flags of every kind arrive as the options of the same name.
    ok = trainer(
        "--target=kaggle", f"--job={JOB}", "--workdir=/kaggle/working/r",
        "--kernel_id=me/digits-resnet50", "--accelerator=tpu",
        "--dataset_sources=me/a", "--dataset_sources=me/b",
        "--nointernet", "--package=/kaggle/input/w/t.whl",
        "--set=model.weights=none", f"--out_dir={tmp_path / 'k'}", "--dry_run",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    meta = json.loads((tmp_path / "k" / "kernel-metadata.json").read_text())
    assert meta["dataset_sources"] == ["me/a", "me/b"]
    assert (meta["enable_tpu"], meta["enable_internet"]) == (True, False)


# ---------------------------------------------------------------------------
# Checked against the platforms' own definitions


def test_vertex_custom_job_parses_into_aiplatforms_own_message_types(tmp_path):
    # google-cloud-aiplatform's gapic types: an unknown field or an enum value
    # Vertex does not know (acceleratorType, scheduling.strategy) fails here.
    aiplatform = pytest.importorskip("google.cloud.aiplatform_v1")
    result = dry_run(
        "vertex",
        tmp_path,
        timeout="24h",
        max_wait="2h",
        accelerator_type="nvidia-l4",
        service_account="runner@p.iam.gserviceaccount.com",
    )
    for name, cls in [
        ("custom_job.json", aiplatform.CustomJob),
        ("custom_job_spec.json", aiplatform.CustomJobSpec),
    ]:
        text = pathlib.Path(result["files"][name]).read_text()
        cls.from_json(text)  # ignore_unknown_fields=False: unknown keys raise.
    text = pathlib.Path(result["files"]["custom_job.json"]).read_text()
    job = aiplatform.CustomJob.from_json(text)
    assert job.job_spec.scheduling.strategy == aiplatform.Scheduling.Strategy.SPOT
    machine = job.job_spec.worker_pool_specs[0].machine_spec
    assert machine.accelerator_type == aiplatform.AcceleratorType.NVIDIA_L4
    with pytest.raises(Exception, match="SPOTTY"):  # The check can fail.
        aiplatform.CustomJob.from_json(text.replace('"SPOT"', '"SPOTTY"'))
    with pytest.raises(Exception, match="machineTyp"):
        aiplatform.CustomJob.from_json(text.replace("machineType", "machineTyp"))


def test_every_vertex_gpu_name_is_an_aiplatform_accelerator_type():
    aiplatform = pytest.importorskip("google.cloud.aiplatform_v1")
    for vertex_name, _, _ in submit.GPUS.values():
        assert aiplatform.AcceleratorType[vertex_name], vertex_name


class _ComputeApi:
    """A Compute Engine API stand-in on 127.0.0.1 that records what gcloud sends."""

    def __init__(self):
        import http.server
        import threading

        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                path = self.path.split("?")[0]
                requests.append((self.command, path, json.loads(body or "null")))
                url = f"http://127.0.0.1:{self.server.server_port}{path}"
                data = {"kind": "compute#operation", "name": "op", "status": "DONE",
                        "selfLink": url, "targetLink": url}  # fmt: skip
                if self.command == "GET":
                    data = {"name": path.rsplit("/", 1)[-1], "selfLink": url}
                out = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PATCH = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/compute/v1/"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _gcloud_sends(commands, tmp_path) -> list[tuple[str, str, object]]:
    """The API requests that gcloud itself makes of `commands` (no network)."""
    api = _ComputeApi()
    token = tmp_path / "token"
    token.write_text("test-token")
    env = {
        **os.environ,
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"),
        "CLOUDSDK_CORE_PROJECT": "proj",
        "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(token),
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": api.url,
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
    }
    try:
        for command in commands:
            before = len(api.requests)
            proc = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=120
            )
            # gcloud rejects bad flags before any request; the stand-in's thin
            # operation replies may make it fail after, which is not ours.
            assert "unrecognized arguments" not in proc.stderr, proc.stderr
            assert "argument --" not in proc.stderr, proc.stderr
            mutations = [r for r in api.requests[before:] if r[0] != "GET"]
            assert mutations, f"{command}: no request\n{proc.stderr[-2000:]}"
    finally:
        api.close()
    return [r for r in api.requests if r[0] != "GET"]


def _needs_gcloud():
    if shutil.which("gcloud") is None:
        pytest.skip("the Google Cloud CLI (gcloud) is not installed")


def test_gce_commands_are_parsed_by_gcloud_itself(tmp_path):
    _needs_gcloud()
    result = dry_run(
        "gce",
        tmp_path,
        accelerator_type="nvidia-tesla-t4",
        service_account="runner@p.iam.gserviceaccount.com",
    )
    sent = _gcloud_sends([command for command, _ in result["steps"]], tmp_path)
    (template_post, group_post, set_template, resize) = sent
    assert template_post[:2] == (
        "POST",
        "/compute/v1/projects/proj/global/instanceTemplates",
    )
    properties = template_post[2]["properties"]
    assert properties["machineType"] == "n1-standard-8"
    assert properties["guestAccelerators"] == [
        {"acceleratorCount": 1, "acceleratorType": "nvidia-tesla-t4"}
    ]
    assert properties["scheduling"]["provisioningModel"] == "SPOT"
    assert properties["scheduling"]["instanceTerminationAction"] == "STOP"
    assert properties["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert (
        properties["serviceAccounts"][0]["email"] == "runner@p.iam.gserviceaccount.com"
    )
    assert properties["disks"][0]["initializeParams"]["sourceImage"].endswith(
        "projects/debian-cloud/global/images/family/debian-12"
    )
    items = {i["key"]: i["value"] for i in properties["metadata"]["items"]}
    assert items["trainer-workdir"] == "gs://bucket/runs/r1"
    assert items["startup-script"] == submit.GCE_STARTUP_SCRIPT.read_text()
    zone = "/compute/v1/projects/proj/zones/us-central1-a/instanceGroupManagers"
    assert group_post[:2] == ("POST", zone)
    assert group_post[2]["targetSize"] == 1
    assert group_post[2]["instanceTemplate"].endswith(result["steps"][0][0][4])
    assert set_template[:2] == ("PATCH", f"{zone}/digits-resnet50")
    assert resize[:2] == ("POST", f"{zone}/digits-resnet50/resize")


def test_startup_script_gcloud_calls_are_parsed_by_gcloud_itself(
    tmp_path, metadata_server
):
    _needs_gcloud()
    _, _, gcloud_calls = run_startup(tmp_path, metadata_server, [0], **JOB_META)
    sent = _gcloud_sends([["gcloud", *c] for c in gcloud_calls], tmp_path)
    zone = "/compute/v1/projects/proj/zones/us-central1-a"
    assert [r[:2] for r in sent] == [
        ("POST", f"{zone}/instanceGroupManagers/digits/abandonInstances"),
        ("DELETE", f"{zone}/instanceGroupManagers/digits"),
        (
            "DELETE",
            "/compute/v1/projects/proj/global/instanceTemplates/digits-0123abcd",
        ),
        ("DELETE", f"{zone}/instances/vm-1"),
    ]


def _gcloud_state(bin_dir: pathlib.Path) -> pathlib.Path:
    """A gcloud stand-in that remembers what it created: `describe` finds it."""
    state = bin_dir / "state"
    state.mkdir()
    log = bin_dir / "gcloud.log"
    script = bin_dir / "gcloud"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\" >> {log}\n"
        'kind="$2"\n'
        'for a in "$@"; do case "$a" in create|describe) verb=$a;; esac; done\n'
        'name=$(for a in "$@"; do [[ "$a" != -* && "$a" != compute && "$a" != "$verb" ]] && echo "$a"; done | tail -1)\n'
        f'if [[ "$verb" == describe ]]; then [[ -e {state}/"$kind-$name" ]]; exit $?; fi\n'
        f'if [[ "$verb" == create ]]; then\n'
        f'  [[ -e {state}/"$kind-$name" ]] && {{ echo "ERROR: already exists" >&2; exit 1; }}\n'
        f'  touch {state}/"$kind-$name"\n'
        "fi\n"
    )
    script.chmod(0o755)
    return log


def test_submitting_gce_again_resumes_instead_of_failing(
    gcs_bucket, tmp_path, monkeypatch
):
    # Defect 9: a second `gcloud compute instances create` with the same name
    # was rejected. Now the template and group are created once; submitting
    # again points the group at the template and makes sure it runs one VM.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = _gcloud_state(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def submit_once(i):
        return submit.submit(
            "gce", JOB, f"{gcs_bucket}/runs/r1", overrides=GCS_DATA,
            out_dir=str(tmp_path / f"out{i}"), package=PACKAGE,
        )  # fmt: skip

    first = submit_once(1)
    verbs = [c[2] if c[1] == "instance-templates" else c[3] for c in calls(log)]
    assert verbs == ["describe", "create", "describe", "create",
                     "set-instance-template", "resize"]  # fmt: skip
    log.unlink()
    second = submit_once(2)  # Same job: the same template.
    assert second["steps"][0][0][4] == first["steps"][0][0][4]
    verbs = [c[2] if c[1] == "instance-templates" else c[3] for c in calls(log)]
    assert verbs == ["describe", "describe", "set-instance-template", "resize"]
    assert calls(log)[-1][-2:] == ["--size=1", "--zone=us-central1-a"]


def _kaggle_push(folder: str, monkeypatch):
    """kaggle-cli's own `kernels push` on `folder`, up to the network call.

    Returns the ApiSaveKernelRequest it built; raises what its validation raises.
    """
    pytest.importorskip("kaggle")
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    monkeypatch.setenv("KAGGLE_KEY", "0" * 32)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", folder)
    from kaggle.api.kaggle_api_extended import KaggleApi

    sent = []

    class Kernels:
        class kernels_api_client:  # noqa: N801 (kaggle's attribute name)
            @staticmethod
            def save_kernel(request):
                sent.append(request)
                return request

    class Client:
        kernels = Kernels

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    # The network client only: everything before it is kaggle-cli's own code.
    monkeypatch.setattr(KaggleApi, "build_kaggle_client", lambda self: Client())
    KaggleApi().kernels_push(folder)
    (request,) = sent
    return request


def test_kernel_metadata_passes_kaggle_clis_own_push_validation(
    tmp_path, monkeypatch, capsys
):
    result = dry_run(
        "kaggle",
        tmp_path,
        accelerator="gpu",
        dataset_sources=["me/digits-shards"],
        resume_from="me/digits-resnet50",
        workdir="/kaggle/working/run",
    )
    capsys.readouterr()
    request = _kaggle_push(result["out_dir"], monkeypatch)
    out = capsys.readouterr().out
    assert "does not resolve to the specified id" not in out  # title <-> slug
    assert request.slug == "me/digits-resnet50"
    assert request.machine_shape == "NvidiaTeslaT4"
    assert request.enable_gpu and not request.enable_tpu
    assert request.kernel_data_sources == ["me/digits-resnet50"]
    assert request.dataset_data_sources == ["me/digits-shards"]
    assert json.loads(request.text)["cells"][1]["source"].startswith("# Parameters")
    from kaggle.api import kaggle_api_extended

    for shape in submit.KAGGLE_MACHINE_SHAPES:  # None retired in kaggle-cli.
        assert shape.lower() not in kaggle_api_extended._RETIRED_ACCELERATORS


def test_short_kernel_slugs_are_refused_before_kaggle_does(tmp_path, monkeypatch):
    # Defect 7: `--kernel_id=me/cnn` rendered the title "cnn", which Kaggle
    # refuses. kaggle-cli's own check says so:
    with pytest.raises(ValueError, match="at least five characters"):
        from kaggle.api.kaggle_api_extended import KaggleApi

        KaggleApi().validate_kernel_string("me/cnn")
    with pytest.raises(
        submit.SubmitError,
        match=r"--kernel_id: the slug 'cnn' is shorter than 5 characters.*--kernel_id=me/cnn-run",
    ):
        dry_run("kaggle", tmp_path, kernel_id="me/cnn")
    # A default derived from a short job name is lengthened instead.
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    job = job_named(tmp_path, "cnn")
    result = submit.submit(
        "kaggle", str(job), "gs://b/r", dry_run=True, package=PACKAGE,
        out_dir=str(tmp_path / "k"),
    )  # fmt: skip
    assert result["kernel_metadata"]["id"] == "me/cnn-trainer"
    assert result["kernel_metadata"]["title"] == "cnn trainer"
    _kaggle_push(result["out_dir"], monkeypatch)  # kaggle-cli accepts it.


def test_kaggle_machine_shapes_and_internet_off(tmp_path):
    with pytest.raises(
        submit.SubmitError, match=r"--machine_shape: received 'NvidiaTeslaP100'"
    ):
        dry_run("kaggle", tmp_path, machine_shape="NvidiaTeslaP100")
    # Internet off: the package and the weights must come from attached datasets.
    with pytest.raises(submit.SubmitError, match=r"--package: received .*--no-deps"):
        dry_run("kaggle", tmp_path, internet=False, workdir="/kaggle/working/r")
    wheel = "/kaggle/input/trainer-wheel/trainer-0.1.0-py3-none-any.whl"
    with pytest.raises(
        submit.SubmitError, match=r"model.weights: received 'imagenet'.*weights_mirror"
    ):
        dry_run(
            "kaggle",
            tmp_path,
            internet=False,
            package=wheel,
            workdir="/kaggle/working/r",
            overrides=["model.weights=imagenet"],
        )
    with pytest.raises(submit.SubmitError, match=r"cannot reach Cloud Storage"):
        dry_run("kaggle", tmp_path, internet=False, package=wheel)
    result = dry_run(
        "kaggle",
        tmp_path,
        internet=False,
        package=wheel,
        workdir="/kaggle/working/r",
        machine_shape="TpuV5E8",
        dataset_sources=["me/trainer-wheel", "me/keras-weights"],
        overrides=[
            "model.weights=imagenet",
            "model.weights_mirror=/kaggle/input/keras-weights",
        ],
    )
    meta = result["kernel_metadata"]
    assert (meta["enable_internet"], meta["enable_tpu"], meta["machine_shape"]) == (
        False,
        True,
        "TpuV5E8",
    )
    source = "\n".join(c.source for c in result["notebook"].cells)
    assert "INTERNET = False" in source and "'--no-index'" in source
    assert "DEADLINE = '8h30m'" in source  # TPU sessions: 9 hours.


def _kaggle_storage_cell(tmp_path, monkeypatch, secret_value):
    """Runs the Kaggle notebook's parameter and storage cells with a stand-in
    `kaggle_secrets` whose secret is `secret_value` (an exception: not attached)."""
    import types

    class UserSecretsClient:
        def get_secret(self, label):
            if isinstance(secret_value, Exception):
                raise secret_value
            return secret_value

    monkeypatch.setitem(
        sys.modules,
        "kaggle_secrets",
        types.SimpleNamespace(UserSecretsClient=UserSecretsClient),
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "unset")
    working = tmp_path / "working"
    working.mkdir(parents=True)
    notebook = submit.render_notebook(
        "kaggle", name="x", job_url=JOB, workdir="gs://b/r", package=PACKAGE,
        gcs_secret="GCS_KEY",
    )  # fmt: skip
    namespace: dict = {}
    exec(notebook.cells[1].source, namespace)
    namespace.update(WORKING=str(working), INPUT=str(tmp_path / "input"))
    exec(notebook.cells[3].source, namespace)
    return working


def test_kaggle_secret_not_attached_says_how_to_attach_it(tmp_path, monkeypatch):
    # Defect 5: secrets are attached only in the editor; push cannot.
    with pytest.raises(
        RuntimeError, match=r"'GCS_KEY' is not attached.*Add-ons > Secrets"
    ):
        _kaggle_storage_cell(tmp_path, monkeypatch, Exception("BackendError 400"))
    with pytest.raises(RuntimeError, match=r"it is empty.*Add-ons > Secrets"):
        _kaggle_storage_cell(tmp_path / "b", monkeypatch, None)
    result = dry_run("kaggle", tmp_path / "c", gcs_secret="GCS_KEY")
    assert any("cannot attach secrets" in n for n in result["notes"])


def test_kaggle_key_stays_out_of_the_published_output(tmp_path, monkeypatch):
    # Defect 6: /kaggle/working is published as the version's output.
    working = _kaggle_storage_cell(tmp_path, monkeypatch, '{"type": "service_account"}')
    key = os.environ["GOOGLE_APPLICATION_CREDENTIALS"]
    assert pathlib.Path(key).read_text() == '{"type": "service_account"}'
    assert not key.startswith(str(working)) and list(working.iterdir()) == []
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


# ---------------------------------------------------------------------------
# TPU sessions on Kaggle and Colab: Keras on JAX, the image's JAX kept

# What an install must never name on a TPU image: the image's own JAX, jaxlib
# and libtpu would be replaced, and TensorFlow cannot drive the TPU there.
_TPU_IMAGE_PACKAGES = re.compile(r"tensorflow|\bjax\b|jaxlib|libtpu", re.IGNORECASE)
_TPU_SESSIONS = [
    ("kaggle", {"accelerator": "tpu"}, "TpuV5E8"),
    ("kaggle", {"machine_shape": "TpuV6E8"}, "TpuV6E8"),
    ("colab", {"accelerator": "tpu"}, None),
]


def _install_argv(notebook, monkeypatch, **parameters) -> list[list[str]]:
    """The pip commands the notebook's install cell runs (INSTALL = True)."""
    ran = []
    monkeypatch.setattr(subprocess, "check_call", lambda argv: ran.append(argv))
    namespace: dict = {}
    exec(notebook.cells[1].source, namespace)  # The parameters cell.
    namespace.update(parameters)
    exec(notebook.cells[2].source, namespace)  # The install cell.
    return ran


def _until_training(notebook, monkeypatch, **parameters) -> dict:
    """Runs the parameters cell and the train cell up to `import trainer.train`."""
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    namespace: dict = {}
    exec(notebook.cells[1].source, namespace)
    namespace.update(parameters)
    train = notebook.cells[-1].source
    before, found, _ = train.partition("import trainer.train\n")
    assert found, train
    exec(before, namespace)
    return namespace


@pytest.mark.parametrize("target, options, shape", _TPU_SESSIONS)
def test_tpu_sessions_train_with_keras_on_jax_and_keep_the_images_jax(
    target, options, shape, tmp_path, monkeypatch
):
    import nbformat

    workdir = "/kaggle/working/run" if target == "kaggle" else "gs://bucket/runs/r1"
    result = dry_run(target, tmp_path, workdir=workdir, **options)
    notebook = result["notebook"]
    nbformat.validate(notebook)
    if target == "kaggle":
        meta = result["kernel_metadata"]
        assert (meta["enable_tpu"], meta["enable_gpu"], meta["machine_shape"]) == (
            True,
            False,
            shape,
        )
    else:  # How Colab saves a notebook with the v5e-1 TPU runtime.
        assert notebook.metadata["accelerator"] == "TPU"
        assert notebook.metadata["colab"] == {"gpuType": "V5E1"}
    assert any("trains with Keras on JAX" in n for n in result["notes"])

    # The install: plain pip of PACKAGE, no extra, no --upgrade, nothing that
    # names TensorFlow, JAX, jaxlib or libtpu.
    (argv,) = _install_argv(notebook, monkeypatch)
    assert argv == [sys.executable, "-m", "pip", "install", "--quiet", PACKAGE]
    assert not [a for a in argv[1:] if _TPU_IMAGE_PACKAGES.search(a)], argv

    # The run: runtime.backend = "jax" explicitly, Keras told before import.
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # A TPU VM's.
    namespace = _until_training(notebook, monkeypatch)
    assert namespace["ACCELERATOR"] == "tpu"
    assert namespace["spec"].runtime.backend == "jax"
    assert os.environ["KERAS_BACKEND"] == "jax"


def test_a_plain_install_pulls_in_no_tensorflow_jax_or_libtpu():
    """What `pip install trainer` (no extra) resolves to, walked through the
    installed distributions' own requirements: none of the packages a TPU
    image must keep. The [cpu] extra, walked the same way, does name
    TensorFlow (the walk finds what it looks for)."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def closure(requirements: list[str]) -> set[str]:
        seen: set[str] = set()
        todo = [Requirement(r) for r in requirements]
        while todo:
            req = todo.pop()
            name = req.name.lower().replace("_", "-")
            if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
                continue
            seen.add(name)
            try:
                todo += [Requirement(r) for r in md.requires(name) or []]
            except md.PackageNotFoundError:
                pass  # Not installed here: its name is still checked.
        return seen

    plain = closure(project["dependencies"])
    assert {"keras", "tensorboard", "numpy"} <= plain  # The walk went deep.
    assert not sorted(n for n in plain if _TPU_IMAGE_PACKAGES.search(n))
    with_cpu = closure(
        project["dependencies"] + project["optional-dependencies"]["cpu"]
    )
    assert "tensorflow-cpu" in with_cpu


def test_gpu_and_cpu_sessions_are_unchanged(tmp_path, monkeypatch):
    spec = config.load(JOB, ["runtime.backend=tensorflow"])
    for platform in ("kaggle", "colab"):
        for accelerator in ("none", "gpu"):
            assert submit.session_spec(spec, platform, accelerator) is spec
            assert submit.notebook_spec(spec, platform, accelerator, environ={}) is spec
    result = dry_run("kaggle", tmp_path, accelerator="gpu", package="trainer[gpu] @ x")
    assert result["kernel_metadata"]["machine_shape"] == "NvidiaTeslaT4"
    assert not any("JAX" in n for n in result["notes"])
    namespace = _until_training(result["notebook"], monkeypatch)
    assert namespace["spec"].runtime.backend == "auto"
    assert "KERAS_BACKEND" not in os.environ


def test_tpu_with_the_tensorflow_backend_is_exit_2_naming_the_flag(tmp_path, capsys):
    from trainer import main

    def trainer(target, *args):
        workdir = "/kaggle/working/r" if target == "kaggle" else "gs://b/r"
        code = main.run([
            "trainer", "submit", f"--target={target}", f"--job={JOB}",
            f"--workdir={workdir}", f"--package={PACKAGE}",
            "--kernel_id=me/digits-resnet50", f"--out_dir={tmp_path / target}",
            "--dry_run", *args,
        ])  # fmt: skip
        return code, capsys.readouterr().err

    code, err = trainer(
        "kaggle", "--accelerator=tpu", "--set=runtime.backend=tensorflow"
    )
    assert code == 2 and "Traceback" not in err, err
    assert (
        "runtime.backend: received 'tensorflow' with --accelerator=tpu on Kaggle; "
        "Kaggle's TPU VMs ship tensorflow-cpu, which cannot drive the TPU" in err
    )
    assert "remove runtime.backend" in err and "--accelerator=gpu" in err
    code, err = trainer(
        "kaggle", "--machine_shape=TpuV6E8", "--set=runtime.backend=tensorflow"
    )
    assert code == 2 and "with --machine_shape=TpuV6E8 on Kaggle" in err, err
    assert "--machine_shape=NvidiaTeslaT4" in err
    code, err = trainer(
        "colab", "--accelerator=tpu", "--set=runtime.backend=tensorflow"
    )
    assert code == 2 and "with --accelerator=tpu on Colab" in err, err
    assert "Colab's TPU runtimes ship no TensorFlow" in err
    # An extra would install TensorFlow beside the image's JAX and libtpu.
    code, err = trainer(
        "colab", "--accelerator=tpu", "--package=trainer[tpu] @ git+https://x/y@main"
    )
    assert code == 2 and "--package: received 'trainer[tpu] @ " in err, err
    assert "[tpu] extra would install TensorFlow" in err and "without an extra" in err
    assert not (tmp_path / "colab").exists() or not list((tmp_path / "colab").iterdir())
    # The job's own backend ("auto") on a TPU: the session sets "jax".
    code, err = trainer("kaggle", "--accelerator=tpu")
    assert code == 0, err


def test_the_notebooks_tpu_choices_are_checked_in_the_session(tmp_path, monkeypatch):
    spec = config.load(JOB, ["runtime.backend=tensorflow"])
    with pytest.raises(
        SubmitError,
        match=r"received 'tensorflow' with ACCELERATOR = 'tpu' on Colab.*"
        r"ACCELERATOR = 'gpu'",
    ):
        submit.notebook_spec(spec, "colab", "tpu", environ={"TPU_NAME": "local"})
    # A session that starts without a TPU (kaggle-cli#1197) stops at once.
    with pytest.raises(
        SubmitError,
        match=r"ACCELERATOR = 'tpu' but this Kaggle session has no TPU .*"
        r"Settings > Accelerator > TPU v5e-8.*ACCELERATOR = 'none'",
    ):
        submit.notebook_spec(config.load(JOB), "kaggle", "tpu", environ={})
    with pytest.raises(SubmitError, match=r"ACCELERATOR: received 'TPU'"):
        submit.notebook_spec(config.load(JOB), "kaggle", "TPU", environ={})
    # The template, switched to a TPU by hand with an extra on PACKAGE: the
    # install cell refuses before pip runs.
    notebook = submit.render_notebook("colab", name="x", job_url=JOB, workdir="gs://b/r",
                                      package=PACKAGE)  # fmt: skip
    with pytest.raises(ValueError, match=r"on a TPU install it without an extra"):
        _install_argv(
            notebook, monkeypatch, ACCELERATOR="tpu", PACKAGE="trainer[cpu] @ x"
        )
    (argv,) = _install_argv(notebook, monkeypatch, ACCELERATOR="tpu")
    assert argv[-1] == PACKAGE
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    monkeypatch.setenv("TPU_NAME", "local")
    namespace = _until_training(notebook, monkeypatch, ACCELERATOR="tpu")
    assert namespace["spec"].runtime.backend == "jax"


def test_kaggle_tpu_shapes_pass_kaggle_clis_own_push(tmp_path, monkeypatch, capsys):
    from kaggle import cli

    for shape in ("TpuV5E8", "TpuV6E8"):
        result = dry_run(
            "kaggle", tmp_path / shape, machine_shape=shape,
            workdir="/kaggle/working/run",
        )  # fmt: skip
        capsys.readouterr()
        request = _kaggle_push(result["out_dir"], monkeypatch)
        assert (request.machine_shape, request.enable_tpu) == (shape, True)
        assert "retired" not in capsys.readouterr().err
    # kaggle-cli's own help names TpuV5E8 as TPU v5e-8 (TpuV6E8 is only in its
    # docs/kernels.md list of accelerators).
    assert "'TpuV5E8' for TPU v5e-8" in cli.Help.param_kernel_acc

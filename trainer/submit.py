"""`trainer submit`: render what runs a job on Vertex AI, a GCE spot VM, Kaggle or Colab.

Each target gets its artifacts written to a local folder (a Vertex AI CustomJob
spec, a VM startup script and its metadata, a notebook and its Kaggle metadata)
and the one command that launches them. `dry_run` prints both and touches
nothing; otherwise the job spec is uploaded next to the run (`{workdir}/job.toml`)
and the command runs. The job itself is always the same `trainer train`, so a
preempted run resumes when the same target is submitted (or restarted) again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from trainer import config, storage
from trainer.errors import SubmitError

TARGETS = ("vertex", "gce", "kaggle", "colab")

DEPLOY_DIR = pathlib.Path(__file__).resolve().parent.parent / "deploy"
GCE_STARTUP_SCRIPT = DEPLOY_DIR / "gce" / "startup.sh"

# Session limits the notebook deadline stays under, with a margin for the last
# checkpoint upload. Kaggle: 12 h for CPU sessions, 9 h with an accelerator
# (Kaggle's TPU guide: "9 hours per session"; GPU taken as 9 h to be safe).
# Colab free: runtimes last "at most 12 hours" (Colab FAQ), often less.
SESSION_DEADLINES = {
    ("kaggle", "none"): "11h30m",
    ("kaggle", "gpu"): "8h30m",
    ("kaggle", "tpu"): "8h30m",
    ("colab", "none"): "11h30m",
    ("colab", "gpu"): "11h30m",
    ("colab", "tpu"): "11h30m",
}

# The pip requirement notebooks and VMs install. No `[cpu]` extra on purpose in
# notebooks: Colab and Kaggle images ship their own TensorFlow.
DEFAULT_PACKAGE_ENV = "TRAINER_PACKAGE"


@dataclasses.dataclass(frozen=True)
class Options:
    """Target options; every field has a flag of the same name in `trainer submit`."""

    overrides: tuple[str, ...] = ()
    out_dir: str = ""  # where artifacts are written; default: a new temp folder
    package: str = ""  # pip requirement of this project (git+https URL, wheel URL)
    # Vertex AI
    region: str = "us-central1"
    image_uri: str = ""  # container image URI built from deploy/docker/Dockerfile
    machine_type: str = ""  # default per target below
    accelerator_type: str = ""  # Vertex: NVIDIA_TESLA_T4 ...; GCE: nvidia-tesla-t4
    accelerator_count: int = 0
    timeout: str = ""  # Vertex scheduling.timeout, e.g. "24h" (default: 7 days)
    max_wait: str = ""  # Vertex scheduling.maxWaitDuration, e.g. "2h"
    service_account: str = ""
    # GCE
    zone: str = "us-central1-a"
    vm_name: str = ""
    image_family: str = "debian-12"
    image_project: str = "debian-cloud"
    boot_disk_size: str = "50GB"
    on_done: str = (
        "delete"  # "delete" | "stop": what the VM does once the run completed
    )
    # Kaggle / Colab
    kernel_id: str = ""  # Kaggle "owner/slug"; default: $KAGGLE_USERNAME/<job name>
    accelerator: str = "none"  # notebook sessions: "none" | "gpu" | "tpu"
    dataset_sources: tuple[str, ...] = ()  # Kaggle datasets, "owner/slug"
    deadline: str = ""  # notebook --deadline; default: under the session limit
    gcs_secret: str = ""  # Kaggle secret holding a service-account JSON key


# `Options` fields that `trainer submit` takes as flags of the same name;
# `overrides` comes from --set and `deadline` from --deadline.
FLAG_OPTIONS = tuple(
    f.name
    for f in dataclasses.fields(Options)
    if f.name not in ("overrides", "deadline")
)


def submit(
    target: str, job_url: str, workdir: str, *, dry_run: bool = False, **options: Any
) -> dict[str, Any]:
    """Renders the artifacts that run `job_url` into `workdir` on `target`.

    Args:
      target: one of "vertex", "gce", "kaggle", "colab".
      job_url: path or URL of the TOML job spec; it must parse.
      workdir: the run's URL. A `gs://` URL for vertex and gce; kaggle and colab
        also take a path that outlives the session (Colab: Google Drive).
      dry_run: only render and print; upload nothing, run nothing.
      **options: fields of `Options` (region, image_uri, machine_type, ...).

    Returns:
      {"target", "out_dir", "files": {name: path}, "command": [argv], "job_url"}
      plus per-target entries ("custom_job" for vertex, "notebook" ...).

    Raises:
      SubmitError: unknown target, unsuitable workdir, missing option.
      config.SpecError, FileNotFoundError: the job spec does not load.
      RuntimeError: the launching command failed (not in a dry run).
    """
    if target not in TARGETS:
        raise SubmitError(
            f"--target: received {target!r}; expected one of {', '.join(TARGETS)}"
        )
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(Options)})
    if unknown:
        raise SubmitError(f"unknown submit option(s) {unknown}")
    for key in ("overrides", "dataset_sources"):  # Lists from flags or callers.
        if key in options:
            options[key] = tuple(options[key] or ())
    opts = Options(**options)
    _check_workdir(target, workdir)
    spec = config.load(job_url, opts.overrides)  # Fails here, not on the VM.
    _check_data(target, spec)
    out_dir = opts.out_dir or tempfile.mkdtemp(prefix=f"trainer-submit-{target}-")
    os.makedirs(out_dir, exist_ok=True)
    render = {
        "vertex": _render_vertex,
        "gce": _render_gce,
        "kaggle": _render_kaggle,
        "colab": _render_colab,
    }[target]
    result = render(spec, job_url, workdir, opts, out_dir)
    result.update(target=target, out_dir=out_dir)
    _print_plan(result, dry_run)
    if not dry_run:
        if result["command"]:
            _require_tool(result["command"][0], target)  # Before uploading anything.
        if result.get("upload"):
            local, url = result["upload"]
            try:
                storage.put(local, url)
            except Exception as e:  # Network, credentials, bucket: one clear line.
                raise SubmitError(
                    f"could not upload the job spec to {url}: {type(e).__name__}: {e}; "
                    "check that the bucket exists and that you are logged in "
                    "(gcloud auth application-default login)"
                ) from None
            print(f"uploaded {local} -> {url}")
        if result["command"]:
            _run(result["command"])
    return result


# ---------------------------------------------------------------------------
# Validation


def _check_workdir(target: str, workdir: str) -> None:
    if not workdir:
        raise SubmitError("--workdir is required, e.g. --workdir=gs://BUCKET/runs/r1")
    proto = storage.protocol(workdir)
    if target in ("vertex", "gce") and proto != "gs":
        raise SubmitError(
            f"--workdir: received {workdir!r}; a {target} job needs a gs:// URL "
            "(its machine is gone after a preemption, so checkpoints must live in "
            "Cloud Storage): pass --workdir=gs://BUCKET/runs/NAME"
        )
    if (
        target == "kaggle"
        and proto == "file"
        and not workdir.startswith("/kaggle/working")
    ):
        raise SubmitError(
            f"--workdir: received {workdir!r}; on Kaggle use a gs:// URL (survives "
            "sessions; attach the key with --gcs_secret) or a path under "
            "/kaggle/working (kept only as the notebook version's output)"
        )
    if (
        target == "colab"
        and proto == "file"
        and not workdir.startswith("/content/drive/")
    ):
        raise SubmitError(
            f"--workdir: received {workdir!r}; a Colab VM's disk is wiped when the "
            "session ends: pass a gs:// URL or a Google Drive path such as "
            "/content/drive/MyDrive/runs/NAME"
        )


def _check_data(target: str, spec: config.JobSpec) -> None:
    """Remote machines cannot read the submitting machine's files."""
    if target not in ("vertex", "gce"):
        return
    for key in ("train", "validation"):
        url = getattr(spec.data, key)
        if storage.is_local(url):
            raise SubmitError(
                f"data.{key}: received {url!r}; a {target} job reads its data from "
                "Cloud Storage: copy the shards there (trainer convert --out=gs://...) "
                f"and pass --set=data.{key}=gs://BUCKET/.../{storage.basename(url)}"
            )


# ---------------------------------------------------------------------------
# Vertex AI


def _render_vertex(
    spec, job_url, workdir, opts: Options, out_dir: str
) -> dict[str, Any]:
    if not opts.image_uri:
        raise SubmitError(
            "--image_uri is required for --target=vertex: build deploy/docker/Dockerfile, "
            "push it (e.g. REGION-docker.pkg.dev/PROJECT/REPO/trainer:TAG) and pass "
            "--image_uri=THAT_URI"
        )
    remote_job, upload = _remote_job(job_url, workdir, out_dir)
    args = ["train", f"--job={remote_job}", *(f"--set={s}" for s in opts.overrides)]
    scheduling: dict[str, Any] = {"strategy": "SPOT", "restartJobOnWorkerRestart": True}
    if opts.timeout:
        # No --deadline to match: a worker that exits non-zero (75 included) is
        # restarted by Vertex and would start a fresh deadline. Vertex stops
        # the container with SIGTERM, which the trainer checkpoints on.
        scheduling["timeout"] = f"{_seconds(opts.timeout, '--timeout')}s"
    if opts.max_wait:
        scheduling["maxWaitDuration"] = f"{_seconds(opts.max_wait, '--max_wait')}s"
    machine_spec: dict[str, Any] = {"machineType": opts.machine_type or "n1-standard-8"}
    if opts.accelerator_type:
        machine_spec["acceleratorType"] = opts.accelerator_type
        machine_spec["acceleratorCount"] = opts.accelerator_count or 1
    job_spec: dict[str, Any] = {
        "workerPoolSpecs": [
            {
                "machineSpec": machine_spec,
                "replicaCount": 1,
                "containerSpec": {"imageUri": opts.image_uri, "args": args},
            }
        ],
        # Vertex sets AIP_CHECKPOINT_DIR={workdir}/checkpoints/ and
        # AIP_MODEL_DIR={workdir}/model/; `trainer train` without --workdir
        # takes the parent, so the run's identity is the workdir.
        "baseOutputDirectory": {"outputUriPrefix": workdir},
        "scheduling": scheduling,
    }
    if opts.service_account:
        job_spec["serviceAccount"] = opts.service_account
    display_name = _slug(spec.name)
    custom_job = {"displayName": display_name, "jobSpec": job_spec}
    # gcloud's --config takes a CustomJobSpec (YAML; JSON is YAML) and the
    # display name as a flag; the full CustomJob is the REST body.
    spec_path = _write_json(out_dir, "custom_job_spec.json", job_spec)
    job_path = _write_json(out_dir, "custom_job.json", custom_job)
    command = [
        "gcloud", "ai", "custom-jobs", "create",
        f"--region={opts.region}",
        f"--display-name={display_name}",
        f"--config={spec_path}",
    ]  # fmt: skip
    return {
        "job_url": remote_job,
        "upload": upload,
        "files": {"custom_job_spec.json": spec_path, "custom_job.json": job_path},
        "custom_job": custom_job,
        "command": command,
        "notes": [
            f"follow it: gcloud ai custom-jobs stream-logs JOB_ID --region={opts.region}",
            "after a failure or a cancel, submit again with the same --workdir to resume",
        ],
    }


# ---------------------------------------------------------------------------
# GCE spot VM


def _render_gce(spec, job_url, workdir, opts: Options, out_dir: str) -> dict[str, Any]:
    if opts.on_done not in ("delete", "stop"):
        raise SubmitError(
            f"--on_done: received {opts.on_done!r}; expected delete or stop"
        )
    if opts.accelerator_type and opts.image_project == "debian-cloud":
        raise SubmitError(
            f"--image_project: received {opts.image_project!r}; a GPU VM needs an "
            "image with the NVIDIA driver and Python >= 3.11, e.g. a Deep Learning VM "
            "image: --image_project=deeplearning-platform-release --image_family=FAMILY "
            "(list them: gcloud compute images list --project=deeplearning-platform-release)"
        )
    package = _package(opts, extra="gpu" if opts.accelerator_type else "cpu")
    remote_job, upload = _remote_job(job_url, workdir, out_dir)
    name = opts.vm_name or _slug(spec.name)[:55] + "-vm"
    if not GCE_STARTUP_SCRIPT.exists():
        # deploy/ is not part of the wheel: submit runs from a clone.
        raise SubmitError(
            f"{GCE_STARTUP_SCRIPT} not found: run `trainer submit --target=gce` from a "
            "clone of the repository (pip install -e .)"
        )
    startup = os.path.join(out_dir, "startup.sh")
    shutil.copyfile(GCE_STARTUP_SCRIPT, startup)
    # One file per metadata value: gcloud's --metadata splits on commas, and a
    # pip requirement such as "trainer[gpu] @ git+https://..." may hold some.
    metadata = {
        "trainer-job": remote_job,
        "trainer-workdir": workdir,
        "trainer-package": package,
        "trainer-set": "\n".join(opts.overrides),
        "trainer-on-done": opts.on_done,
    }
    files = {"startup.sh": startup}
    from_file = [f"startup-script={startup}"]
    for key, value in metadata.items():
        path = os.path.join(out_dir, key)
        with open(path, "w", encoding="utf-8") as f:
            f.write(value)
        files[key] = path
        from_file.append(f"{key}={path}")
    command = [
        "gcloud", "compute", "instances", "create", name,
        f"--zone={opts.zone}",
        f"--machine-type={opts.machine_type or 'e2-standard-8'}",
        "--provisioning-model=SPOT",
        "--instance-termination-action=STOP",
        # The VM reads the job and checkpoints from Cloud Storage and deletes
        # (or stops) itself when done.
        "--scopes=cloud-platform",
        f"--image-family={opts.image_family}",
        f"--image-project={opts.image_project}",
        f"--boot-disk-size={opts.boot_disk_size}",
        "--metadata-from-file=" + ",".join(from_file),
    ]  # fmt: skip
    if opts.accelerator_type:
        command += [
            f"--accelerator=type={opts.accelerator_type},count={opts.accelerator_count or 1}",
            "--maintenance-policy=TERMINATE",
            "--metadata=install-nvidia-driver=True",
        ]
    return {
        "job_url": remote_job,
        "upload": upload,
        "files": files,
        "metadata": metadata,
        "command": command,
        "notes": [
            f"after a preemption the VM is stopped; resume with: gcloud compute "
            f"instances start {name} --zone={opts.zone}",
            f"follow it: gcloud compute instances get-serial-port-output {name} "
            f"--zone={opts.zone}",
        ],
    }


# ---------------------------------------------------------------------------
# Notebooks: Kaggle and Colab


def _render_kaggle(
    spec, job_url, workdir, opts: Options, out_dir: str
) -> dict[str, Any]:
    if opts.accelerator not in ("none", "gpu", "tpu"):
        raise SubmitError(
            f"--accelerator: received {opts.accelerator!r}; expected none, gpu or tpu"
        )
    kernel_id = opts.kernel_id
    if not kernel_id and os.environ.get("KAGGLE_USERNAME"):
        kernel_id = f"{os.environ['KAGGLE_USERNAME']}/{_slug(spec.name)}"
    if not kernel_id or not re.fullmatch(r"[\w.-]+/[a-z0-9-]+", kernel_id):
        raise SubmitError(
            f"--kernel_id: received {kernel_id!r}; expected OWNER/SLUG with a "
            "lowercase-dashed slug (or set KAGGLE_USERNAME), e.g. "
            "--kernel_id=me/digits-resnet50"
        )
    slug = kernel_id.split("/", 1)[1]
    notebook = _notebook("kaggle", spec, job_url, workdir, opts)
    code_file = f"{slug}.ipynb"
    nb_path = _write_notebook(out_dir, code_file, notebook)
    metadata = {
        "id": kernel_id,
        "title": slug.replace("-", " "),
        "code_file": code_file,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": opts.accelerator == "gpu",
        "enable_tpu": opts.accelerator == "tpu",
        "enable_internet": True,  # pip installs this package
        "dataset_sources": list(opts.dataset_sources),
        "competition_sources": [],
        "kernel_sources": [],
        "model_sources": [],
    }
    meta_path = _write_json(out_dir, "kernel-metadata.json", metadata)
    return {
        "job_url": job_url,
        "files": {code_file: nb_path, "kernel-metadata.json": meta_path},
        "notebook": notebook,
        "kernel_metadata": metadata,
        "command": ["kaggle", "kernels", "push", "-p", out_dir],
        "notes": [
            f"follow it: kaggle kernels status {kernel_id}",
            "if the session deadline stopped it, push again: it resumes from the workdir",
        ],
    }


def _render_colab(
    spec, job_url, workdir, opts: Options, out_dir: str
) -> dict[str, Any]:
    notebook = _notebook("colab", spec, job_url, workdir, opts)
    nb_path = _write_notebook(out_dir, f"{_slug(spec.name)}-colab.ipynb", notebook)
    return {
        "job_url": job_url,
        "files": {os.path.basename(nb_path): nb_path},
        "notebook": notebook,
        "command": [],  # Colab has no API to start a notebook run.
        "notes": [
            "Colab has no submit API: open https://colab.research.google.com, "
            f"File > Upload notebook > {nb_path}, pick a runtime type (GPU/TPU) "
            "and Runtime > Run all",
            "if the session ends or the deadline stops it, run all cells again: "
            "it resumes from the workdir",
        ],
    }


def _notebook(platform, spec, job_url, workdir, opts: Options):
    return render_notebook(
        platform,
        name=spec.name,
        job_url=job_url,
        workdir=workdir,
        package=_package(opts, extra=None),
        overrides=opts.overrides,
        deadline=_deadline(platform, opts),
        gcs_secret=opts.gcs_secret,
        accelerator=opts.accelerator,
    )


def render_notebook(
    platform: str,
    *,
    name: str,
    job_url: str,
    workdir: str,
    package: str,
    overrides: tuple[str, ...] | list[str] = (),
    deadline: str = "11h30m",
    install: bool = True,
    gcs_secret: str = "",
    accelerator: str = "none",
):
    """A notebook that installs this package and runs `train.run` until done.

    Args:
      platform: "kaggle" or "colab" (their storage and auth cells differ).
      name: the job's name, for the title.
      job_url: path or URL of the job spec. A local file is embedded in the
        notebook (JOB_TOML), so the notebook needs nothing from this machine.
      workdir: the run's URL.
      package: the pip requirement the install cell installs.
      overrides: `KEY=VALUE` overrides applied to the job spec.
      deadline: stop with a checkpoint after this long (under the session limit).
      install: the value of the notebook's INSTALL parameter (False: the
        package is already installed, as in tests).
      gcs_secret: Kaggle secret holding a service-account JSON key.
      accelerator: "none", "gpu" or "tpu" (Colab's notebook metadata).

    Returns:
      A validated `nbformat` v4 notebook node.
    """
    import nbformat

    job_text = ""
    if storage.is_local(job_url) and os.path.isfile(storage.local_path(job_url)):
        with open(storage.local_path(job_url), encoding="utf-8") as f:
            job_text = f.read()
    v4 = nbformat.v4
    parameters = "\n".join(
        [
            "# Parameters (filled in by `trainer submit`; edit freely).",
            f"JOB = {job_url!r}  # the job spec's path or URL (JOB_TOML wins if set)",
            f"JOB_TOML = {_py_text(job_text)}",
            f"WORKDIR = {workdir!r}  # the run's identity: same WORKDIR = resume",
            f"OVERRIDES = {list(overrides)!r}  # --set=KEY=VALUE overrides",
            f"DEADLINE = {deadline!r}  # stop with a checkpoint before the session ends",
            "# No [cpu]/[gpu] extra: keep the TensorFlow this image ships.",
            f"PACKAGE = {package!r}",
            f"INSTALL = {install!r}  # False when the package is already installed",
        ]
        + (
            [f"GCS_SECRET = {gcs_secret!r}  # Kaggle secret with a service-account key"]
            if platform == "kaggle"
            else []
        )
    )
    install_cell = "\n".join(
        [
            "import subprocess, sys",
            "if INSTALL:",
            "    subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--quiet', PACKAGE])",
        ]
    )
    if platform == "colab":
        storage_cell = "\n".join(
            [
                "# Cloud Storage needs your Google login; Drive paths need Drive mounted.",
                "try:",
                "    from google.colab import auth, drive",
                "except ImportError:  # Not on Colab (tests, a local Jupyter).",
                "    auth = drive = None",
                "if auth is not None and 'gs://' in (JOB + WORKDIR):",
                "    auth.authenticate_user()",
                "if drive is not None and '/content/drive/' in (JOB + WORKDIR):",
                "    drive.mount('/content/drive')",
            ]
        )
    else:
        storage_cell = "\n".join(
            [
                "# Datasets attached to this notebook are under /kaggle/input/.",
                "# A gs:// workdir needs a service-account key stored as a Kaggle",
                "# secret (Add-ons > Secrets) named GCS_SECRET.",
                "import os",
                "if GCS_SECRET:",
                "    from kaggle_secrets import UserSecretsClient",
                "    key_path = '/kaggle/working/.gcs-key.json'",
                "    with open(key_path, 'w') as f:",
                "        f.write(UserSecretsClient().get_secret(GCS_SECRET))",
                "    os.environ['GOOGLE_APPLICATION_CREDENTIALS'] = key_path",
            ]
        )
    run_cell = "\n".join(
        [
            "import trainer.config, trainer.preemption, trainer.train",
            "",
            "if JOB_TOML:",
            "    spec = trainer.config.load(JOB_TOML, OVERRIDES, is_text=True)",
            "else:",
            "    spec = trainer.config.load(JOB, OVERRIDES)",
            "try:",
            "    summary = trainer.train.run(",
            "        spec, WORKDIR, deadline_seconds=trainer.preemption.parse_duration(DEADLINE)",
            "    )",
            "except trainer.preemption.Preempted as e:",
            "    # A durable checkpoint is in WORKDIR: nothing is lost.",
            "    summary = {'status': 'preempted'}",
            "    print(f'{e}: checkpoint saved in {WORKDIR}; run this cell again to resume '",
            "          '(in a new session: run all cells again)')",
            "else:",
            "    print(summary['status'], summary.get('metrics'))",
        ]
    )
    how = (
        "Run all cells. Training stops with a checkpoint before the session limit "
        f"({deadline}); run the notebook again with the same `WORKDIR` to resume."
    )
    # Fixed cell ids: the same inputs render the same file (templates, diffs).
    cells = [
        v4.new_markdown_cell(
            f"# {name}: `trainer` on {platform.title()}\n\n{how}", id="about"
        ),
        v4.new_code_cell(
            parameters, metadata={"tags": ["parameters"]}, id="parameters"
        ),
        v4.new_code_cell(install_cell, id="install"),
        v4.new_code_cell(storage_cell, id="storage"),
        v4.new_code_cell(run_cell, id="train"),
    ]
    notebook = v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    notebook.metadata["language_info"] = {"name": "python"}
    if platform == "colab" and accelerator in ("gpu", "tpu"):
        notebook.metadata["accelerator"] = accelerator.upper()
    nbformat.validate(notebook)
    return notebook


# The notebooks in deploy/kaggle/ and deploy/colab/ are these templates;
# `python -m trainer.submit` rewrites them (tests check they are current).
TEMPLATE = {
    "name": "my-job",
    "job_url": "gs://BUCKET/runs/NAME/job.toml",
    "workdir": "gs://BUCKET/runs/NAME",
    "package": "trainer @ git+https://github.com/OWNER/REPO@main",
}


def template_files() -> dict[str, str]:
    """{path relative to deploy/: text} of the committed notebook templates."""
    import nbformat

    files = {}
    for platform in ("kaggle", "colab"):
        notebook = render_notebook(
            platform, deadline=SESSION_DEADLINES[(platform, "none")], **TEMPLATE
        )
        files[f"{platform}/trainer.ipynb"] = nbformat.writes(notebook) + "\n"
    metadata = {
        "id": "OWNER/my-job",
        "title": "my job",
        "code_file": "trainer.ipynb",
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": False,
        "enable_tpu": False,
        "enable_internet": True,
        "dataset_sources": [],
        "competition_sources": [],
        "kernel_sources": [],
        "model_sources": [],
    }
    files["kaggle/kernel-metadata.json"] = json.dumps(metadata, indent=2) + "\n"
    return files


def write_templates(deploy_dir: str | os.PathLike = DEPLOY_DIR) -> None:
    for rel, text in template_files().items():
        path = os.path.join(deploy_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path}")


# ---------------------------------------------------------------------------
# Helpers


def _py_text(text: str) -> str:
    """A Python literal of `text`, kept readable (raw triple quotes) when it can be."""
    if text and "'''" not in text and not text.endswith(("\\", "'")):
        return "r'''" + text + "'''"
    return repr(text)


def _remote_job(job_url: str, workdir: str, out_dir: str) -> tuple[str, tuple | None]:
    """The job spec's URL as the remote machine sees it, and the upload to make."""
    if not storage.is_local(job_url):
        return job_url, None
    local = os.path.join(out_dir, "job.toml")
    shutil.copyfile(storage.local_path(job_url), local)
    remote = storage.join(workdir, "job.toml")
    return remote, (local, remote)


def _package(opts: Options, extra: str | None) -> str:
    """The pip requirement to install; `extra` is added to a plain name or wheel."""
    package = opts.package or os.environ.get(DEFAULT_PACKAGE_ENV, "")
    if not package:
        raise SubmitError(
            "--package is required: the pip requirement of this project as the "
            "remote machine can reach it, e.g. "
            "--package='trainer @ git+https://github.com/OWNER/REPO@main' or the "
            "gs:// URL of a wheel built with `pip wheel --no-deps .` "
            f"(or set {DEFAULT_PACKAGE_ENV})"
        )
    if extra and "[" not in package:
        if " @ " in package:
            name, url = package.split(" @ ", 1)
            package = f"{name}[{extra}] @ {url}"
        elif package.endswith(".whl") or package.endswith(".tar.gz"):
            package = f"{package}[{extra}]"
    return package


def _deadline(platform: str, opts: Options) -> str:
    if opts.deadline:
        from trainer import preemption

        preemption.parse_duration(opts.deadline)  # Checked here, not in the session.
        return opts.deadline
    return SESSION_DEADLINES[(platform, opts.accelerator)]


def _seconds(text: str, flag: str) -> int:
    from trainer import preemption

    try:
        return int(preemption.parse_duration(text))
    except ValueError as e:
        raise SubmitError(f"{flag}: {e}") from None


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "trainer-job"


def _write_json(out_dir: str, name: str, obj: Any) -> str:
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    return path


def _write_notebook(out_dir: str, name: str, notebook) -> str:
    import nbformat

    path = os.path.join(out_dir, name)
    nbformat.write(notebook, path)
    return path


def _print_plan(result: dict[str, Any], dry_run: bool) -> None:
    print(f"target: {result['target']}  (artifacts in {result['out_dir']})")
    for name, path in result["files"].items():
        print(f"  wrote {name}: {path}")
    if result.get("custom_job"):
        print(json.dumps(result["custom_job"], indent=2))
    if result.get("upload"):
        local, url = result["upload"]
        verb = "would upload" if dry_run else "uploading"
        print(f"{verb} {local} -> {url}")
    if result["command"]:
        verb = "would run" if dry_run else "running"
        print(f"{verb}: {shlex.join(result['command'])}")
    for note in result.get("notes", []):
        print(f"note: {note}")
    sys.stdout.flush()


def _require_tool(tool: str, target: str) -> None:
    if shutil.which(tool) is None:
        remedy = {
            "gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) "
            "and run `gcloud auth login`",
            "kaggle": "pip install kaggle and put your API token in ~/.kaggle/kaggle.json",
        }[tool]
        raise SubmitError(
            f"`{tool}` not found on PATH, needed for --target={target}: {remedy}; "
            "or pass --dry_run and run the printed command yourself"
        )


def _run(command: list[str]) -> None:
    proc = subprocess.run(command, check=False)
    if proc.returncode != 0:
        raise SubmitError(
            f"`{shlex.join(command)}` failed with exit code {proc.returncode} "
            "(its output is above)"
        )


if __name__ == "__main__":
    write_templates()

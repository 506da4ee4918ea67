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
import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

from trainer import config, storage
from trainer.errors import SubmitError

TARGETS = ("vertex", "gce", "kaggle", "colab")

DEPLOY_DIR = pathlib.Path(__file__).resolve().parent.parent / "deploy"
GCE_STARTUP_SCRIPT = DEPLOY_DIR / "gce" / "startup.sh"

# Session limits the notebook deadline stays under, with a margin for the last
# checkpoint upload. Kaggle (kaggle.com/docs/notebooks, technical
# specifications): 12 hours of execution for CPU and GPU sessions, 9 hours for
# TPU sessions. Colab free: runtimes last "at most 12 hours" (Colab FAQ), often
# less, and end without a signal.
SESSION_DEADLINES = {
    ("kaggle", "none"): "11h30m",
    ("kaggle", "gpu"): "11h30m",
    ("kaggle", "tpu"): "8h30m",
    ("colab", "none"): "11h30m",
    ("colab", "gpu"): "11h30m",
    ("colab", "tpu"): "11h30m",
}

# Kaggle's accelerators, by the `machine_shape` names kaggle-cli uses
# (`kaggle kernels push --accelerator`, whose help says "NvidiaTeslaT4" for GPU
# T4 x2 and "TpuV5E8" for TPU v5e-8; its docs/kernels.md also lists "TpuV6E8",
# the TPU v6e-8); P100 and TPU v3-8 are retired there.
KAGGLE_MACHINE_SHAPES = {"NvidiaTeslaT4": "gpu", "TpuV5E8": "tpu", "TpuV6E8": "tpu"}
KAGGLE_DEFAULT_SHAPE = {"gpu": "NvidiaTeslaT4", "tpu": "TpuV5E8"}
# Colab's free TPU runtime, as a notebook's `metadata.colab.gpuType` names it
# (the v2-8 was retired in 2025).
COLAB_TPU_TYPE = "V5E1"
_COLAB_RUNTIME = {"none": "CPU", "gpu": "a GPU, e.g. T4", "tpu": "v5e-1 TPU"}

# Why a notebook session's TPU trains with Keras on JAX: the TensorFlow of
# these images cannot drive it (design.md, platform facts; Kaggle/docker-python
# #1499, googlecolab/colabtools#5164).
_NO_TF_ON_TPU = {
    "kaggle": "Kaggle's TPU VMs ship tensorflow-cpu, which cannot drive the TPU",
    "colab": "Colab's TPU runtimes ship no TensorFlow (tensorflow-tpu comes from a "
    "separate index, matched to the runtime's libtpu)",
}

# GPUs by Compute Engine name: (Vertex AI name, the machine series it attaches
# to, default machine type). N1 takes attached T4/V100/P100/P4; the
# accelerator-optimized series come with their GPUs built in (G2: L4, A2:
# A100, A3: H100/H200), so no other machine type can carry them.
GPUS = {
    "nvidia-tesla-t4": ("NVIDIA_TESLA_T4", "n1", "n1-standard-8"),
    "nvidia-tesla-v100": ("NVIDIA_TESLA_V100", "n1", "n1-standard-8"),
    "nvidia-tesla-p100": ("NVIDIA_TESLA_P100", "n1", "n1-standard-8"),
    "nvidia-tesla-p4": ("NVIDIA_TESLA_P4", "n1", "n1-standard-8"),
    "nvidia-l4": ("NVIDIA_L4", "g2", "g2-standard-8"),
    "nvidia-tesla-a100": ("NVIDIA_TESLA_A100", "a2", "a2-highgpu-1g"),
    "nvidia-a100-80gb": ("NVIDIA_A100_80GB", "a2", "a2-ultragpu-1g"),
    "nvidia-h100-80gb": ("NVIDIA_H100_80GB", "a3", "a3-highgpu-8g"),
    "nvidia-h100-mega-80gb": ("NVIDIA_H100_MEGA_80GB", "a3", "a3-megagpu-8g"),
    "nvidia-h200-141gb": ("NVIDIA_H200_141GB", "a3", "a3-ultragpu-8g"),
}
# G2 machine types carry a fixed number of L4s (Compute Engine GPU machine types).
_G2_GPUS = {4: 1, 8: 1, 12: 1, 16: 1, 32: 1, 24: 2, 48: 4, 96: 8}

# The GCE boot image: Debian 12 ships Python 3.11, our minimum. GPU VMs use it
# too; startup.sh installs the NVIDIA driver with Google's installer
# (cuda_installer.pyz install_driver), since the Deep Learning VM families
# ship Python 3.10.
GCE_IMAGE = ("debian-12", "debian-cloud")
# Image families known to ship a Python older than 3.11.
_OLD_PYTHON_FAMILIES = re.compile(
    r"debian-(10|11)|ubuntu-(18|20|22)\d\d|py3[0-9]\b|py310"
)

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
    service_account: str = ""  # Vertex and GCE: the identity the job runs as
    # GCE
    zone: str = "us-central1-a"
    vm_name: str = ""  # the managed instance group's (and its VM's) name
    image_family: str = ""  # default: GCE_IMAGE
    image_project: str = ""
    boot_disk_size: str = "50GB"
    on_done: str = (
        "delete"  # "delete" | "stop": what the VM does once the run completed
    )
    give_up_after: str = (
        "168h"  # GCE: stop reviving a preempted run after this (7 days)
    )
    # Kaggle / Colab
    kernel_id: str = ""  # Kaggle "owner/slug"; default: $KAGGLE_USERNAME/<job name>
    accelerator: str = "none"  # notebook sessions: "none" | "gpu" | "tpu"
    machine_shape: str = ""  # Kaggle: NvidiaTeslaT4 | TpuV5E8 | TpuV6E8
    internet: bool = True  # Kaggle: False for internet-off (competition) runs
    resume_from: str = "auto"  # Kaggle: kernel whose output holds the workdir
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
    opts = _options(options)
    _check_workdir(target, workdir)
    spec = config.load(job_url, opts.overrides)  # Fails here, not on the VM.
    _check_data(target, spec)
    out_dir = opts.out_dir or tempfile.mkdtemp(prefix=f"trainer-submit-{target}-")
    os.makedirs(out_dir, exist_ok=True)
    render = {
        "vertex": _render_vertex,
        "gce": _render_gce,
        "kaggle": lambda *a: _render_kaggle(*a, probe=not dry_run),
        "colab": _render_colab,
    }[target]
    result = render(spec, job_url, workdir, opts, out_dir)
    result.update(target=target, out_dir=out_dir)
    result.setdefault("steps", [(result["command"], None)] if result["command"] else [])
    _print_plan(result, dry_run)
    if not dry_run:
        _launch(result)
    return result


def _options(options: dict[str, Any]) -> Options:
    """`Options` from keyword options, lists (from flags or callers) as tuples."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(Options)})
    if unknown:
        raise SubmitError(f"unknown submit option(s) {unknown}")
    for key in ("overrides", "dataset_sources"):
        if key in options:
            options[key] = tuple(options[key] or ())
    return Options(**options)


def _launch(result: dict[str, Any]) -> None:
    """Uploads the job spec and runs the rendered steps (every tool checked first)."""
    for command, _ in result["steps"]:
        _require_tool(command[0], result["target"])  # Before uploading anything.
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
    for command, unless in result["steps"]:
        if unless and _succeeds(unless):
            print(f"exists already, skipped: {shlex.join(command)}")
            continue
        _run(command)


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
    job_spec = _vertex_job_spec(opts, args, workdir)
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


def _vertex_job_spec(opts: Options, args: list[str], workdir: str) -> dict[str, Any]:
    """The CustomJobSpec: one Spot worker that runs `trainer ARGS` in the image."""
    scheduling = _vertex_scheduling(opts)
    machine_type, gpu, count = _machine(opts, default="n1-standard-8")
    machine_spec: dict[str, Any] = {"machineType": machine_type}
    if gpu:
        machine_spec["acceleratorType"] = GPUS[gpu][0]
        machine_spec["acceleratorCount"] = count
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
    return job_spec


def _vertex_scheduling(opts: Options) -> dict[str, Any]:
    scheduling: dict[str, Any] = {"strategy": "SPOT", "restartJobOnWorkerRestart": True}
    if opts.timeout:
        # No --deadline to match: a worker that exits non-zero (75 included) is
        # restarted by Vertex and would start a fresh deadline. Vertex stops
        # the container with SIGTERM, which the trainer checkpoints on.
        scheduling["timeout"] = f"{_seconds(opts.timeout, '--timeout')}s"
    if opts.max_wait:
        scheduling["maxWaitDuration"] = f"{_seconds(opts.max_wait, '--max_wait')}s"
    return scheduling


# ---------------------------------------------------------------------------
# GCE spot VM


def _machine(opts: Options, default: str) -> tuple[str, str, int]:
    """(machine type, GPU key of GPUS or "", GPU count), checked against each other.

    Raises:
      SubmitError: an unknown GPU, or a machine type it cannot attach to.
    """
    if not opts.accelerator_type:
        return opts.machine_type or default, "", 0
    gpu = opts.accelerator_type.lower().replace("_", "-")
    if gpu not in GPUS:
        raise SubmitError(
            f"--accelerator_type: received {opts.accelerator_type!r}; expected one of "
            f"{', '.join(GPUS)} (Vertex AI spelling also taken, e.g. NVIDIA_TESLA_T4)"
        )
    _, series, default_type = GPUS[gpu]
    machine_type = opts.machine_type or default_type
    if machine_type.split("-", 1)[0] != series:
        raise SubmitError(
            f"--machine_type: received {machine_type!r}; a {gpu} GPU attaches only to "
            f"{series.upper()} machine types: pass --machine_type={default_type} "
            "(or leave --machine_type out)"
        )
    built_in = _built_in_gpus(machine_type)
    count = opts.accelerator_count or built_in or 1
    if built_in and count != built_in:
        raise SubmitError(
            f"--accelerator_count: received {count}; {machine_type} comes with "
            f"{built_in} GPU(s): leave --accelerator_count out"
        )
    return machine_type, gpu, count


def _built_in_gpus(machine_type: str) -> int:
    """GPUs an accelerator-optimized machine type comes with (0: attached, N1)."""
    series = machine_type.split("-", 1)[0]
    if series == "g2":
        match = re.search(r"-(\d+)$", machine_type)
        return _G2_GPUS.get(int(match.group(1)), 1) if match else 1
    match = re.search(r"-(\d+)g$", machine_type)
    return int(match.group(1)) if match and series.startswith("a") else 0


_GCE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def _gce_name(spec, opts: Options) -> str:
    if opts.vm_name:
        if not _GCE_NAME.fullmatch(opts.vm_name) or len(opts.vm_name) > 58:
            raise SubmitError(
                f"--vm_name: received {opts.vm_name!r}; a Compute Engine name is "
                "lowercase letters, digits and dashes, starts with a letter, ends "
                "with a letter or digit, 58 characters at most (the group adds a "
                "suffix to its VM), e.g. --vm_name=digits-run1"
            )
        return opts.vm_name
    name = _slug(spec.name)
    if not name[0].isalpha():
        name = "trainer-" + name  # Compute Engine names start with a letter.
    return name[:58].rstrip("-")


class _GceVm(NamedTuple):
    """What an instance template fixes about its VM (its name's digest covers it)."""

    machine_type: str
    gpu: str  # a key of GPUS, or ""
    count: int
    image_family: str
    image_project: str
    service_account: str
    boot_disk_size: str


def _render_gce(spec, job_url, workdir, opts: Options, out_dir: str) -> dict[str, Any]:
    """A managed instance group of one Spot VM, which Compute Engine revives.

    A preempted Spot VM in a managed instance group is recreated by the group
    when capacity returns (the documented mechanism: "Create a MIG that uses
    preemptible VMs"); its startup script resumes the run from the workdir.
    The VM takes itself out of the group and deletes the group once
    summary.json says completed, and leaves the group (stopped, for a person
    to look at) on bad input.
    """
    if opts.on_done not in ("delete", "stop"):
        raise SubmitError(
            f"--on_done: received {opts.on_done!r}; expected delete or stop"
        )
    vm = _gce_vm(opts)
    give_up = _seconds(opts.give_up_after, "--give_up_after")
    package = _package(opts, extra="gpu" if vm.gpu else "cpu")
    remote_job, upload = _remote_job(job_url, workdir, out_dir)
    name = _gce_name(spec, opts)
    startup = _copy_startup_script(out_dir)
    metadata = {
        "trainer-job": remote_job,
        "trainer-workdir": workdir,
        "trainer-package": package,
        "trainer-set": "\n".join(opts.overrides),
        "trainer-on-done": opts.on_done,
        "trainer-group": name,
        "trainer-give-up-at": str(int(time.time()) + give_up),
        "trainer-gpu": "true" if vm.gpu else "false",
    }
    template = f"{name}-{_template_digest(vm, metadata)}"
    metadata["trainer-template"] = template
    files, from_file = _write_metadata(out_dir, startup, metadata)
    create_template = _create_template_command(template, vm, from_file)
    steps = _gce_steps(name, template, create_template, f"--zone={opts.zone}")
    return {
        "job_url": remote_job,
        "upload": upload,
        "files": files,
        "metadata": metadata,
        "command": steps[1][0],
        "steps": steps,
        "notes": _gce_notes(name, opts),
    }


def _gce_vm(opts: Options) -> _GceVm:
    """The VM's machine, GPUs and boot image, checked.

    Raises:
      SubmitError: a GPU the machine type cannot carry, an image family without
        its project, or one whose Python is older than 3.11.
    """
    machine_type, gpu, count = _machine(opts, default="e2-standard-8")
    image_family = opts.image_family or GCE_IMAGE[0]
    image_project = opts.image_project or (
        GCE_IMAGE[1] if not opts.image_family else ""
    )
    if not image_project:
        raise SubmitError(
            f"--image_project is required with --image_family={image_family}, e.g. "
            "--image_project=debian-cloud"
        )
    if _OLD_PYTHON_FAMILIES.search(image_family):
        raise SubmitError(
            f"--image_family: received {image_family!r}, whose Python is older than "
            "3.11 (trainer needs >= 3.11); leave --image_family/--image_project out "
            f"for {GCE_IMAGE[0]} ({GCE_IMAGE[1]}, Python 3.11; GPU drivers are "
            "installed at boot)"
        )
    return _GceVm(
        machine_type, gpu, count, image_family, image_project,
        opts.service_account, opts.boot_disk_size,
    )  # fmt: skip


def _copy_startup_script(out_dir: str) -> str:
    if not GCE_STARTUP_SCRIPT.exists():
        # deploy/ is not part of the wheel: submit runs from a clone.
        raise SubmitError(
            f"{GCE_STARTUP_SCRIPT} not found: run `trainer submit --target=gce` from a "
            "clone of the repository (pip install -e .)"
        )
    startup = os.path.join(out_dir, "startup.sh")
    shutil.copyfile(GCE_STARTUP_SCRIPT, startup)
    return startup


def _template_digest(vm: _GceVm, metadata: dict[str, str]) -> str:
    """8 hex digits of what an instance template holds.

    An instance template cannot change, so its name carries a digest of what
    it holds: submitting the same thing again finds it, a changed job gets a
    new one.
    """
    held = {k: v for k, v in metadata.items() if k != "trainer-give-up-at"}
    text = json.dumps([*vm, GCE_STARTUP_SCRIPT.read_text(), held], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _write_metadata(
    out_dir: str, startup: str, metadata: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """({file name: path}, ["KEY=PATH" of --metadata-from-file]).

    One file per metadata value: gcloud's --metadata splits on commas, and a
    pip requirement such as "trainer[gpu] @ git+https://..." may hold some.
    """
    files = {"startup.sh": startup}
    from_file = [f"startup-script={startup}"]
    for key, value in metadata.items():
        path = os.path.join(out_dir, key)
        with open(path, "w", encoding="utf-8") as f:
            f.write(value)
        files[key] = path
        from_file.append(f"{key}={path}")
    return files, from_file


def _create_template_command(
    template: str, vm: _GceVm, from_file: list[str]
) -> list[str]:
    command = [
        "gcloud", "compute", "instance-templates", "create", template,
        f"--machine-type={vm.machine_type}",
        "--provisioning-model=SPOT",
        "--instance-termination-action=STOP",
        # The VM reads the job and checkpoints from Cloud Storage and manages
        # its own group when done.
        "--scopes=cloud-platform",
        f"--image-family={vm.image_family}",
        f"--image-project={vm.image_project}",
        f"--boot-disk-size={vm.boot_disk_size}",
        "--metadata-from-file=" + ",".join(from_file),
    ]  # fmt: skip
    if vm.service_account:
        command.append(f"--service-account={vm.service_account}")
    if vm.gpu:
        if not _built_in_gpus(vm.machine_type):
            command.append(f"--accelerator=type={vm.gpu},count={vm.count}")
        command.append("--maintenance-policy=TERMINATE")
    return command


def _gce_steps(name: str, template: str, create_template: list[str], zone: str):
    """[(command, probe whose success skips it)]: template, group, one VM."""
    group = ["gcloud", "compute", "instance-groups", "managed"]
    return [
        (create_template,
         ["gcloud", "compute", "instance-templates", "describe", template]),
        ([*group, "create", name, zone, f"--template={template}", "--size=1",
          f"--base-instance-name={name}"],
         [*group, "describe", name, zone]),
        # Submitting again: the group exists (a run that stopped on bad input
        # left it empty, a preempted one has its VM or is about to recreate
        # it). Point it at this template and make sure it runs one VM.
        ([*group, "set-instance-template", name, f"--template={template}", zone],
         None),
        ([*group, "resize", name, "--size=1", zone], None),
    ]  # fmt: skip


def _gce_notes(name: str, opts: Options) -> list[str]:
    zone = f"--zone={opts.zone}"
    return [
        f"a managed instance group of one Spot VM: when the VM is preempted the "
        f"group recreates it once capacity returns and the run resumes, for "
        f"up to {opts.give_up_after}; it deletes the group when the run completed",
        f"follow it: gcloud compute instance-groups managed list-instances {name} "
        f"{zone}, then gcloud compute instances get-serial-port-output VM {zone}",
        f"pause it: gcloud compute instance-groups managed resize {name} --size=0 "
        f"{zone}; submit again to resume",
    ]


# ---------------------------------------------------------------------------
# Notebooks: Kaggle and Colab


def _render_kaggle(
    spec, job_url, workdir, opts: Options, out_dir: str, *, probe: bool = False
) -> dict[str, Any]:
    """The notebook and kernel-metadata.json that `kaggle kernels push` takes.

    Args:
      probe: ask Kaggle (`kaggle kernels status`) whether the kernel exists,
        to attach its previous version's output (a /kaggle/working workdir).
    """
    accelerator, machine_shape = _kaggle_machine(opts)
    # A bad combination fails here, not in the session.
    session_spec(spec, "kaggle", accelerator, machine_shape=opts.machine_shape)
    kernel_id = _kaggle_kernel_id(spec, opts)
    slug = kernel_id.split("/", 1)[1]
    on_working = storage.is_local(workdir)
    resume_from = _kaggle_resume_from(opts, kernel_id, on_working, probe)
    if not opts.internet:
        _check_offline(spec, workdir, opts)
    notebook = render_notebook(
        "kaggle",
        name=spec.name,
        job_url=job_url,
        workdir=workdir,
        package=_notebook_package(opts, "kaggle", accelerator),
        overrides=opts.overrides,
        deadline=_deadline("kaggle", opts, accelerator),
        gcs_secret=opts.gcs_secret,
        accelerator=accelerator,
        resume_from=resume_from,
        internet=opts.internet,
    )
    code_file = f"{slug}.ipynb"
    nb_path = _write_notebook(out_dir, code_file, notebook)
    metadata = kernel_metadata(
        kernel_id,
        code_file,
        accelerator=accelerator,
        machine_shape=machine_shape,
        internet=opts.internet,
        dataset_sources=list(opts.dataset_sources),
        kernel_sources=[resume_from] if resume_from else [],
    )
    meta_path = _write_json(out_dir, "kernel-metadata.json", metadata)
    return {
        "job_url": job_url,
        "files": {code_file: nb_path, "kernel-metadata.json": meta_path},
        "notebook": notebook,
        "kernel_metadata": metadata,
        "command": ["kaggle", "kernels", "push", "-p", out_dir],
        "notes": _kaggle_notes(kernel_id, workdir, opts, resume_from)
        + _tpu_notes("kaggle", accelerator),
    }


def _check_accelerator(accelerator: str, flag: str = "--accelerator") -> None:
    if accelerator not in ("none", "gpu", "tpu"):
        raise SubmitError(
            f"{flag}: received {accelerator!r}; expected none, gpu or tpu"
        )


def _setting(flag: str, value: str) -> str:
    """How the user writes `value`: a flag (--accelerator=tpu) or a notebook
    parameter (ACCELERATOR = 'tpu')."""
    return f"{flag}={value}" if flag.startswith("--") else f"{flag} = {value!r}"


def session_spec(
    spec: config.JobSpec,
    platform: str,
    accelerator: str,
    flag: str = "--accelerator",
    machine_shape: str = "",
) -> config.JobSpec:
    """`spec` as a Kaggle or Colab session with `accelerator` runs it.

    A TPU session trains with Keras on JAX: `runtime.backend` is set to "jax"
    explicitly, so the run does not depend on detecting what the image's
    TensorFlow can do. Other sessions get `spec` unchanged.

    Args:
      spec: the loaded job spec.
      platform: "kaggle" or "colab".
      accelerator: "none", "gpu" or "tpu".
      flag: what the user set the accelerator with, for the error message
        (`--accelerator` for submit, `ACCELERATOR` in a notebook).
      machine_shape: Kaggle's `--machine_shape`, when the user chose the
        accelerator with it.

    Raises:
      SubmitError: an unknown accelerator, or a TPU with
        `runtime.backend = "tensorflow"`, which these images cannot run.
    """
    _check_accelerator(accelerator, flag)
    if accelerator != "tpu":
        return spec
    if spec.runtime.backend == "tensorflow":
        chosen, gpu = _setting(flag, "tpu"), _setting(flag, "gpu")
        if machine_shape:
            chosen = f"--machine_shape={machine_shape}"
            gpu = f"--machine_shape={KAGGLE_DEFAULT_SHAPE['gpu']}"
        raise SubmitError(
            f"runtime.backend: received 'tensorflow' with {chosen} on "
            f"{platform.title()}; {_NO_TF_ON_TPU[platform]}, so a TPU session "
            "trains with Keras on JAX: remove runtime.backend from the job spec "
            'and its overrides (the TPU session sets "jax"), or choose '
            f"{gpu} to train with TensorFlow"
        )
    runtime = dataclasses.replace(spec.runtime, backend="jax")
    return dataclasses.replace(spec, runtime=runtime)


def notebook_spec(
    spec: config.JobSpec,
    platform: str,
    accelerator: str,
    environ: dict[str, str] | None = None,
) -> config.JobSpec:
    """`session_spec` for the notebook's ACCELERATOR, and a TPU that is there.

    A TPU session whose machine has no TPU would train on its CPU for hours
    (a pushed Kaggle kernel can start without one: Kaggle/kaggle-cli#1197);
    it stops at once instead.

    Args:
      environ: the environment to look for a TPU in; None: this process's,
        and /dev.

    Raises:
      SubmitError: as `session_spec`, or ACCELERATOR = 'tpu' without a TPU.
    """
    from trainer import runtime

    spec = session_spec(spec, platform, accelerator, flag="ACCELERATOR")
    if accelerator == "tpu" and runtime.tpu_address(environ) is None:
        where = {
            "kaggle": "in the notebook editor, Settings > Accelerator > TPU v5e-8 "
            "(or v6e-8), then Save Version",
            "colab": "Runtime > Change runtime type > v5e-1 TPU, then Run all",
        }[platform]
        raise SubmitError(
            f"ACCELERATOR = 'tpu' but this {platform.title()} session has no TPU "
            f"(no TPU_ACCELERATOR_TYPE, TPU_NAME or /dev/accel*): {where}; or set "
            "ACCELERATOR = 'none' to train on this machine's CPU or GPU"
        )
    return spec


def _notebook_package(opts: Options, platform: str, accelerator: str) -> str:
    """The requirement a notebook installs: the image's TensorFlow and JAX stay.

    Raises:
      SubmitError: a TPU session's requirement with an extra: [cpu], [gpu] and
        [tpu] install TensorFlow, beside (or over) the image's JAX and libtpu.
    """
    package = _package(opts, extra=None)
    extra = re.match(r"[^\[@]*\[([^\]]*)\]", package)
    if accelerator == "tpu" and extra:
        raise SubmitError(
            f"--package: received {package!r}; on a {platform.title()} TPU its "
            f"[{extra.group(1)}] extra would install TensorFlow beside the image's "
            "JAX and libtpu, and the TPU trains with Keras on JAX: pass the "
            "requirement without an extra, e.g. "
            "--package='trainer @ git+https://github.com/OWNER/REPO@main'"
        )
    return package


def _tpu_notes(platform: str, accelerator: str) -> list[str]:
    if accelerator != "tpu":
        return []
    return [
        f'a TPU session trains with Keras on JAX (runtime.backend = "jax"): '
        f"{_NO_TF_ON_TPU[platform]}. The install keeps the image's JAX and libtpu; "
        "a session that starts without a TPU stops at once saying so"
    ]


def _kaggle_machine(opts: Options) -> tuple[str, str]:
    """(accelerator, machine shape); a machine shape names its accelerator."""
    _check_accelerator(opts.accelerator)
    machine_shape = opts.machine_shape or KAGGLE_DEFAULT_SHAPE.get(opts.accelerator, "")
    if not machine_shape:
        return opts.accelerator, ""
    if machine_shape not in KAGGLE_MACHINE_SHAPES:
        raise SubmitError(
            f"--machine_shape: received {machine_shape!r}; expected one of "
            f"{', '.join(KAGGLE_MACHINE_SHAPES)} (GPU T4 x2, TPU v5e-8, TPU v6e-8)"
        )
    return KAGGLE_MACHINE_SHAPES[machine_shape], machine_shape


def _kaggle_notes(
    kernel_id: str, workdir: str, opts: Options, resume_from: str
) -> list[str]:
    owner, slug = kernel_id.split("/", 1)
    url = f"https://www.kaggle.com/code/{owner}/{slug}"
    notes = [f"follow it: kaggle kernels status {kernel_id} (or {url})"]
    if opts.gcs_secret:
        notes.append(
            f"`kaggle kernels push` cannot attach secrets: once pushed, open {url}, "
            f"Edit, Add-ons > Secrets, attach {opts.gcs_secret!r}, then Save Version "
            "(Save & Run All); until then the notebook stops at once with this step"
        )
    if storage.is_local(workdir):
        notes.append(
            f"{workdir} is kept only as the version's output: the next push attaches "
            f"this kernel's output (kernel_sources) and the notebook copies it back "
            f"before training, so push again to resume"
            + ("" if resume_from else " (this push attaches none: first version)")
        )
    else:
        notes.append("if the session deadline stopped it, push again: it resumes")
    return notes


def _kaggle_kernel_id(spec, opts: Options) -> str:
    """OWNER/SLUG, with kaggle-cli's rules: a slug of 5+ characters."""
    kernel_id = opts.kernel_id
    if not kernel_id and os.environ.get("KAGGLE_USERNAME"):
        slug = _slug(spec.name)
        if len(slug) < 5:
            slug = f"{slug}-trainer"  # Kaggle's minimum; the title follows it.
        kernel_id = f"{os.environ['KAGGLE_USERNAME']}/{slug}"
    if not kernel_id or not re.fullmatch(r"[\w.-]+/[a-z0-9]+(-[a-z0-9]+)*", kernel_id):
        raise SubmitError(
            f"--kernel_id: received {kernel_id!r}; expected OWNER/SLUG with a "
            "lowercase-dashed slug (or set KAGGLE_USERNAME), e.g. "
            "--kernel_id=me/digits-resnet50"
        )
    slug = kernel_id.split("/", 1)[1]
    if len(slug) < 5:
        # Kaggle derives the notebook's URL from its title and refuses both
        # under five characters ("Title must be at least five characters").
        raise SubmitError(
            f"--kernel_id: the slug {slug!r} is shorter than 5 characters, which "
            f"Kaggle refuses for a notebook's slug and title: pass e.g. "
            f"--kernel_id={kernel_id.split('/', 1)[0]}/{slug}-run"
        )
    return kernel_id


def _kaggle_resume_from(opts: Options, kernel_id: str, on_working: bool, probe):
    """The kernel whose latest output holds a /kaggle/working workdir, or ""."""
    value = opts.resume_from
    if value == "none" or not on_working:
        return ""
    if value != "auto":
        if not re.fullmatch(r"[\w.-]+/[a-z0-9-]{5,}", value):
            raise SubmitError(
                f"--resume_from: received {value!r}; expected auto, none or "
                "OWNER/SLUG of a notebook whose output holds the workdir"
            )
        return value
    # Attach this kernel's previous version once there is one; a source that
    # does not exist yet would fail the first push.
    if probe and shutil.which("kaggle"):
        if _succeeds(["kaggle", "kernels", "status", kernel_id]):
            return kernel_id
    return ""


def _check_offline(spec, workdir: str, opts: Options) -> None:
    """An internet-off session reaches nothing: package and weights come attached."""
    if not storage.is_local(workdir):
        raise SubmitError(
            f"--workdir: received {workdir!r}; an internet-off Kaggle session cannot "
            "reach Cloud Storage: use --workdir=/kaggle/working/NAME (or --internet)"
        )
    package = opts.package or os.environ.get(DEFAULT_PACKAGE_ENV, "")
    if not package.startswith("/kaggle/input/"):
        raise SubmitError(
            f"--package: received {package!r}; an internet-off session cannot pip "
            "install from the internet: upload the wheel (pip wheel --no-deps .) as "
            "a Kaggle dataset, attach it with --dataset_sources=OWNER/SLUG and pass "
            "--package=/kaggle/input/SLUG/trainer-VERSION-py3-none-any.whl"
        )
    if spec.model.weights == "imagenet" and not spec.model.weights_mirror:
        raise SubmitError(
            "model.weights: received 'imagenet', which Keras downloads; an "
            "internet-off session cannot: attach a dataset holding Keras' weight "
            "files and pass --set=model.weights_mirror=/kaggle/input/SLUG "
            "(or a weights file: --set=model.weights=/kaggle/input/SLUG/FILE.h5)"
        )


def kernel_metadata(
    kernel_id: str,
    code_file: str,
    *,
    accelerator: str = "none",
    machine_shape: str = "",
    internet: bool = True,
    dataset_sources: list[str] | None = None,
    kernel_sources: list[str] | None = None,
) -> dict[str, Any]:
    """kernel-metadata.json, with the fields kaggle-cli's `kernels push` reads."""
    slug = kernel_id.split("/", 1)[1]
    metadata: dict[str, Any] = {
        "id": kernel_id,
        # Kaggle links title and slug: the title must slugify to the slug.
        "title": slug.replace("-", " "),
        "code_file": code_file,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": accelerator == "gpu",
        "enable_tpu": accelerator == "tpu",
        "enable_internet": internet,
        "dataset_sources": list(dataset_sources or []),
        "competition_sources": [],
        "kernel_sources": list(kernel_sources or []),
        "model_sources": [],
    }
    if machine_shape:
        metadata["machine_shape"] = machine_shape
    return metadata


def _render_colab(
    spec, job_url, workdir, opts: Options, out_dir: str
) -> dict[str, Any]:
    session_spec(spec, "colab", opts.accelerator)  # A bad combination fails here.
    notebook = render_notebook(
        "colab",
        name=spec.name,
        job_url=job_url,
        workdir=workdir,
        package=_notebook_package(opts, "colab", opts.accelerator),
        overrides=opts.overrides,
        deadline=_deadline("colab", opts, opts.accelerator),
        accelerator=opts.accelerator,
    )
    nb_path = _write_notebook(out_dir, f"{_slug(spec.name)}-colab.ipynb", notebook)
    return {
        "job_url": job_url,
        "files": {os.path.basename(nb_path): nb_path},
        "notebook": notebook,
        "command": [],  # Colab has no API to start a notebook run.
        "notes": [
            "Colab has no submit API: open https://colab.research.google.com, "
            f"File > Upload notebook > {nb_path}, pick the runtime type "
            f"({_COLAB_RUNTIME[opts.accelerator]}) and Runtime > Run all",
            "if the session ends or the deadline stops it, run all cells again: "
            "it resumes from the workdir",
            *_tpu_notes("colab", opts.accelerator),
        ],
    }


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
    resume_from: str = "",
    internet: bool = True,
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
      accelerator: "none", "gpu" or "tpu": the notebook's ACCELERATOR (a TPU
        trains with Keras on JAX) and Colab's runtime type.
      resume_from: Kaggle: OWNER/SLUG of the notebook whose output, attached
        under /kaggle/input, holds a /kaggle/working workdir to restore.
      internet: Kaggle: False installs the package without an index.

    Returns:
      A validated `nbformat` v4 notebook node.
    """
    import nbformat

    parameters = _parameters_cell(
        platform,
        accelerator=accelerator,
        job_url=job_url,
        workdir=workdir,
        package=package,
        overrides=overrides,
        deadline=deadline,
        install=install,
        gcs_secret=gcs_secret,
        resume_from=resume_from,
        internet=internet,
    )
    notebook = _notebook(platform, name, deadline, accelerator, parameters)
    nbformat.validate(notebook)
    return notebook


def _notebook(
    platform: str, name: str, deadline: str, accelerator: str, parameters: str
):
    """The notebook's cells in order, and the metadata its platform reads."""
    import nbformat

    v4 = nbformat.v4
    storage_cell = (
        _kaggle_storage_cell() if platform == "kaggle" else _colab_storage_cell()
    )
    how = (
        "Run all cells. Training stops with a checkpoint before the session limit "
        f"({deadline}); run the notebook again with the same `WORKDIR` to resume. "
        "`ACCELERATOR` names this session's accelerator: on a TPU (`'tpu'`) the "
        "run trains with Keras on JAX, since this image's TensorFlow cannot drive it."
    )
    # Fixed cell ids: the same inputs render the same file (templates, diffs).
    cells = [
        v4.new_markdown_cell(
            f"# {name}: `trainer` on {platform.title()}\n\n{how}", id="about"
        ),
        v4.new_code_cell(
            parameters, metadata={"tags": ["parameters"]}, id="parameters"
        ),
        v4.new_code_cell(_install_cell(platform), id="install"),
        v4.new_code_cell(storage_cell, id="storage"),
        v4.new_code_cell(_train_cell(platform), id="train"),
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
    if platform == "colab" and accelerator == "tpu":
        notebook.metadata["colab"] = {"gpuType": COLAB_TPU_TYPE}
    return notebook


def _parameters_cell(
    platform: str,
    *,
    accelerator: str,
    job_url: str,
    workdir: str,
    package: str,
    overrides: tuple[str, ...] | list[str],
    deadline: str,
    install: bool,
    gcs_secret: str,
    resume_from: str,
    internet: bool,
) -> str:
    """The notebook's parameters, one a line; a local job spec is embedded."""
    job_text = ""
    if storage.is_local(job_url) and os.path.isfile(storage.local_path(job_url)):
        with open(storage.local_path(job_url), encoding="utf-8") as f:
            job_text = f.read()
    params = [
        "# Parameters (filled in by `trainer submit`; edit freely).",
        f"JOB = {job_url!r}  # the job spec's path or URL (JOB_TOML wins if set)",
        f"JOB_TOML = {_py_text(job_text)}",
        f"WORKDIR = {workdir!r}  # the run's identity: same WORKDIR = resume",
        f"OVERRIDES = {list(overrides)!r}  # --set=KEY=VALUE overrides",
        f"DEADLINE = {deadline!r}  # stop with a checkpoint before the session ends"
        + (" (TPU: 9 h, so 8h30m)" if platform == "kaggle" else ""),
        f"ACCELERATOR = {accelerator!r}  # this session's: 'none' | 'gpu' | 'tpu'"
        " ('tpu': Keras on JAX)",
        "# No [cpu]/[gpu]/[tpu] extra: keep the TensorFlow and JAX this image ships.",
        f"PACKAGE = {package!r}",
        f"INSTALL = {install!r}  # False when the package is already installed",
    ]
    if platform == "kaggle":
        params += [
            f"GCS_SECRET = {gcs_secret!r}  # Kaggle secret with a service-account key",
            f"RESUME_FROM = {resume_from!r}  # notebook whose output holds WORKDIR",
            f"INTERNET = {internet!r}  # False: install PACKAGE without an index",
            "WORKING, INPUT = '/kaggle/working', '/kaggle/input'",
        ]
    else:
        params.append("DRIVE = '/content/drive'  # where Google Drive is mounted")
    return "\n".join(params)


def _install_cell(platform: str) -> str:
    """Installs PACKAGE (Kaggle without internet: from an attached wheel's folder).

    Never with an extra, and never `--upgrade`: the image's TensorFlow, JAX,
    jaxlib and libtpu stay as they are (on a TPU an extra would install
    TensorFlow beside them).
    """
    guard = [
        "    if ACCELERATOR == 'tpu' and '[' in PACKAGE.split(' @ ')[0]:",
        "        raise ValueError(f'PACKAGE = {PACKAGE!r}: on a TPU install it without '",
        "                         'an extra; [cpu]/[gpu]/[tpu] would install TensorFlow '",
        "                         'beside the JAX and libtpu this image ships')",
    ]
    if platform == "kaggle":
        return "\n".join(
            [
                "import os, subprocess, sys",
                "if INSTALL:",
                *guard,
                "    pip = [sys.executable, '-m', 'pip', 'install', '--quiet']",
                "    if not INTERNET:  # A wheel from an attached dataset; no index.",
                "        pip += ['--no-index', '--find-links', os.path.dirname(PACKAGE)]",
                "    subprocess.check_call(pip + [PACKAGE])",
            ]
        )
    return "\n".join(
        [
            "import subprocess, sys",
            "if INSTALL:",
            *guard,
            "    subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--quiet', PACKAGE])",
        ]
    )


def _colab_storage_cell() -> str:
    """Logs in for gs:// URLs; mounts Google Drive for Drive paths."""
    return "\n".join(
        [
            "# Cloud Storage needs your Google login (it names no project, and",
            "# none is needed); Drive paths need Drive mounted.",
            "try:",
            "    from google.colab import auth, drive",
            "except ImportError:  # Not on Colab (a local Jupyter).",
            "    auth = drive = None",
            "if auth is not None and 'gs://' in (JOB + WORKDIR):",
            "    auth.authenticate_user()",
            "ON_DRIVE = drive is not None and (JOB + WORKDIR).find(DRIVE + '/') >= 0",
            "if ON_DRIVE:",
            "    drive.mount(DRIVE)",
        ]
    )


def _kaggle_storage_cell() -> str:
    """The secret's service-account key for gs://; a WORKING workdir restored."""
    return "\n".join(
        [
            "# Datasets and notebook outputs attached to this notebook are under",
            "# /kaggle/input/. A gs:// workdir needs a service-account key stored",
            "# as a Kaggle secret named GCS_SECRET.",
            "import glob, os, shutil, tempfile",
            "if GCS_SECRET:",
            "    from kaggle_secrets import UserSecretsClient",
            "    try:",
            "        key = UserSecretsClient().get_secret(GCS_SECRET)",
            "    except Exception as e:  # Not attached: the client raises.",
            "        key, why = None, f'{type(e).__name__}: {e}'",
            "    else:",
            "        why = 'it is empty'",
            "    if not key:",
            "        raise RuntimeError(",
            "            f'Kaggle secret {GCS_SECRET!r} is not attached to this notebook '",
            "            f'({why}): `kaggle kernels push` cannot attach secrets. Open the '",
            "            'notebook on kaggle.com, Edit, Add-ons > Secrets, attach '",
            "            f'{GCS_SECRET!r}, then Save Version (Save & Run All).')",
            "    # Outside WORKING: Kaggle publishes that folder as the version's output.",
            "    key_path = os.path.join(tempfile.mkdtemp(prefix='gcs-key-'), 'key.json')",
            "    with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), 'w') as f:",
            "        f.write(key)",
            "    os.environ['GOOGLE_APPLICATION_CREDENTIALS'] = key_path",
            "# A WORKING workdir lives on only as a version's output: restore the",
            "# previous version's, attached under INPUT, before training resumes.",
            "if RESUME_FROM and WORKDIR.startswith(WORKING + '/') and not os.path.exists(",
            "    os.path.join(WORKDIR, 'job.json')",
            "):",
            "    rel = os.path.relpath(WORKDIR, WORKING)",
            "    owner, slug = RESUME_FROM.split('/')[:2]",
            "    found = [",
            "        d for d in [os.path.join(INPUT, slug, rel),",
            "                    os.path.join(INPUT, 'notebooks', owner, slug, rel),",
            "                    *sorted(glob.glob(os.path.join(INPUT, '*', rel)))]",
            "        if os.path.isfile(os.path.join(d, 'job.json'))",
            "    ]",
            "    if found:",
            "        shutil.copytree(found[0], WORKDIR, dirs_exist_ok=True)",
            "        print(f'restored {WORKDIR} from {found[0]}')",
            "    else:",
            "        print(f'no earlier output of {RESUME_FROM} under {INPUT}: starting afresh')",
        ]
    )


def _train_cell(platform: str) -> str:
    """Runs the job to completion or a checkpointed stop (Colab: flushes Drive)."""
    again = "run all cells again" if platform == "colab" else "push again (or Run All)"
    return "\n".join(
        [
            "import os",
            "import trainer.config, trainer.preemption, trainer.submit",
            "",
            "if JOB_TOML:",
            "    spec = trainer.config.load(JOB_TOML, OVERRIDES, is_text=True)",
            "else:",
            "    spec = trainer.config.load(JOB, OVERRIDES)",
            "# A TPU session trains with Keras on JAX (runtime.backend = 'jax'): the",
            "# TensorFlow of this image cannot drive its TPU. It stops here if there is none.",
            f"spec = trainer.submit.notebook_spec(spec, {platform!r}, ACCELERATOR)",
            "if ACCELERATOR == 'tpu':  # Keras reads it once, when first imported.",
            "    os.environ['KERAS_BACKEND'] = spec.runtime.backend",
            "import trainer.train",
            "",
            "try:",
            "    summary = trainer.train.run(",
            "        spec, WORKDIR, deadline_seconds=trainer.preemption.parse_duration(DEADLINE)",
            "    )",
            "except trainer.preemption.Preempted as e:",
            "    # A durable checkpoint is in WORKDIR: nothing is lost.",
            "    summary = {'status': 'preempted'}",
            f"    print(f'{{e}}: checkpoint saved in {{WORKDIR}}; {again} to resume')",
            "else:",
            "    print(summary['status'], summary.get('metrics'))",
        ]
        + (
            [
                "finally:",
                "    if ON_DRIVE:  # Drive writes are durable only once flushed.",
                "        drive.flush_and_unmount()",
                "        print('Google Drive flushed and unmounted')",
            ]
            if platform == "colab"
            else []
        )
    )


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
    metadata = kernel_metadata("OWNER/my-job-run", "trainer.ipynb")
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


def _deadline(platform: str, opts: Options, accelerator: str) -> str:
    if opts.deadline:
        _seconds(opts.deadline, "--deadline")  # Checked here, not in the session.
        return opts.deadline
    return SESSION_DEADLINES[(platform, accelerator)]


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
    verb = "would run" if dry_run else "running"
    for command, unless in result["steps"]:
        condition = f"   (unless `{shlex.join(unless)}` succeeds)" if unless else ""
        print(f"{verb}: {shlex.join(command)}{condition}")
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


def _succeeds(command: list[str]) -> bool:
    """Runs a probe (`gcloud ... describe`); True when it exits 0."""
    return (
        subprocess.run(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
        ).returncode
        == 0
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

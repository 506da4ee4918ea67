"""Where we run: platform detection, distribution strategy, precision, chief."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import socket
import sys
import time
from typing import Iterator

import numpy as np

from trainer import config
from trainer.errors import SetupError, SpecError

log = logging.getLogger(__name__)


def detect_platform(environ: dict[str, str] | None = None) -> str:
    """One of "vertex", "kaggle", "colab", "gce", "local", from the environment.

    Each check is an environment variable the platform documents or sets in its
    images, so detection is instant and never touches the network.
    """
    env = os.environ if environ is None else environ
    if env.get("CLOUD_ML_JOB_ID") or env.get("AIP_MODEL_DIR"):
        return "vertex"
    if env.get("KAGGLE_KERNEL_RUN_TYPE") or env.get("KAGGLE_URL_BASE"):
        return "kaggle"
    if (
        env.get("COLAB_RELEASE_TAG")
        or env.get("COLAB_GPU") is not None
        or (environ is None and "google.colab" in sys.modules)
    ):
        return "colab"
    if env.get("TRAINER_PLATFORM"):
        return env["TRAINER_PLATFORM"]
    if environ is None and on_gce():
        return "gce"
    return "local"


def on_gce() -> bool:
    """True on a Google Compute Engine VM, from its DMI product name.

    A file read, no network call: it never hangs off GCE. (Vertex AI and Colab
    run on GCE too, and are detected before this is asked.)
    """
    try:
        with open("/sys/class/dmi/id/product_name", encoding="utf-8") as f:
            return "Google" in f.read()
    except OSError:
        return False


def tpu_address(environ: dict[str, str] | None = None) -> str | None:
    """The TPU to connect to, or None when there is none.

    `TPU_NAME` (Cloud TPU, Vertex, GKE), `COLAB_TPU_ADDR` (legacy Colab TPU
    nodes), and TPU VMs (Kaggle and Colab TPU v2/v5e runtimes, GCE TPU VMs),
    which expose the chips as /dev/accel* or /dev/vfio and connect as "local".
    """
    env = os.environ if environ is None else environ
    if env.get("TPU_NAME"):
        return env["TPU_NAME"]
    if env.get("COLAB_TPU_ADDR"):
        return "grpc://" + env["COLAB_TPU_ADDR"]
    if env.get("TPU_ACCELERATOR_TYPE") or env.get("TPU_WORKER_ID") is not None:
        return "local"
    if environ is None and (
        any(n.startswith("accel") for n in _listdir("/dev"))
        or os.path.exists("/dev/vfio/0")
    ):
        return "local"
    return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def tf_config_from_cluster_spec(environ: dict[str, str] | None = None) -> str | None:
    """TF_CONFIG for Vertex AI's CLUSTER_SPEC; None when there is nothing to add.

    Vertex AI describes a multi-worker job as worker pools: workerpool0 is the
    chief, workerpool1 the other workers (2 and 3, parameter servers and
    evaluators, have no place in synchronous data-parallel training). Only
    used when TF_CONFIG itself is absent.
    """
    env = os.environ if environ is None else environ
    raw = env.get("CLUSTER_SPEC")
    if not raw or env.get("TF_CONFIG"):
        return None
    roles = {"workerpool0": "chief", "workerpool1": "worker"}
    try:
        spec = json.loads(raw)
        pools, task = dict(spec["cluster"]), spec["task"]
        extra = sorted(set(pools) - set(roles))
        cluster = {roles[k]: v for k, v in pools.items() if v and k in roles}
        mine = {"type": roles.get(task["type"]), "index": int(task["index"])}
    except (ValueError, KeyError, TypeError):
        raise SetupError(
            f"CLUSTER_SPEC is not Vertex AI's cluster description: {raw[:200]!r}"
        ) from None
    if extra or mine["type"] is None:
        raise SetupError(
            f"CLUSTER_SPEC has worker pools {extra or [task['type']]}: synchronous "
            "training uses workerpool0 (the chief) and workerpool1 only; remove "
            "the others"
        )
    return json.dumps({"cluster": cluster, "task": mine})


def task_address(job: str, index: int) -> str:
    """`/job:worker/task:1` as its address in TF_CONFIG (`host:port`), for messages."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
        return f"{job} {index} ({cluster[job][index]})"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return f"{job} {index}"


def tf_config_workers(environ: dict[str, str] | None = None) -> int:
    """Number of workers (chief included) in TF_CONFIG; 1 when there is none."""
    env = os.environ if environ is None else environ
    raw = env.get("TF_CONFIG")
    if not raw:
        return 1
    try:
        cluster = json.loads(raw).get("cluster", {})
    except ValueError:
        raise SetupError(
            f"TF_CONFIG is not valid JSON: {raw[:200]!r}; unset it for a "
            "single-machine run, or fix the cluster description"
        ) from None
    return sum(len(cluster.get(k, [])) for k in ("chief", "worker"))


class PeersMissing(RuntimeError):
    """Workers of TF_CONFIG that never came up: rerunning (once they are up,
    or on other machines) may work, so the caller stops as preempted."""


def await_peers(timeout: float, environ: dict[str, str] | None = None) -> None:
    """Returns once every other worker of TF_CONFIG and this one saw each other.

    TensorFlow's own start-up waits for a missing worker for as long as its
    coordination service allows (its `cluster_register_timeout` did not bound
    the chief's wait in TF 2.21) and swallows SIGTERM meanwhile. So each
    worker first listens on its own address and connects once to each of the
    others', until it reached them all and each of them connected to it; then
    it frees its port for TensorFlow's server.

    Raises:
      PeersMissing: naming the workers that did not answer within `timeout`.
    """
    env = os.environ if environ is None else environ
    tf_config_workers(env)  # Bad JSON: exit 2 with its message.
    config_ = json.loads(env.get("TF_CONFIG") or "{}")
    cluster, task = config_.get("cluster", {}), config_.get("task", {})
    tasks = [
        (job, i, a)
        for job in ("chief", "worker")
        for i, a in enumerate(cluster.get(job, []))
    ]
    mine = (task.get("type"), task.get("index"))
    missing = {f"{j} {i} ({a})": a for j, i, a in tasks if (j, i) != mine}
    peers, deadline = len(missing), time.monotonic() + timeout
    own = next((a for j, i, a in tasks if (j, i) == mine), None)
    with _Listener(own, backlog=len(tasks) + 8) as listener:
        # A worker that stopped listening as soon as it reached the others
        # could leave before they reached it: it also waits to be reached.
        while missing or listener.reached() < peers:
            missing = {k: a for k, a in missing.items() if not _answers(a)}
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    if missing:
        raise PeersMissing(
            f"{', '.join(sorted(missing))} did not come up within {timeout:g} s "
            "(runtime.collective_timeout_seconds): nothing answers at "
            f"{', '.join(sorted(missing.values()))}. Start every worker of the "
            "cluster (TF_CONFIG, or Vertex AI's CLUSTER_SPEC) and check that "
            "this machine reaches each address; nothing was trained or written"
        )


class _Listener:
    """Accepts (and counts) connections on this worker's port, if it is free."""

    def __init__(self, address: str | None, backlog: int):
        self._count, self._socket = 0, None
        if not address:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("", int(address.rpartition(":")[2])))
            listener.listen(backlog)
        except (OSError, ValueError):  # TensorFlow's own bind will report it.
            listener.close()
            return
        listener.setblocking(False)
        self._socket = listener

    def reached(self) -> float:
        """Connections so far (unbounded when not listening: nothing to wait for)."""
        if self._socket is None:
            return math.inf
        while True:
            try:
                connection, _ = self._socket.accept()
            except BlockingIOError:
                return self._count
            connection.close()
            self._count += 1

    def __enter__(self) -> _Listener:
        return self

    def __exit__(self, *exc) -> None:
        if self._socket is not None:
            self._socket.close()


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except (OSError, ValueError):  # Refused, unreachable, not yet in DNS.
        return False


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The run-time choices; recorded in checkpoints and reused on resume."""

    strategy: object  # tf.distribute.Strategy
    strategy_name: str
    device_type: str  # "cpu" | "gpu" | "tpu"
    precision: str  # "float32" | "mixed_float16" | "mixed_bfloat16"
    num_replicas: int
    is_chief: bool
    platform: str
    workers: int = 1  # Processes training in lock step (MultiWorkerMirroredStrategy).
    backend: str = "tensorflow"  # "jax": `strategy` is then a jax.sharding.Mesh.

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "strategy": self.strategy_name,
            "device_type": self.device_type,
            "precision": self.precision,
            "num_replicas": self.num_replicas,
            "is_chief": self.is_chief,
            "platform": self.platform,
            "workers": self.workers,
        }


@contextlib.contextmanager
def setup(
    rt: config.RuntimeConfig,
    *,
    deterministic: bool = False,
    seed: int = 0,
    backend_name: str = "tensorflow",
) -> Iterator[Runtime]:
    """Builds the strategy and sets the precision policy for one run.

    With `backend_name = "jax"` the "strategy" is a device mesh
    (`setup_jax`); the TensorFlow one follows.

    Must enter before any other TensorFlow op: MultiWorkerMirroredStrategy and
    the TPU system can only be initialised on a fresh context. On exit, the
    precision policy and op determinism are put back as they were, so a
    notebook's next run (or its own Keras code) starts from its own choices.
    """
    if backend_name == "jax":
        with setup_jax(rt, deterministic=deterministic, seed=seed) as runtime:
            yield runtime
        return
    from trainer import backend

    tf = backend.import_tensorflow()
    import keras

    policy = keras.mixed_precision.global_policy()
    with _op_determinism(tf, deterministic):
        if deterministic:
            # Same seeds and deterministic kernels: a resumed run then computes
            # bit for bit what an uninterrupted one does.
            keras.utils.set_random_seed(seed)
        _split_cpu_for_tests(tf)
        tf_config = tf_config_from_cluster_spec()
        if tf_config:  # Read by MultiWorkerMirroredStrategy and tf_config_workers.
            os.environ["TF_CONFIG"] = tf_config
        name = _auto_strategy(tf) if rt.strategy == "auto" else rt.strategy
        strategy, device_type = _make_strategy(tf, name, rt)
        precision = _precision(tf, rt.mixed_precision, device_type)
        keras.mixed_precision.set_global_policy(precision)
        if device_type == "cpu":
            message = unused_gpu_warning(len(tf.config.list_physical_devices("GPU")))
            if message:
                log.warning(message)
        try:
            yield Runtime(
                strategy=strategy,
                strategy_name=name,
                device_type=device_type,
                precision=precision,
                num_replicas=strategy.num_replicas_in_sync,
                is_chief=is_chief(strategy),
                platform=detect_platform(),
                workers=tf_config_workers() if name == "multiworker" else 1,
            )
        finally:
            keras.mixed_precision.set_global_policy(policy)


@contextlib.contextmanager
def setup_jax(
    rt: config.RuntimeConfig, *, deterministic: bool = False, seed: int = 0
) -> Iterator[Runtime]:
    """The JAX backend's runtime: a 1-D "batch" mesh over the run's devices.

    Several processes (TF_CONFIG or Vertex AI's CLUSTER_SPEC, as for
    TensorFlow; a multi-host Cloud TPU slice) first join one JAX cluster
    (`jax_cluster`). Parameters are replicated over the mesh and batches
    split along it, so the step is data parallel on every kind of device.
    """
    from trainer import backend

    tf = backend.import_tensorflow_or_none()
    import jax
    import keras

    workers = jax_cluster(rt)
    devices, name = _jax_devices(jax, rt, workers)
    device_type = devices[0].platform
    precision = _jax_precision(rt.mixed_precision, devices)
    policy = keras.mixed_precision.global_policy()
    determinism = _op_determinism(tf, deterministic) if tf else contextlib.nullcontext()
    with determinism:  # TensorFlow, where here, still reads the data.
        if deterministic:
            # XLA's CPU and TPU programs are deterministic; on GPUs the
            # flag --xla_gpu_deterministic_ops=true in XLA_FLAGS makes them so.
            keras.utils.set_random_seed(seed)
        keras.mixed_precision.set_global_policy(precision)
        try:
            yield Runtime(
                strategy=jax.sharding.Mesh(np.array(devices), ("batch",)),
                strategy_name=name,
                device_type=device_type,
                precision=precision,
                num_replicas=len(devices),
                is_chief=jax.process_index() == 0,
                platform=detect_platform(),
                workers=workers,
                backend="jax",
            )
        finally:
            keras.mixed_precision.set_global_policy(policy)


def _jax_devices(jax, rt: config.RuntimeConfig, workers: int):
    """(devices of the mesh, strategy name) for `runtime.strategy` under JAX."""
    devices = jax.devices()
    if rt.strategy in ("cpu", "one_device") and workers > 1:
        raise SpecError(
            f'runtime.strategy = "{rt.strategy}" trains on one device, but this '
            f'run has {workers} processes (TF_CONFIG); set runtime.strategy = "auto"'
        )
    if rt.strategy == "cpu":
        return jax.devices("cpu")[:1], "cpu"
    if rt.strategy == "one_device":
        return devices[:1], "one_device"
    if rt.strategy == "tpu" and devices[0].platform != "tpu":
        raise SpecError(
            'runtime.strategy = "tpu", but JAX finds no TPU (devices: '
            f"{devices[0].platform}); install jax[tpu] on the TPU VM, or set "
            'runtime.strategy = "auto"'
        )
    if rt.strategy == "multiworker" and workers == 1:
        raise SpecError(
            'runtime.strategy = "multiworker" with runtime.backend = "jax" needs '
            "several processes (TF_CONFIG or CLUSTER_SPEC naming them); set "
            'runtime.strategy = "auto" for one machine'
        )
    if rt.strategy != "auto":
        return devices, rt.strategy
    if workers > 1:
        return devices, "multiworker"
    if devices[0].platform == "tpu":
        return devices, "tpu"
    return devices, "mirrored" if len(devices) > 1 else "one_device"


def _jax_precision(requested: str, devices) -> str:
    """`runtime.mixed_precision` for JAX: bfloat16 where the chips have it.

    float16 needs loss scaling, which Keras' stateless optimizer API does not
    carry through a jitted step here: bfloat16 (same range as float32) needs
    none, and TPUs and NVIDIA GPUs from Ampere (8.0) on compute it natively.
    """
    platform = devices[0].platform
    if requested == "mixed_float16":
        raise SpecError(
            'runtime.mixed_precision = "mixed_float16" is not supported with '
            'runtime.backend = "jax"; set "mixed_bfloat16" (TPUs, GPUs from '
            'Ampere on) or "auto"'
        )
    if requested != "auto":
        return requested
    if platform == "tpu":
        return "mixed_bfloat16"
    if platform == "gpu":
        capability = str(getattr(devices[0], "compute_capability", "0"))
        if float(capability or 0) >= 8.0:
            return "mixed_bfloat16"
    return "float32"


def jax_cluster(rt: config.RuntimeConfig, environ=None) -> int:
    """Joins this process to its JAX cluster; returns the number of processes.

    The cluster is TF_CONFIG's (or Vertex AI's CLUSTER_SPEC's) chief and
    workers, in that order: process 0 (the chief) hosts JAX's coordination
    service at its TF_CONFIG address. A multi-host Cloud TPU slice (several
    TPU_WORKER_HOSTNAMES) is found by JAX itself. One process: nothing to do.
    """
    import jax

    env = os.environ if environ is None else environ
    tf_config = tf_config_from_cluster_spec(env)
    if tf_config:
        os.environ["TF_CONFIG"] = tf_config
    n = tf_config_workers()
    pod = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h])
    if jax.distributed.is_initialized() or (n <= 1 and pod <= 1):
        return jax.process_count()
    timeout = int(rt.collective_timeout_seconds)
    if n <= 1:  # A TPU pod slice: JAX reads the topology from the TPU VM.
        jax.distributed.initialize(initialization_timeout=timeout)
        return jax.process_count()
    raw = json.loads(os.environ["TF_CONFIG"])
    cluster, task = raw.get("cluster", {}), raw.get("task", {})
    tasks = [
        (j, i) for j in ("chief", "worker") for i in range(len(cluster.get(j, [])))
    ]
    try:
        process_id = tasks.index((task.get("type"), int(task.get("index", -1))))
    except ValueError:
        raise SetupError(
            f"TF_CONFIG's task {task} is not one of its chief or workers"
        ) from None
    first = cluster[tasks[0][0]][0]
    jax.distributed.initialize(
        coordinator_address=first,
        num_processes=n,
        process_id=process_id,
        initialization_timeout=timeout,
    )
    return jax.process_count()


@contextlib.contextmanager
def _op_determinism(tf, enabled: bool) -> Iterator[None]:
    """Deterministic kernels while the run lasts; the previous setting after.

    TensorFlow's public API can only turn determinism on; its own config
    module (which `enable_op_determinism` calls into) can also read and undo it.
    """
    from tensorflow.python.framework import config as tf_config

    before = tf_config.is_op_determinism_enabled()
    if enabled and not before:
        tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if enabled and not before:
            tf_config.disable_op_determinism()


def _precision(tf, requested: str, device_type: str) -> str:
    """`runtime.mixed_precision`, with "auto" resolved for the device."""
    if requested != "auto":
        return requested
    return {
        "tpu": "mixed_bfloat16",
        "gpu": "mixed_float16" if _gpus_have_tensor_cores(tf) else "float32",
    }.get(device_type, "float32")


# Where the NVIDIA driver's device nodes appear (/dev/nvidia0, ...), also inside
# Vertex AI and GKE containers that were given a GPU.
NVIDIA_DEVICE_DIR = "/dev"


def unused_gpu_warning(tf_gpus: int, device_dir: str | None = None) -> str | None:
    """A loud message when the machine has an NVIDIA GPU that TensorFlow does not see.

    Without it the only sign is "cpu x1" in the phase line, and a GPU job
    trains on the CPU, many times slower, for its whole budget.
    """
    if tf_gpus:
        return None
    nodes = sorted(
        n
        for n in _listdir(device_dir or NVIDIA_DEVICE_DIR)
        if re.fullmatch(r"nvidia\d+", n)
    )
    if not nodes:
        return None
    return (
        f"this machine has {len(nodes)} NVIDIA GPU(s) ({', '.join(nodes)}) but "
        "TensorFlow sees none: training runs on the CPU. TensorFlow needs its "
        "CUDA build (trainer[gpu], i.e. tensorflow[and-cuda]) and the driver's "
        "libraries on the library path; Vertex AI and GKE mount them at "
        "/usr/local/nvidia/lib64: export "
        "LD_LIBRARY_PATH=/usr/local/nvidia/lib64:$LD_LIBRARY_PATH "
        "(deploy/docker/Dockerfile sets it)"
    )


def _split_cpu_for_tests(tf) -> None:
    """TRAINER_CPU_DEVICES=N splits the CPU into N logical devices.

    This is how MirroredStrategy is exercised on a machine without GPUs.
    """
    n = int(os.environ.get("TRAINER_CPU_DEVICES", "0") or 0)
    if n > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * n
        )


def _auto_strategy(tf) -> str:
    if tpu_address():
        return "tpu"
    if tf_config_workers() > 1:
        return "multiworker"
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1 or len(tf.config.list_logical_devices("CPU")) > 1:
        return "mirrored"
    if len(gpus) == 1:
        return "one_device"
    return "cpu"


def _make_strategy(tf, name: str, rt: config.RuntimeConfig):
    if name == "tpu":
        return _tpu_strategy(tf), "tpu"
    gpus = tf.config.list_physical_devices("GPU")
    device_type = "gpu" if gpus else "cpu"
    if name == "multiworker":
        await_peers(rt.collective_timeout_seconds)
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=rt.collective_timeout_seconds
        )
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=options
        )
        return strategy, device_type
    if name == "mirrored":
        devices = None
        if not gpus:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices), device_type
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(
            "/gpu:0" if gpus else "/cpu:0"
        ), device_type
    if name == "cpu":
        return tf.distribute.get_strategy(), "cpu"
    raise SpecError(f"runtime.strategy: unknown strategy {name!r}")


def _tpu_strategy(tf):
    """TPUStrategy on the attached TPU, or exit 2 when TensorFlow cannot drive it.

    Kaggle's TPU images ship tensorflow-cpu and Colab's TPU runtimes none at
    all (design.md): such a TensorFlow has no TPU kernels, and TPU
    initialisation fails deep inside it with "No registered
    'ConfigureDistributedTPU' OpKernel".
    """
    address = tpu_address()
    if address is None:
        raise SetupError(
            'runtime.strategy = "tpu", but this machine shows no TPU (no TPU_NAME '
            "or COLAB_TPU_ADDR, no TPU VM devices); run on a TPU runtime, or set "
            'runtime.strategy = "auto"'
        )
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
    tf.config.experimental_connect_to_cluster(resolver)
    try:
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except tf.errors.NotFoundError as e:
        if "ConfigureDistributedTPU" not in str(e):
            raise
        raise SetupError(
            f"a TPU is attached ({address}) but TensorFlow {tf.__version__} has "
            "no TPU support (tensorflow-cpu, or a build without TPU kernels); "
            "install the tensorflow-tpu wheel that matches this machine's "
            'libtpu, or set runtime.strategy = "cpu" to train on the CPU'
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def _gpus_have_tensor_cores(tf) -> bool:
    """float16 pays off from compute capability 7.0 (Volta) on (Keras guide)."""
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        if details.get("compute_capability", (0, 0)) < (7, 0):
            return False
    return bool(tf.config.list_physical_devices("GPU"))


def is_chief(strategy) -> bool:
    """Only the chief writes checkpoints, summaries and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief

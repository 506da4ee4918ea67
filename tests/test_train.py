"""End to end: `trainer train` on a slice of the real digits, both phases, on CPU."""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np
import pytest

from tests.test_cli import assert_bad_input, run, trainer
from tests.test_resume import SMALL_BACKBONE

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A small, fast version of the digits recipe: both phases, a few steps each.
FAST = [
    "train.global_batch_size=16",
    "train.checkpoint_every_steps=4",
    "phases.transfer.epochs=2",
    "phases.transfer.steps_per_epoch=6",
    "phases.finetune.epochs=1",
    "phases.finetune.steps_per_epoch=2",
    "phases.finetune.jit_compile=false",
]


# Session scope: under pytest-xdist a worker may interleave other modules'
# tests, and a module-scoped fixture would be rebuilt after each switch.
@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    from trainer import convert

    out = str(tmp_path_factory.mktemp("digits"))
    convert.convert_sample_digits(out, shards=2)
    return out


SMALL_ARGS = [f"--set={s}" for s in SMALL_BACKBONE]


def job_args(digits: str, workdir: str, *extra: str) -> list[str]:
    return [
        "--job=jobs/digits.toml",
        f"--workdir={workdir}",
        f"--set=data.train={digits}/train-*.tfrecord",
        f"--set=data.validation={digits}/validation-*.tfrecord",
        *(f"--set={s}" for s in FAST),
        *extra,
    ]


@pytest.fixture(scope="session")
def trained(digits, tmp_path_factory):
    """One completed run, shared by the tests that only read its outputs."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    proc = trainer("train", *job_args(digits, workdir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir, proc


@pytest.mark.slow
@pytest.mark.xdist_group("trained")
def test_train_end_to_end_then_rerun_is_a_noop(digits, trained, capsys):
    workdir, proc = trained
    run_dir = pathlib.Path(workdir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["phase"] == "finetune"
    assert summary["global_step"] == 2 * 6 + 2
    assert 0.0 <= summary["metrics"]["val_accuracy"] <= 1.0
    assert [h["phase"] for h in summary["history"]] == [
        "transfer",
        "transfer",
        "finetune",
    ]
    assert (
        json.loads((run_dir / "job.json").read_text())["model"]["backbone"]
        == "resnet50"
    )
    assert (run_dir / "checkpoints" / "LATEST").exists()
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert (run_dir / "plots" / "training_curves.png").stat().st_size > 1000
    assert (run_dir / "plots" / "confusion_matrix.png").stat().st_size > 1000
    assert (
        "phase 'finetune'" in proc.stdout
        and "trainable_from='res5a_branch2a'" in proc.stdout
    )

    again = run(capsys, "train", *job_args(digits, workdir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already completed" in again.stdout
    assert json.loads((run_dir / "summary.json").read_text()) == summary


@pytest.mark.slow
@pytest.mark.xdist_group("trained")
def test_a_damaged_checkpoint_is_named_by_export(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    folder = (
        copy / "checkpoints" / (copy / "checkpoints" / "LATEST").read_text().strip()
    )
    shard = folder / "arrays-00000.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    step = int(folder.name.split("-")[1])
    proc = run(capsys, "export", f"--workdir={copy}", f"--step={step}")
    assert_bad_input(
        proc,
        rf"checkpoint {folder} cannot be exported: arrays-00000.bin fails its "
        rf"CRC32C check.*`trainer export --workdir={copy} --step=N` \(folders: ",
    )
    # A model.keras cut short (a full disk, before writes went through a
    # renamed temporary) is named, with the command that writes it again.
    model = copy / "export" / "model.keras"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 4])
    ev = run(capsys, "evaluate", f"--workdir={copy}")
    assert_bad_input(
        ev, rf"{model} cannot be loaded \(.*\); write it again from a checkpoint"
    )


@pytest.mark.slow
@pytest.mark.xdist_group("trained")
def test_exported_model_loads_in_safe_mode(digits, trained, tmp_path, capsys):
    workdir, _ = trained
    import keras

    from trainer import models  # noqa: F401  (registers the preprocessing layer)

    model = keras.saving.load_model(os.path.join(workdir, "export", "model.keras"))
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    probs = model.predict_on_batch(pixels)
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    ev = run(capsys, "evaluate", f"--workdir={workdir}")
    assert ev.returncode == 0, ev.stderr[-3000:]
    # The same validation as the run's last epoch, through the exported model.
    summary = json.loads((pathlib.Path(workdir) / "summary.json").read_text())
    accuracy = summary["metrics"]["val_accuracy"]
    assert (
        f"images from {digits}/validation-*.tfrecord: accuracy {accuracy:.4f}"
        in ev.stdout
    )

    from PIL import Image
    from sklearn.datasets import load_digits

    digit = load_digits().images[0]  # a zero
    png = tmp_path / "zero.png"
    big = np.kron(digit * 255 / 16, np.ones((4, 4))).astype("uint8")
    Image.fromarray(np.stack([big] * 3, axis=-1)).save(png)
    pred = run(capsys, "predict", f"--workdir={workdir}", str(png))
    assert pred.returncode == 0, pred.stderr[-3000:]
    name, prob = pred.stdout.strip().splitlines()[-1].split("\t")[1:]
    assert name in [str(i) for i in range(10)] and 0.0 <= float(prob) <= 1.0

    missing = run(capsys, "predict", f"--workdir={workdir}", str(tmp_path / "none.png"))
    assert_bad_input(missing, r"image not found: .*none.png")


def _sample_images() -> dict[str, bytes]:
    """Real images at other sizes than the run's 32x32, as PNG and JPEG bytes."""
    import io

    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_image

    def encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **options)
        return buf.getvalue()

    digits = load_digits().images
    rgb = [np.stack([d * 255 / 16] * 3, axis=-1).astype("uint8") for d in digits[:4]]
    photo = load_sample_image("china.jpg")  # 427x640 RGB
    return {
        "digit-40x40.png": encode(np.kron(rgb[0], np.ones((5, 5, 1), "uint8")), "PNG"),
        "digit-24x24.jpg": encode(np.kron(rgb[1], np.ones((3, 3, 1), "uint8")), "JPEG"),
        "digit-32x32.png": encode(np.kron(rgb[2], np.ones((4, 4, 1), "uint8")), "PNG"),
        "digit-56x16.jpg": encode(
            np.kron(rgb[3], np.ones((7, 2, 1), "uint8")), "JPEG", quality=90
        ),
        "photo-427x640.jpg": encode(photo, "JPEG", quality=85),
        "photo-100x150.png": encode(photo[::4, ::4][:100, :150].copy(), "PNG"),
    }


def _write_shard(path: pathlib.Path, images: list[bytes]) -> None:
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for data in images:
            feature = {
                "image/encoded": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[data])
                ),
                "image/class/label": tf.train.Feature(
                    int64_list=tf.train.Int64List(value=[0])
                ),
            }
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())


@pytest.mark.slow
@pytest.mark.xdist_group("trained")
def test_serving_signature_matches_keras_on_png_and_jpeg(trained, tmp_path):
    """The SavedModel on bytes = model.keras on the pixels training would see."""
    import dataclasses

    import keras
    import tensorflow as tf

    from trainer import config, input_pipeline

    workdir, proc = trained
    run_dir = pathlib.Path(workdir)
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["best"]["global_step"]
    assert f"exported the best weights, step {best}\n" in proc.stdout
    record = json.loads((run_dir / "export" / "export.json").read_text())
    assert record == summary["export"]
    assert (record["step"], record["weights"], record["version"]) == (best, "best", 1)
    version = run_dir / "export" / "saved_model" / "1"
    assert (version / "saved_model.pb").exists()
    # Each weight stored once (keras-team/keras#23553 stores them twice).
    stored = sum(f.stat().st_size for f in (version / "variables").iterdir())
    assert stored < 1.05 * (run_dir / "export" / "model.keras").stat().st_size

    images = _sample_images()
    serving = tf.saved_model.load(str(version)).signatures["serving_default"]
    assert set(serving.structured_input_signature[1]) == {"image_bytes"}
    out = serving(image_bytes=tf.constant(list(images.values())))
    assert set(out) == {
        "probabilities",
        "class_index",
        "class_name",
        "class_probability",
    }

    # The reference: the pixels the validation pipeline decodes from a shard
    # holding the same bytes, through the exported Keras model.
    shard = tmp_path / "val-00000-of-00001.tfrecord"
    _write_shard(shard, list(images.values()))
    spec = config.from_dict(json.loads((run_dir / "job.json").read_text()))
    spec = dataclasses.replace(
        spec, data=dataclasses.replace(spec.data, validation=str(shard))
    )
    batches = list(input_pipeline.eval_dataset(spec))
    pixels = np.concatenate([b[0].numpy() for b in batches])[: len(images)]
    assert pixels.shape == (len(images), 32, 32, 3)
    model = keras.saving.load_model(str(run_dir / "export" / "model.keras"))
    expected = model.predict_on_batch(pixels.astype("float32"))

    got = out["probabilities"].numpy()
    diff = float(np.max(np.abs(got - expected)))
    print(f"max |SavedModel - Keras| over {len(images)} images: {diff:.2e}")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    index = out["class_index"].numpy()
    np.testing.assert_array_equal(index, expected.argmax(axis=1))
    names = [n.decode() for n in out["class_name"].numpy()]
    assert names == [spec.class_names()[i] for i in index]
    np.testing.assert_allclose(
        out["class_probability"].numpy(), expected.max(axis=1), atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.xdist_group("trained")
def test_export_an_older_step_to_gcs_then_evaluate_and_predict(
    trained, gcs_bucket, tmp_path, capsys
):
    """`trainer export --step` on a gs:// copy of a finished run: the weights of
    that step (evaluate reproduces its validation accuracy), a new version that
    `trainer predict` serves, and the steps named when one is not there."""
    from trainer import export, storage

    workdir, _ = trained
    run_dir = pathlib.Path(workdir)
    summary = json.loads((run_dir / "summary.json").read_text())
    older = summary["history"][1]  # The end of transfer's second epoch.
    steps = sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("ckpt-*"))
    assert older["global_step"] in steps and older["global_step"] != steps[-1]
    remote = storage.join(gcs_bucket, "run")
    for name in ("job.json", "summary.json", "checkpoints/LATEST"):
        storage.put(str(run_dir / name), storage.join(remote, name))
    for step in (older["global_step"], steps[-1]):
        name = f"checkpoints/ckpt-{step:09d}"
        storage.put(str(run_dir / name), storage.join(remote, name))

    proc = run(
        capsys, "export", f"--workdir={remote}", f"--step={older['global_step']}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"exported the weights of the step asked for, step {older['global_step']}"
        in (proc.stdout)
    )
    assert f"serving: {remote}/export/saved_model/1 " in proc.stdout
    record = storage.read_json(storage.join(remote, "export", "export.json"))
    assert (record["step"], record["weights"]) == (older["global_step"], "step")
    # The completed run's summary (what a rerun of `train` prints) follows.
    assert storage.read_json(storage.join(remote, "summary.json"))["export"] == record

    ev = run(capsys, "evaluate", f"--workdir={remote}")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"accuracy {older['val_accuracy']:.4f}" in ev.stdout
    metrics = storage.read_json(storage.join(remote, "eval", "metrics.json"))
    assert metrics["accuracy"] == pytest.approx(older["val_accuracy"], abs=1e-9)
    assert set(metrics["per_class"]) == {str(i) for i in range(10)}
    matrix = storage.read_json(storage.join(remote, "eval", "confusion_matrix.json"))
    assert np.asarray(matrix["matrix"]).sum() == metrics["count"] == 359
    png = storage.read_bytes(storage.join(remote, "eval", "confusion_matrix.png"))
    assert png.startswith(b"\x89PNG") and len(png) > 1000

    # The default: train.export = "best", as the finished run recorded it.
    proc = run(capsys, "export", f"--workdir={remote}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = summary["best"]["global_step"]
    assert f"exported the best weights, step {best}\n" in proc.stdout
    assert export.versions(remote) == [1, 2]

    # predict serves the newest SavedModel version: with model.keras gone too.
    storage.rm(storage.join(remote, "export", "model.keras"))
    image = tmp_path / "photo.png"
    image.write_bytes(_sample_images()["photo-100x150.png"])
    pred = run(capsys, "predict", f"--workdir={remote}", str(image))
    assert pred.returncode == 0, pred.stderr[-3000:]
    header, line = pred.stdout.strip().splitlines()[-2:]
    assert header == "image\tclass\tprobability of the class"
    url, name, prob = line.split("\t")
    assert url == str(image) and name in [str(i) for i in range(10)]
    assert 0.0 < float(prob) <= 1.0
    folder = run(capsys, "predict", f"--workdir={remote}", str(tmp_path))
    assert_bad_input(folder, rf"{tmp_path} is a folder; give the image files in it")

    # In process: the exit-2 path needs no TensorFlow start of its own.
    missing = run(capsys, "export", f"--workdir={remote}", "--step=7")
    available = ", ".join(map(str, sorted({older["global_step"], steps[-1]})))
    assert_bad_input(
        missing,
        rf"--step=7: .*/run/checkpoints holds no committed checkpoint at step 7; "
        rf"available steps: {available} \(best {best}, last {steps[-1]}\)",
    )


def test_check_leaves_no_checkpoint(digits, tmp_path, capsys):
    workdir = tmp_path / "run"
    proc = run(capsys, "check", *job_args(digits, str(workdir)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "check passed" in proc.stdout
    assert "steps_per_epoch" in proc.stdout and "trainable_params" in proc.stdout
    # Each phase's own cap (FAST: 6 and 2) beside the split's 89 batches of 16.
    assert re.findall(r"^  steps_per_epoch +(\d+)$", proc.stdout, re.M) == ["6", "2"]
    assert not (workdir / "checkpoints").exists()
    assert not (workdir / "summary.json").exists()


def test_fewer_training_records_than_one_batch(digits, tmp_path, capsys):
    proc = run(
        capsys,
        "check",
        *job_args(digits, str(tmp_path / "w"), "--set=train.global_batch_size=2048"),
    )
    assert_bad_input(
        proc,
        r"train-\*\.tfrecord: 1438 training records, fewer than one global batch "
        r"of 2048; lower train.global_batch_size",
    )


def test_image_size_too_small_for_backbone(digits, tmp_path, capsys):
    proc = run(
        capsys,
        "check",
        *job_args(digits, str(tmp_path / "w"), "--set=model.backbone=inceptionv3"),
    )
    assert_bad_input(proc, r"data.image_size.*inceptionv3")


def test_unknown_layer_name(digits, tmp_path, capsys):
    proc = run(
        capsys,
        "check",
        *job_args(
            digits,
            str(tmp_path / "w"),
            "--set=phases.finetune.trainable_from=res5a_brnch2a",
        ),
    )
    assert_bad_input(proc, r"res5a_brnch2a")
    assert "res5a_branch2a" in proc.stderr


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(digits, tmp_path):
    """The same loop under MirroredStrategy (2 logical CPU devices, 2 replicas)."""
    workdir = tmp_path / "run"
    proc = trainer(
        "train",
        *job_args(
            digits,
            str(workdir),
            "--set=runtime.strategy=mirrored",
            # The loop under the strategy is the point, not ResNet50's size.
            *SMALL_ARGS,
            # "auto" must be safe here: XLA has no CPU collectives (issue 10).
            "--set=phases.finetune.jit_compile=auto",
            "--set=phases.transfer.epochs=1",
            "--set=phases.transfer.steps_per_epoch=3",
            "--set=phases.finetune.steps_per_epoch=1",
            "--set=train.export_saved_model=false",
        ),
        env={"TRAINER_CPU_DEVICES": "2"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "mirrored x2" in proc.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 4


@pytest.mark.slow  # XLA compiles ResNet50's step (about 10 CPU-s).
def test_deterministic_xla_conflict_is_explained(digits, tmp_path, capsys):
    """Op determinism has no XLA MaxPool gradient: `check` says which key to change."""
    proc = run(
        capsys,
        "check",
        *job_args(
            digits,
            str(tmp_path / "w"),
            "--set=train.deterministic=true",
            "--set=phases.finetune.trainable_from=all",
            "--set=phases.finetune.jit_compile=true",
            "--set=phases.transfer.jit_compile=false",  # Compile only what fails.
        ),
    )
    assert_bad_input(proc, r"set phases.finetune.jit_compile = false")


def test_unwritable_workdir_is_named(digits, gcs_server, capsys):
    """A bucket that does not exist: exit 2 naming the workdir, nothing written."""
    proc = run(capsys, "check", *job_args(digits, "gs://no-such-bucket-here/run"))
    assert_bad_input(proc, r"workdir gs://no-such-bucket-here/run is not writable")


def test_position_follows_from_the_global_step():
    from trainer import train

    state = train.TrainState(global_step=17, phase_starts=[0, 12])
    assert state.phase_index == 1
    assert state.position(steps_per_epoch=2) == (2, 1)
    # Trained to an epoch's last step, checkpointed before its validation.
    state = train.TrainState(
        global_step=16, phase_starts=[0, 12], train_sums={"count": 8}
    )
    assert state.position(steps_per_epoch=2) == (1, 2)
    assert train.TrainState(global_step=16, phase_starts=[0, 12]).position(2) == (2, 0)
    assert [s for s in range(13) if train.itstime(s, 4)] == [4, 8, 12]
    assert not any(train.itstime(s, 0) for s in range(5))
    assert [train.steps_until(s, 4) for s in (0, 3, 4)] == [4, 1, 4]


def test_first_release_state_resumes_at_the_same_position(digits):
    """A checkpoint from before the single counter: (phase, epoch, step) kept."""
    from trainer import config, input_pipeline, train

    overrides = [a.removeprefix("--set=") for a in job_args(digits, "x")[2:]]
    spec = config.load(str(ROOT / "jobs" / "digits.toml"), overrides)
    saved = {"phase_index": 1, "epoch": 0, "step": 1, "global_step": 13}
    state = train._state_from(saved, spec)
    assert state.phase_index == 1 and state.phase_starts[-1] == 12
    assert state.position(input_pipeline.phase_steps(spec, spec.phases[1])) == (0, 1)


@pytest.mark.parametrize(
    "monitor, values",
    [("val_accuracy", [0.5, 0.9, 0.6, 0.9]), ("val_loss", [0.3, 0.1, 0.2, 0.1])],
)
def test_best_step_follows_the_monitor(monitor, values):
    """The training state is the one home of the best step that retention keeps."""
    from trainer import config, train

    spec = config.load(str(ROOT / "jobs/digits.toml"), [f"train.monitor={monitor}"])
    state = train.TrainState()
    for step, value in enumerate(values, 1):
        state.global_step = step
        train._update_best(spec, state, value)
    assert (state.best_step, state.best_metric) == (2, values[1])  # A tie keeps 2.


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "phases.finetune.jit_compile=true",
            "phases.finetune.jit_compile = true cannot run phase 'finetune': "
            "XLA's CPU backend has no cross-replica collectives, and this run has "
            "2 CPU replicas",
        ),
        (
            "train.global_batch_size=15",
            "train.global_batch_size = 15 does not split over the 2 replicas of "
            "this run (mirrored x2); set it to a multiple of 2, e.g. 14",
        ),
    ],
)
def test_what_two_replicas_cannot_run_is_exit_2(digits, tmp_path, setting, message):
    proc = trainer(
        "check",
        *job_args(digits, str(tmp_path / "w"), f"--set={setting}"),
        env={"TRAINER_CPU_DEVICES": "2"},
    )
    assert_bad_input(proc, re.escape(message))


def test_xla_recorded_on_one_replica_is_dropped_on_two(capsys):
    """A checkpoint from one CPU that compiled its fine-tune resumes on two."""
    from trainer import config, runtime, train

    spec = config.load(str(ROOT / "jobs" / "digits.toml"))
    rt = runtime.Runtime(
        strategy=None,
        strategy_name="mirrored",
        device_type="cpu",
        precision="float32",
        num_replicas=2,
        is_chief=True,
        platform="local",
    )
    state = train.TrainState(runtime={"jit": {"finetune": True, "transfer": False}})
    loop = train._Run(spec, "w", rt, None, None, state, None, None, engine=None)
    assert loop._jit(spec.phases[1]) is False
    assert state.runtime["jit"]["finetune"] is False
    assert "phase 'finetune' continues without XLA" in capsys.readouterr().out
    assert loop._jit(spec.phases[0]) is False


def test_a_changed_global_batch_is_refused_on_resume(digits, tmp_path, capsys):
    """The position is counted in batches: another batch is exit 2, nothing moved."""
    workdir = tmp_path / "run"
    _first_run(digits, workdir)
    proc = run(
        capsys,
        "train",
        *job_args(digits, str(workdir), "--set=train.global_batch_size=8"),
    )
    assert_bad_input(
        proc, r"train.global_batch_size = 8 \(it was 16\).*keep 16.*new --workdir"
    )
    assert sorted(p.name for p in workdir.iterdir()) == ["job.json"]


def _first_run(digits, workdir, status=None) -> None:
    """The workdir as a first run left it: its job.json (and summary.json)."""
    from trainer import config, input_pipeline, storage

    overrides = [a.removeprefix("--set=") for a in job_args(digits, "x")[2:]]
    first = config.load(str(ROOT / "jobs" / "digits.toml"), overrides)
    first = input_pipeline.with_class_names(first)
    storage.write_json(str(workdir / "job.json"), first.to_dict())
    if status:
        summary = {"status": status, "global_step": 14, "metrics": {"loss": 0.5}}
        storage.write_json(str(workdir / "summary.json"), summary)


def test_check_refuses_what_train_would_refuse(digits, tmp_path, capsys):
    workdir = tmp_path / "run"
    _first_run(digits, workdir)
    proc = run(
        capsys, "check", *job_args(digits, str(workdir), "--set=model.dense=[64]")
    )
    assert_bad_input(
        proc, r"cannot resume .*run with a different model shape \(model.dense: was"
    )
    assert sorted(p.name for p in workdir.iterdir()) == ["job.json"]


@pytest.mark.slow  # Its `check` dry-runs both phases (7 s).
def test_a_completed_run_says_a_changed_spec_was_not_trained(digits, tmp_path, capsys):
    workdir = tmp_path / "run"
    _first_run(digits, workdir, status="completed")
    more = "--set=phases.finetune.epochs=20"
    proc = run(capsys, "train", *job_args(digits, str(workdir), more))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already completed at step 14" in proc.stdout
    assert (
        "note: this spec differs from the completed run's (phases.finetune.epochs) "
        "and was not trained: use a new --workdir to train it"
    ) in proc.stdout
    same = run(capsys, "train", *job_args(digits, str(workdir)))
    assert "already completed" in same.stdout and "note:" not in same.stdout
    checked = run(capsys, "check", *job_args(digits, str(workdir), more))
    assert "`trainer train` would only print its summary" in checked.stdout


def test_a_run_refused_for_its_data_leaves_no_trace(digits, tmp_path, capsys):
    """The data is resolved before job.json and the claim are written: the
    fixed spec starts afresh, even with another model."""
    workdir = tmp_path / "run"
    bad = f"--set=data.train={tmp_path}/nothing-*.tfrecord"
    proc = run(capsys, "train", *job_args(digits, str(workdir), bad))
    assert_bad_input(proc, r"no TFRecord shards match .*nothing-\*\.tfrecord")
    assert not workdir.exists()


def test_fewer_classes_than_the_manifest_lists_is_refused_before_any_work(
    digits, tmp_path, capsys
):
    """The digits' manifest lists 10 classes: a 5-way head would stop at the
    first label 5 (or, under "skip", drop half the data one record at a time)."""
    workdir = tmp_path / "run"
    for command in ("check", "train"):
        proc = run(
            capsys,
            command,
            *job_args(digits, str(workdir), "--set=data.num_classes=5"),
            "--set=data.class_names=[]",
        )
        assert_bad_input(
            proc,
            rf"data.num_classes = 5, but {digits}/manifest.json lists 10 classes "
            r"\(0, 1, 2, 3, 4, \.\.\.\): the records of the others would be refused "
            r"as out of range. Set data.num_classes = 10$",
        )
        assert not workdir.exists()


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_a_workdir_blocked_by_a_file_is_exit_2(where, digits, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    workdir = blocker if where == "file" else blocker / "run"
    proc = run(capsys, "train", *job_args(digits, str(workdir)))
    assert_bad_input(
        proc,
        r"cannot write .*afile.*job\.json: a file stands where a folder must be.*"
        r"choose another place, or move that file away",
    )
    assert blocker.read_text() == "x"


def test_a_damaged_summary_does_not_stop_a_resume(tmp_path):
    from trainer import reports

    (tmp_path / "summary.json").write_text("{bad")
    assert reports.completed_summary(str(tmp_path)) is None


@pytest.mark.slow
def test_a_phase_of_zero_epochs_is_skipped(digits, tmp_path, capsys):
    workdir = tmp_path / "run"
    proc = run(  # The phase skip is the point: the small backbone.
        capsys,
        "train",
        *job_args(
            digits,
            str(workdir),
            "--set=phases.transfer.epochs=0",
            *SMALL_ARGS,
            "--set=train.export_saved_model=false",
        ),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "phase 'transfer' skipped (epochs = 0)" in proc.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [h["phase"] for h in summary["history"]] == ["finetune"]
    assert summary["global_step"] == 2
    assert (workdir / "export" / "model.keras").exists()

    negative = run(
        capsys,
        "train",
        *job_args(digits, str(tmp_path / "neg"), "--set=phases.finetune.epochs=-1"),
    )
    assert_bad_input(negative, r"phases.finetune.epochs: received -1; expected >= 0")

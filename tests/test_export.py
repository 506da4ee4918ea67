"""Class names from the manifest, the binary job's export and predict output,
train.export, and `trainer evaluate`'s text (the digits run's export is tested
in test_train.py, on its shared finished run)."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pytest

from tests.test_cli import assert_one_error, run, trainer


def _photo_folders(root: pathlib.Path, per_class: int = 24) -> None:
    """china/ and flower/: crops of scikit-learn's two sample photos, JPEG and
    PNG, of several sizes."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    for name in ("china", "flower"):
        photo = load_sample_image(f"{name}.jpg")  # 427x640
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            y, x = 7 * i, 11 * i
            crop = Image.fromarray(photo[y : y + 200, x : x + 300])
            crop = crop.resize((48 + i, 36 + i // 2))
            fmt, ext = ("PNG", "png") if i % 3 == 0 else ("JPEG", "jpg")
            buf = io.BytesIO()
            crop.save(buf, format=fmt)
            (root / name / f"{i:02d}.{ext}").write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The two-folder set, converted: manifest class names china, flower."""
    from trainer import convert

    root = tmp_path_factory.mktemp("photos")
    _photo_folders(root / "images")
    out = str(root / "shards")
    convert.convert_images(str(root / "images"), out, validation_fraction=0.25)
    return root, out


BINARY_JOB = """
name = "china-or-flower"

[data]
train = "{out}/train-*.tfrecord"
validation = "{out}/validation-*.tfrecord"
image_size = 32
num_classes = 1

[model]
backbone = "resnet50"
weights = "none"
dense = [16]

[train]
global_batch_size = 8
checkpoint_every_steps = 100
keep_checkpoints = 1
deterministic = true

[[phases]]
name = "transfer"
epochs = 2
learning_rate = 1e-3

# A learning rate that leaves the weights where they were: its epoch ties the
# previous one at best, so the best step (the earlier, on a tie) is never the last.
[[phases]]
name = "finetune"
epochs = 1
steps_per_epoch = 1
learning_rate = 1e-9
"""


@pytest.mark.slow
def test_binary_job_exports_best_weights_and_names_its_classes(photos, capsys):
    root, out = photos
    job = root / "binary.toml"
    job.write_text(BINARY_JOB.format(out=out))
    workdir = root / "run"
    proc = trainer("train", f"--job={job}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    spec = json.loads((workdir / "job.json").read_text())
    assert spec["data"]["class_names"] == ["china", "flower"]  # From the manifest.
    summary = json.loads((workdir / "summary.json").read_text())
    best, last = summary["best"]["global_step"], summary["global_step"]
    assert best < last  # The finetune epoch ties, so the best step is earlier.
    assert (
        f"(best val_accuracy {summary['best']['val_accuracy']:.4f} at step {best})"
        in proc.stdout
    )
    assert f"exported the best weights, step {best}\n" in proc.stdout
    record = summary["export"]
    assert (record["step"], record["weights"]) == (best, "best")
    assert record["positive_class"] == "flower"
    from trainer import config, export

    run_spec = config.from_dict(json.loads((workdir / "job.json").read_text()))
    assert export.choose_step(str(workdir), run_spec) == (best, "best")
    last_spec = config.load(str(job), ["train.export=last"])
    assert export.choose_step(str(workdir), last_spec) == (last, "last")
    # keep_checkpoints = 1 retains the best step besides the newest.
    kept = sorted(p.name for p in (workdir / "checkpoints").glob("ckpt-*"))
    assert kept == [f"ckpt-{best:09d}", f"ckpt-{last:09d}"]

    images = sorted((root / "images" / "flower").iterdir())[:2]
    pred = run(capsys, "predict", f"--workdir={workdir}", *map(str, images))
    assert pred.returncode == 0, pred.stderr[-3000:]
    lines = pred.stdout.strip().splitlines()[-3:]
    assert lines[0] == (
        "image\tclass\tprobability of the class\tprobability of 'flower'"
    )
    for line, image in zip(lines[1:], images, strict=True):
        url, name, p, positive = line.split("\t")
        assert url == str(image) and name in ("china", "flower")
        # The class's probability, and P(flower) that it follows from.
        expected = float(positive) if name == "flower" else 1 - float(positive)
        assert float(p) == pytest.approx(expected, abs=1e-4)
        assert (name == "flower") == (float(positive) > 0.5)

    import tensorflow as tf

    version = workdir / "export" / "saved_model" / "1"
    serving = tf.saved_model.load(str(version)).signatures["serving_default"]
    out_ = serving(image_bytes=tf.constant([p.read_bytes() for p in images]))
    assert out_["probabilities"].shape == (2, 1)
    positive = out_["probabilities"].numpy()[:, 0]
    names = [n.decode() for n in out_["class_name"].numpy()]
    assert names == ["flower" if p > 0.5 else "china" for p in positive]
    for line, p in zip(lines[1:], positive, strict=True):
        assert float(line.split("\t")[3]) == pytest.approx(float(p), abs=1e-4)


def _spec(out: str, num_classes: int, names: tuple[str, ...] = ()):
    from trainer import config

    raw = config.load("jobs/digits.toml").to_dict()
    raw["data"].update(
        train=f"{out}/train-*.tfrecord", num_classes=num_classes, class_names=names
    )
    return config.from_dict(raw)


def test_class_names_come_from_the_manifest_when_they_fit(photos):
    from trainer import input_pipeline

    _, out = photos
    spec = _spec(out, 2)
    assert spec.class_names() == ["0", "1"]
    assert input_pipeline.with_class_names(spec).class_names() == ["china", "flower"]
    binary = _spec(out, 1)
    assert input_pipeline.with_class_names(binary).class_names() == ["china", "flower"]
    # Three classes cannot be named by two folders: shown by index.
    three = _spec(out, 3)
    assert input_pipeline.with_class_names(three).class_names() == ["0", "1", "2"]
    named = _spec(out, 2, ("a", "b"))
    assert input_pipeline.with_class_names(named).class_names() == ["a", "b"]
    gone = _spec(out + "-gone", 2)  # Shards moved since: indices, no error.
    assert input_pipeline.with_class_names(gone).class_names() == ["0", "1"]


def test_train_export_is_strict(capsys):
    from trainer import config

    assert config.load("jobs/digits.toml").train.export == "best"
    assert config.load("jobs/digits.toml", ["train.export=last"]).train.export == "last"
    result = run(
        capsys,
        "check",
        "--job=jobs/digits.toml",
        "--workdir=unused",
        "--set=train.export=worst",
    )
    assert_one_error(result, r"train\.export.*'worst'.*best.*last")


def test_export_needs_a_run_and_a_checkpoint(tmp_path, capsys):
    assert_one_error(
        run(capsys, "export", f"--workdir={tmp_path}/none"),
        r"job\.json not found: is .*/none the --workdir of a `trainer train` run\?",
    )
    from trainer import config, storage

    spec = config.load("jobs/digits.toml")
    storage.write_json(str(tmp_path / "run" / "job.json"), spec.to_dict())
    assert_one_error(
        run(capsys, "export", f"--workdir={tmp_path}/run"),
        r"run/checkpoints holds no committed checkpoint: run `trainer train` with "
        r"--workdir=.*/run first",
    )
    assert_one_error(
        run(capsys, "export", f"--workdir={tmp_path}/run", "--step=x"),
        r"--step.*'x'",
    )


def test_confusion_matrix_columns_stay_apart_with_two_digit_counts():
    from trainer import evaluate

    names = [str(i) for i in range(3)]
    confusion = np.array([[34, 0, 1], [2, 100, 0], [0, 7, 9]])
    text = evaluate.format_confusion(confusion, names)
    assert text.splitlines() == [
        "    0   1   2",
        "0  34   0   1",
        "1   2 100   0",
        "2   0   7   9",
    ]
    rows = evaluate.per_class(confusion, names)
    assert rows["0"] == {"precision": 34 / 36, "recall": 34 / 35, "support": 35}
    long_names = ["china", "flower"]
    text = evaluate.format_confusion(np.array([[5, 1], [0, 12]]), long_names)
    assert text.splitlines() == [
        "        china flower",
        " china      5      1",
        "flower      0     12",
    ]
    empty = evaluate.per_class(np.zeros((2, 2), np.int64), long_names)
    assert empty["china"] == {"precision": None, "recall": None, "support": 0}

"""The command line as a user runs it: real subprocesses, exit codes, messages."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def trainer(
    *args: str, cwd=ROOT, timeout: float = 300, env=None
) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def assert_bad_input(proc: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit 2, one clear message on stderr, no traceback."""
    import re

    assert proc.returncode == 2, (
        proc.returncode,
        proc.stdout[-2000:],
        proc.stderr[-3000:],
    )
    assert re.search(pattern, proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_no_command_prints_usage():
    proc = trainer()
    assert_bad_input(proc, r"usage: trainer COMMAND")


def test_unknown_command():
    assert_bad_input(trainer("trian"), r"unknown command 'trian'")


def test_unknown_flag():
    assert_bad_input(trainer("train", "--jbo=x"), r"Unknown command line flag 'jbo'")


def test_missing_job_file(tmp_path):
    proc = trainer("train", "--job=no/such.toml", f"--workdir={tmp_path}/w")
    assert_bad_input(proc, r"job spec not found: no/such.toml")
    assert not (tmp_path / "w").exists()


def test_bad_spec_lists_every_problem(tmp_path):
    job = tmp_path / "bad.toml"
    job.write_text(
        (ROOT / "jobs" / "digits.toml").read_text().replace("image_size", "imag_size")
    )
    proc = trainer(
        "check", f"--job={job}", f"--workdir={tmp_path}/w", "--set=train.seed=x"
    )
    assert_bad_input(proc, r"data.imag_size: unknown key; did you mean 'image_size'")
    assert "train.seed: received 'x'; expected an integer" in proc.stderr


def test_workdir_required(tmp_path):
    proc = trainer("train", "--job=jobs/digits.toml")
    assert_bad_input(proc, r"--workdir is required")


def test_glob_matching_nothing(tmp_path):
    proc = trainer(
        "check",
        "--job=jobs/digits.toml",
        f"--workdir={tmp_path}/w",
        f"--set=data.train={tmp_path}/none-*.tfrecord",
    )
    assert_bad_input(proc, r"none-\*\.tfrecord")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_layers_shows_legacy_alias():
    proc = trainer("layers", "--backbone=resnet50", "--image_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if "conv5_block1_1_conv" in ln)
    assert "res5a_branch2a" in line


def test_layers_unknown_backbone():
    assert_bad_input(trainer("layers", "--backbone=resnet5"), r"resnet5.*did you mean")


def _write_images(root: pathlib.Path, classes=("cat", "dog"), per_class=3) -> None:
    from PIL import Image

    rng = __import__("numpy").random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype="uint8")
            Image.fromarray(pixels).save(root / c / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_convert_images_folder(tmp_path):
    _write_images(tmp_path / "photos")
    proc = trainer(
        "convert", f"--images={tmp_path}/photos", f"--out={tmp_path}/out", "--shards=2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = __import__("json").loads(
        (tmp_path / "out" / "manifest.json").read_text()
    )
    assert manifest["class_names"] == ["cat", "dog"]
    assert sum(s["records"] for s in manifest["splits"].values()) == 6
    assert "2 classes" in proc.stdout


def test_convert_needs_one_source(tmp_path):
    assert_bad_input(
        trainer("convert", f"--out={tmp_path}/o"), r"exactly one of --images"
    )


def test_convert_missing_images_dir(tmp_path):
    proc = trainer("convert", f"--images={tmp_path}/nope", f"--out={tmp_path}/o")
    assert_bad_input(proc, r"nope")

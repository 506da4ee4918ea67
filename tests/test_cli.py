"""The command line: exit codes and messages, in process through `main.run(argv)`;
and the front door, `python -m trainer`, in a few real subprocesses."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from trainer import main, submit

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
    assert proc.returncode == 2, (
        proc.returncode,
        proc.stdout[-2000:],
        proc.stderr[-3000:],
    )
    assert re.search(pattern, proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def run(capsys, *args: str) -> subprocess.CompletedProcess:
    """`trainer ARGS` run in this process: its exit code, stdout and stderr."""
    code = main.run(["trainer", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    """Bad input: exit 2 and one `error:` line on stderr matching `pattern`."""
    assert_bad_input(result, pattern)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.stderr


# ---------------------------------------------------------------------------
# The front door: `python -m trainer` as a user runs it


def test_python_m_trainer_without_a_command_prints_usage():
    assert_bad_input(trainer(), r"usage: trainer COMMAND")


def test_glob_matching_nothing(tmp_path):
    # Bad input found deep in the library (`check` resolving the data),
    # through the front door.
    proc = trainer(
        "check",
        "--job=jobs/digits.toml",
        f"--workdir={tmp_path}/w",
        f"--set=data.train={tmp_path}/none-*.tfrecord",
    )
    assert_bad_input(proc, r"none-\*\.tfrecord")
    assert not (tmp_path / "w" / "checkpoints").exists()


EXIT_SCRIPT = """
import atexit, concurrent.futures, pathlib, sys, threading, time
import jax  # A heavy import: the exit skips the teardown.
from trainer import main
out = pathlib.Path(sys.argv[1])
def late(name):
    time.sleep(0.3)
    (out / name).write_text("done")
# A background checkpoint upload, and a plain non-daemon thread, still running.
concurrent.futures.ThreadPoolExecutor(1).submit(late, "upload")
threading.Thread(target=late, args=("thread",)).start()
atexit.register(lambda: (out / "atexit").write_text("done"))
sys.stdout.write("no newline yet")
main._exit_without_teardown(3)
(out / "after").write_text("not reached")
"""


def test_the_exit_skips_only_the_teardown(tmp_path):
    """The CLI's exit (`main._exit_without_teardown`) still does what Python's
    own exit does first: waits for a background upload and other non-daemon
    threads, runs atexit handlers, flushes stdout; then the process ends with
    the command's exit code."""
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout == "no newline yet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atexit", "thread", "upload"]


# ---------------------------------------------------------------------------
# Commands and flags, in process


def test_layers_shows_legacy_alias(capsys):
    proc = run(capsys, "layers", "--backbone=resnet50", "--image_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if "conv5_block1_1_conv" in ln)
    assert "res5a_branch2a" in line


def test_no_command_prints_usage(capsys):
    assert_one_error(run(capsys), r"usage: trainer COMMAND")


def test_unknown_command(capsys):
    assert_one_error(run(capsys, "trian"), r"unknown command 'trian'")


def test_unknown_flag(capsys):
    result = run(capsys, "train", "--jbo=x")
    assert_one_error(result, r"Unknown command line flag 'jbo'")


def test_each_command_owns_its_flags(capsys):
    # Another command's flag is refused by name, not ignored.
    result = run(capsys, "train", "--job=jobs/digits.toml", "--target=vertex")
    assert_one_error(result, r"Unknown command line flag 'target'")
    assert_one_error(run(capsys, "layers", "--workdir=w"), r"flag 'workdir'")
    assert_one_error(run(capsys, "layers", "--image_size=abc"), r"--image_size=abc")
    result = run(capsys, "check", "--job=jobs/digits.toml", "--workdir=w", "extra")
    assert_one_error(result, r"unexpected arguments \['extra'\] for `check`")


@pytest.mark.parametrize("command", main.COMMANDS)
def test_help_lists_the_commands_flags(command, capsys):
    result = run(capsys, command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: trainer {command} ")
    listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", result.stdout, re.M))
    assert listed == {name for _, name, _, _ in main.FLAGS_OF[command]}
    assert listed == set(main.command_flags(command)) - {"help"}


def test_help_without_a_command_lists_every_command(capsys):
    result = run(capsys, "--helpfull")
    assert result.returncode == 0, result.stderr
    for command in main.COMMANDS:
        assert f"usage: trainer {command} " in result.stdout


def test_submit_takes_every_option_as_a_flag():
    flags = set(main.command_flags("submit"))
    assert set(submit.FLAG_OPTIONS) <= flags
    assert {"target", "job", "workdir", "set", "deadline", "dry_run"} <= flags


def test_running_twice_in_one_process_starts_clean(tmp_path, capsys):
    args = ["submit", "--target=vertex", "--job=jobs/digits.toml", "--dry_run",
            "--workdir=gs://b/r", "--image_uri=img", f"--out_dir={tmp_path}",
            "--set=data.train=gs://b/d/t-*", "--set=data.validation=gs://b/d/v-*"]  # fmt: skip
    first = run(capsys, *args, "--region=europe-west4", "--set=train.seed=1")
    assert first.returncode == 0, first.stderr
    assert "--region=europe-west4" in first.stdout
    again = run(capsys, *args)
    assert again.returncode == 0, again.stderr
    assert "--region=us-central1" in again.stdout
    spec = json.loads((tmp_path / "custom_job_spec.json").read_text())
    container = spec["workerPoolSpecs"][0]["containerSpec"]
    assert "--set=train.seed=1" not in container["args"]


def test_missing_job_file(tmp_path, capsys):
    result = run(capsys, "train", "--job=no/such.toml", f"--workdir={tmp_path}/w")
    assert_one_error(result, r"job spec not found: no/such.toml")
    assert not (tmp_path / "w").exists()


def test_bad_spec_lists_every_problem(tmp_path, capsys):
    job = tmp_path / "bad.toml"
    job.write_text(
        (ROOT / "jobs" / "digits.toml").read_text().replace("image_size", "imag_size")
    )
    result = run(
        capsys, "check", f"--job={job}", f"--workdir={tmp_path}/w", "--set=train.seed=x"
    )
    assert_one_error(result, r"data.imag_size: unknown key; did you mean 'image_size'")
    assert "train.seed: received 'x'; expected an integer" in result.stderr


def test_workdir_required(capsys, monkeypatch):
    for var in ("AIP_CHECKPOINT_DIR", "AIP_MODEL_DIR"):
        monkeypatch.delenv(var, raising=False)
    result = run(capsys, "train", "--job=jobs/digits.toml")
    assert_one_error(result, r"--workdir is required")


@pytest.mark.parametrize(
    "url, message",
    [
        ("gs:/bkt/r1", r"--workdir: 'gs:/bkt/r1' looks like a gs:// URL with a slash missing; write gs://bkt/r1"),
        ("gs://", r"--workdir: 'gs://' names no bucket; write gs://BUCKET/PATH"),
        ("gs:///r1", r"'gs:///r1' names no bucket"),
        ("gs://Bad_Bucket!/r1", r"'Bad_Bucket!' cannot be a GCS bucket name"),
        ("nosuch://b/r1", r"no file system is known for nosuch://"),
    ],
)  # fmt: skip
def test_a_workdir_url_that_can_only_be_a_typo(
    url, message, tmp_path, capsys, monkeypatch
):
    """`gs:/b/x` is a legal relative path: without this check the run would
    train onto the local disk, which a spot VM loses with its checkpoints."""
    monkeypatch.chdir(tmp_path)
    for command in ("train", "check"):
        result = run(
            capsys, command, f"--job={ROOT}/jobs/digits.toml", f"--workdir={url}"
        )
        assert_one_error(result, message)
    assert list(tmp_path.iterdir()) == []  # No ./gs: folder.


def test_a_data_url_that_can_only_be_a_typo_names_its_key(tmp_path, capsys):
    result = run(
        capsys, "check", "--job=jobs/digits.toml", f"--workdir={tmp_path}/w",
        "--set=data.train=gs:/b/train-*", "--set=train.seed=-1",
    )  # fmt: skip
    assert_one_error(result, r"data.train: 'gs:/b/train-\*' looks like a gs:// URL")
    assert "train.seed: received -1; expected 0 <= seed < 2**32" in result.stderr


def test_a_bad_deadline_names_the_flag(tmp_path, capsys):
    result = run(
        capsys, "train", "--job=jobs/digits.toml", f"--workdir={tmp_path}/w",
        "--deadline=abc",
    )  # fmt: skip
    assert_one_error(
        result, r"--deadline: received 'abc'; expected a positive duration"
    )
    assert not (tmp_path / "w").exists()


def test_layers_unknown_backbone(capsys):
    result = run(capsys, "layers", "--backbone=resnet5")
    assert_one_error(result, r"^error: --backbone: received .resnet5.; did you mean")


def _write_images(root: pathlib.Path, classes=("cat", "dog"), per_class=3) -> None:
    from PIL import Image

    rng = __import__("numpy").random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype="uint8")
            Image.fromarray(pixels).save(root / c / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_convert_images_folder(tmp_path, capsys):
    _write_images(tmp_path / "photos")
    result = run(
        capsys,
        "convert",
        f"--images={tmp_path}/photos",
        f"--out={tmp_path}/out",
        "--shards=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["class_names"] == ["cat", "dog"]
    assert sum(s["records"] for s in manifest["splits"].values()) == 6
    assert "2 classes" in result.stdout


def test_convert_needs_one_source(tmp_path, capsys):
    result = run(capsys, "convert", f"--out={tmp_path}/o")
    assert_one_error(result, r"exactly one of --images")
    result = run(capsys, "convert", "--sample=cifar", f"--out={tmp_path}/o")
    assert_one_error(result, r"--sample: received 'cifar'; expected 'digits'")


def test_convert_missing_images_dir(tmp_path, capsys):
    result = run(capsys, "convert", f"--images={tmp_path}/nope", f"--out={tmp_path}/o")
    assert_one_error(result, r"nope")

"""Resume time-to-first-step vs a fresh start's, ResNet50 digits job (issue 4).

For a local and a GCS-emulator workdir, one run each:
  1. fresh start: `trainer train` into an empty workdir; time from Popen to the
     "first step done" line; then SIGTERM -> exit 75 with a checkpoint;
  2. resume: the same command again on a fresh "machine" (new HOME, TMPDIR);
     time from Popen to its "first step done" line (restore included);
  3. download: in this process, CheckpointManager(workdir).restore() of that
     checkpoint (read + CRC32C verify of every file), timed.
Target: resume <= (fresh + download) * 1.1.

    .venv/bin/python benchmarks/resume.py [--steps_per_epoch=20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.gcs_emulator import start_emulator  # noqa: E402


def first_step(
    args: list[str], scratch: str, *, then_sigterm: bool
) -> tuple[float, int, str]:
    """Seconds from Popen to "first step done"; the exit code; the output."""
    machine = tempfile.mkdtemp(prefix="machine-", dir=scratch)
    for d in ("home", "tmp"):
        os.makedirs(os.path.join(machine, d))
    env = dict(
        os.environ,
        HOME=os.path.join(machine, "home"),
        TMPDIR=os.path.join(machine, "tmp"),
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seconds, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if seconds is None and line.startswith("first step done"):
            seconds = time.monotonic() - start
            if then_sigterm:
                proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    if seconds is None:
        raise SystemExit(
            f"no 'first step done' line (exit {code}):\n{''.join(lines)[-3000:]}"
        )
    return seconds, code, "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps_per_epoch", type=int, default=20)
    flags = parser.parse_args()

    server = start_emulator()
    scratch = tempfile.mkdtemp(prefix="bench-resume-")
    try:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        from trainer import checkpoint, convert

        digits = os.path.join(scratch, "digits")
        convert.convert_sample_digits(digits, shards=7)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        gcs.Client(project="bench", credentials=AnonymousCredentials()).create_bucket(
            bucket
        )

        rows = []
        for kind, workdir in (
            ("local", os.path.join(scratch, "workdir")),
            ("gcs-emulator", f"gs://{bucket}/workdir"),
        ):
            args = [
                "train",
                "--job=jobs/digits.toml",  # resnet50, weights "none"
                f"--workdir={workdir}",
                f"--set=data.train={digits}/train-*.tfrecord",
                f"--set=data.validation={digits}/validation-*.tfrecord",
                f"--set=phases.transfer.steps_per_epoch={flags.steps_per_epoch}",
                "--set=train.global_batch_size=16",
                "--set=train.checkpoint_every_steps=1000",
            ]
            fresh, code, out = first_step(args, scratch, then_sigterm=True)
            if code != 75:
                raise SystemExit(
                    f"{kind}: the fresh run exited {code}, expected 75:\n{out[-3000:]}"
                )
            resume, code, out = first_step(args, scratch, then_sigterm=True)
            if code != 75 or "resuming from step" not in out:
                raise SystemExit(
                    f"{kind}: the resumed run exited {code}:\n{out[-3000:]}"
                )
            manager = checkpoint.CheckpointManager(workdir, is_chief=False)
            start = time.monotonic()
            arrays, _ = manager.restore()
            download = time.monotonic() - start
            size = sum(a.nbytes for a in arrays.values())
            target = (fresh + download) * 1.1
            rows.append((kind, size, fresh, download, resume, target))
            if kind == "local":
                shutil.rmtree(workdir, ignore_errors=True)

        print()
        print(
            f"{'workdir':<14}{'ckpt MB':>9}{'fresh TTFS s':>14}{'download s':>12}"
            f"{'resume TTFS s':>15}{'target s':>10}  verdict"
        )
        for kind, size, fresh, download, resume, target in rows:
            verdict = "ok" if resume <= target else "MISSED"
            print(
                f"{kind:<14}{size / 1e6:>9.1f}{fresh:>14.1f}{download:>12.2f}"
                f"{resume:>15.1f}{target:>10.1f}  {verdict}"
            )
        print(
            "TTFS: Popen to the first completed training step; target: (fresh + download) x 1.1"
        )
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

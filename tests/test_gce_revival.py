"""A GCE Spot VM preempted twice and revived by its group, end to end.

deploy/gce/startup.sh runs for real in bash, as it does at every boot of the
group's VM: it reads its metadata from a stand-in metadata server on
127.0.0.1 and runs the real `trainer train` on the digits job, whose workdir
is in the GCS emulator. The harness preempts it the way Compute Engine does
(`instance/preempted` turns TRUE, then SIGTERM to every process, then the VM
stops), and revives it the way the managed instance group does (a new boot,
a fresh disk, the same metadata, the same startup script), until the run
completes; the final weights equal an uninterrupted run's. gcloud is a
stand-in that records its calls.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from tests import gce_metadata
from tests.test_resume import ROOT, SMALL, Bucket, load_export, summary
from tests.test_submit import DELETE_GROUP, calls, fake_tool
from trainer import storage, submit

pytestmark = pytest.mark.slow

# Twice: the second revival resumes a run that was itself resumed.
PREEMPTIONS = 2
# test_resume's small MobileNetV2 job, with room for the preemptions:
# transfer 2 epochs x 10 steps, finetune 1 x 4, a checkpoint every 2 steps.
JOB = [*SMALL, "phases.transfer.steps_per_epoch=10"]
TOTAL_STEPS = 2 * 10 + 4


class VM:
    """One boot of the group's VM: a fresh disk running startup.sh."""

    def __init__(self, scratch: str, bin_dir: str, metadata_url: str):
        self.disk = tempfile.mkdtemp(prefix="disk-", dir=scratch)
        for d in ("home", "tmp", "opt"):
            os.makedirs(os.path.join(self.disk, d))
        env = dict(
            os.environ,
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            HOME=os.path.join(self.disk, "home"),
            TMPDIR=os.path.join(self.disk, "tmp"),
            TRAINER_HOME=os.path.join(self.disk, "opt"),
            TRAINER_METADATA_URL=metadata_url,
            PYTHONPATH=ROOT,
            TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONUNBUFFERED="1",
        )
        self.log_path = os.path.join(self.disk, "serial-port.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["bash", str(submit.GCE_STARTUP_SCRIPT)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Its own process group: the VM's processes.
        )

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def preempt(self, server) -> int:
        """Compute Engine's preemption: the flag, SIGTERM to all, then power off."""
        server.values["instance/preempted"] = "TRUE"
        os.killpg(self.proc.pid, signal.SIGTERM)
        code = self.wait(timeout=60)  # About 30 s before power-off.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # The stop.
        except ProcessLookupError:
            pass
        server.values["instance/preempted"] = "FALSE"
        return code


def _wait_for_step(bucket: Bucket, prefix: str, step: int, vm: VM, timeout=240):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (bucket.latest(prefix) or 0) >= step:
            return
        if vm.proc.poll() is not None:
            pytest.fail(f"the VM's startup script exited early:\n{vm.log()[-4000:]}")
        time.sleep(0.1)
    pytest.fail(f"no checkpoint {step} after {timeout}s:\n{vm.log()[-4000:]}")


def test_preempted_spot_vm_is_revived_until_the_run_completes(
    gcs_bucket, digits_dir, tmp_path
):
    bucket = Bucket(gcs_bucket)
    workdir, prefix = f"{gcs_bucket}/runs/r1", "runs/r1/"
    job_url = f"{workdir}/job.toml"
    storage.put(os.path.join(ROOT, "jobs", "digits.toml"), job_url)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud_log = fake_tool(bin_dir, "gcloud")
    trainer = bin_dir / "trainer"  # The image's installed console script.
    trainer.write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -m trainer "$@"\n')
    trainer.chmod(0o755)
    data = [
        f"data.train={digits_dir}/train-*.tfrecord",
        f"data.validation={digits_dir}/validation-00000-of-00007.tfrecord",
        *JOB,
    ]
    with gce_metadata.serve() as server:
        overrides = [
            *data,
            f"train.preemption_metadata_url={server.url}/instance/preempted",
        ]
        server.values = {
            "instance/name": "digits-x1y2",
            "instance/zone": "projects/123/zones/us-central1-a",
            "instance/preempted": "FALSE",
            "instance/attributes/trainer-job": job_url,
            "instance/attributes/trainer-workdir": workdir,
            "instance/attributes/trainer-package": "",  # Installed already.
            "instance/attributes/trainer-set": "\n".join(overrides),
            "instance/attributes/trainer-group": "digits",
            "instance/attributes/trainer-template": "digits-0123abcd",
            "instance/attributes/trainer-give-up-at": str(int(time.time()) + 3600),
        }
        steps_seen = []
        for n in range(PREEMPTIONS):
            vm = VM(str(tmp_path), str(bin_dir), server.url)
            # Each boot makes progress (a new checkpoint) before it is preempted.
            _wait_for_step(bucket, prefix, (steps_seen or [1])[-1] + 1, vm)
            code = vm.preempt(server)
            log = vm.log()
            assert code == 0, f"boot {n + 1}:\n{log[-4000:]}"
            assert "preempted; the managed instance group revives the run" in log, log
            assert calls(gcloud_log) == []  # Nothing torn down: the group revives.
            s = summary(bucket, prefix)
            assert s["status"] == "preempted", s
            steps_seen.append(s["global_step"])
            if n:
                assert f"resuming from step {steps_seen[-2]}" in log, log[-4000:]
        # The last revival runs to the end and tears the group down.
        vm = VM(str(tmp_path), str(bin_dir), server.url)
        assert vm.wait() == 0, vm.log()[-4000:]
        assert f"resuming from step {steps_seen[-1]}" in vm.log()
    assert steps_seen == sorted(steps_seen) and steps_seen[0] >= 2
    s = summary(bucket, prefix)
    assert s["status"] == "completed" and s["global_step"] == TOTAL_STEPS, s
    leave = ["compute", "instance-groups", "managed", "abandon-instances", "digits",
             "--instances=digits-x1y2", "--zone=us-central1-a", "--quiet"]  # fmt: skip
    delete_vm = ["compute", "instances", "delete", "digits-x1y2",
                 "--zone=us-central1-a", "--quiet"]  # fmt: skip
    assert calls(gcloud_log) == [leave, *DELETE_GROUP, delete_vm]

    # The same job without interruption: the same final weights.
    uninterrupted = f"{gcs_bucket}/runs/r2"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "train", f"--job={job_url}",
         f"--workdir={uninterrupted}", *(f"--set={o}" for o in data)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    revived = load_export(bucket, prefix, str(tmp_path)).get_weights()
    straight = load_export(bucket, "runs/r2/", str(tmp_path)).get_weights()
    assert len(revived) == len(straight) > 0
    assert all(np.array_equal(a, b) for a, b in zip(revived, straight, strict=True))
    print(json.dumps({"preempted_at_steps": steps_seen}))

"""Mixed precision on CPU: float16 with loss scaling, bfloat16; exact resume of each."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from tests.test_multiworker import final_arrays
from tests.test_resume import (
    SMALL_BACKBONE,
    Bucket,
    Run,
    summary,
    wait_for,
    workdir_in,
)
from trainer import checkpoint_catalog, checkpoint_format

pytestmark = pytest.mark.slow

TOTAL_STEPS = 10  # transfer 4 steps, finetune 6


def _run(digits_dir, url, scratch, precision) -> Run:
    return Run(
        [
            "train",
            "--job=jobs/digits.toml",
            f"--workdir={url}",
            f"--set=data.train={digits_dir}/train-*.tfrecord",
            f"--set=data.validation={digits_dir}/validation-00000-of-00007.tfrecord",
            *(f"--set={s}" for s in SMALL_BACKBONE),
            "--set=train.export_saved_model=false",  # Weights are compared.
            "--set=train.global_batch_size=16",
            "--set=train.checkpoint_every_steps=2",
            "--set=train.deterministic=true",
            "--set=phases.transfer.epochs=1",
            "--set=phases.transfer.learning_rate=0.01",
            "--set=phases.transfer.steps_per_epoch=4",
            "--set=phases.finetune.epochs=1",
            "--set=phases.finetune.steps_per_epoch=6",
            "--set=phases.finetune.jit_compile=false",
            f"--set=runtime.mixed_precision={precision}",
        ],
        scratch,
    )


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_kill_9_mid_finetune_resumes_bit_exact(
    precision, gcs_bucket, digits_dir, tmp_path
):
    bucket, scratch = Bucket(gcs_bucket), str(tmp_path)
    url_a, pa = workdir_in(gcs_bucket, "a")
    url_b, pb = workdir_in(gcs_bucket, "b")
    ref = _run(digits_dir, url_a, scratch, precision)
    assert ref.wait() == 0, ref.describe()
    run = _run(digits_dir, url_b, scratch, precision)
    # Step 6: mid-finetune, so the restart restores the optimizer's slots (and,
    # for float16, the loss scale and its counter).
    wait_for(lambda: (bucket.latest(pb) or 0) >= 6, run)
    run.kill(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, run.describe()
    assert bucket.latest(pb) < TOTAL_STEPS
    again = _run(digits_dir, url_b, scratch, precision)
    assert again.wait() == 0, again.describe()
    assert summary(bucket, pa)["history"] == summary(bucket, pb)["history"]
    (arrays_a, state_a), (arrays_b, _) = final_arrays(url_a), final_arrays(url_b)
    assert state_a["global_step"] == TOTAL_STEPS
    assert sorted(arrays_a) == sorted(arrays_b)
    for key in arrays_a:
        assert np.array_equal(arrays_a[key], arrays_b[key]), f"{key} differs"
    # Step 8, written after the restart: optimizer state too, bit for bit.
    (mid_a, _), (mid_b, _) = (
        checkpoint_format.read(
            f"{url}/checkpoints/{checkpoint_catalog.checkpoint_name(8)}"
        )
        for url in (url_a, url_b)
    )
    if precision == "mixed_float16":
        assert "optimizer/dynamic_scale" in mid_a
    assert sorted(mid_a) == sorted(mid_b)
    for key in mid_a:
        assert np.array_equal(mid_a[key], mid_b[key]), f"{key} differs at step 8"

"""Cached backbone features of frozen phases (issue 12), end to end.

Every training runs on the real digits: in real `python -m trainer train`
processes, but for the uncached run that the cached one is compared with and
the five short runs of the cache's bookkeeping test, which go through
`main.run` in this process (the notebook's way: one process, many runs). The
kill -9 run keeps its workdir (and so its cache) in the GCS emulator and
resumes on a fresh "machine" (HOME, TMPDIR), as tests/test_resume.py does.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import signal
import time

import numpy as np
import pytest

from tests.test_cli import assert_bad_input, run
from tests.test_resume import (
    SMALL_BACKBONE,
    Bucket,
    Run,
    run_to_end,
    wait_for,
    workdir_in,
)

# Measured on this CPU with train.deterministic = true: the head trained on
# cached features equals the uncached one exactly (max |difference| 0.0);
# the tolerance leaves room for other CPUs' kernels (reduction order).
HEAD_ATOL = 1e-5

# The demo's recipe on a slice of the digits: a frozen phase of 2 epochs x 10
# steps (checkpoints at 3, 6, 9, 10, ...), then two fine-tune steps.
CACHED_STEPS = 2 * 10
FAST = [
    "train.global_batch_size=16",
    "train.checkpoint_every_steps=3",
    "train.keep_checkpoints=20",
    "phases.transfer.epochs=2",
    "phases.transfer.steps_per_epoch=10",
    "phases.finetune.epochs=1",
    "phases.finetune.steps_per_epoch=2",
    "phases.finetune.jit_compile=false",
]


def job_args(digits: str, workdir: str, *extra: str) -> list[str]:
    return [
        "--job=jobs/digits.toml",
        f"--workdir={workdir}",
        f"--set=data.train={digits}/train-*.tfrecord",
        f"--set=data.validation={digits}/validation-*.tfrecord",
        *(f"--set={s}" for s in FAST),
        *(f"--set={s}" for s in extra),
    ]


def one_shard(digits_dir: str, workdir: str, *extra: str) -> list[str]:
    """`job_args` on one shard a split of the 7-shard digits: 207 training
    records (the 160 of an epoch's 10 steps, and a shuffle), 52 validation.

    With the small backbone: what the cache does is the same for any, and
    each of the four runs that compare cached with uncached and killed with
    whole costs about half ResNet50's CPU time."""
    return job_args(
        digits_dir,
        workdir,
        f"data.train={digits_dir}/train-00000-of-00007.tfrecord",
        f"data.validation={digits_dir}/validation-00000-of-00007.tfrecord",
        *SMALL_BACKBONE,
        "train.export_saved_model=false",  # The tests read model.keras only.
        *extra,
    )


def head_arrays(workdir: str, step: int) -> dict[str, np.ndarray]:
    from trainer import checkpoint_format

    arrays, _ = checkpoint_format.read(f"{workdir}/checkpoints/ckpt-{step:09d}")
    return {k: v for k, v in arrays.items() if k.startswith("model/head_")}


def all_arrays(workdir: str) -> dict[str, np.ndarray]:
    from trainer import checkpoint

    arrays, _ = checkpoint.CheckpointManager(workdir, is_chief=False).restore()
    return arrays


@pytest.fixture(scope="session")
def cached_reference(gcs_server, digits_dir, tmp_path_factory):
    """One uninterrupted cached run in the bucket: (workdir URL, stdout)."""
    from tests import gcs_emulator

    gcs_emulator.client().create_bucket("feature-cache-ref")
    url = "gs://feature-cache-ref/run"
    scratch = str(tmp_path_factory.mktemp("cached-ref"))
    done = run_to_end(
        ["train", *one_shard(digits_dir, url, "data.cache_features=true")], scratch
    )
    assert done.proc.returncode == 0, done.describe()
    return url, done.stdout


# The two tests of `cached_reference` share a worker, so it runs once.
@pytest.mark.slow
@pytest.mark.xdist_group("cached")
def test_cached_phase_reaches_the_uncached_head(
    digits_dir, cached_reference, tmp_path, capsys
):
    url, out = cached_reference
    assert "phase 'transfer' on cached features: yes" in out
    assert re.search(r"feature cache: 259 records in [\d.]+s", out), out
    assert "phase 'finetune' on cached features: no (trainable_from" in out

    plain = tmp_path / "plain"
    proc = run(
        capsys,
        "train",
        *one_shard(digits_dir, str(plain), "data.cache_features=false"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "phase 'transfer' on cached features: no (data.cache_features = false" in (
        proc.stdout
    )
    assert not (plain / "cache").exists()

    # The frozen phase's end (global step 20): the head, weight for weight.
    cached, uncached = head_arrays(url, CACHED_STEPS), head_arrays(str(plain), 20)
    assert sorted(cached) == sorted(uncached) and cached
    worst = max(float(np.max(np.abs(cached[k] - uncached[k]))) for k in cached)
    print(f"max |head weight difference| cached vs uncached: {worst:g}")
    assert worst <= HEAD_ATOL

    from trainer import storage

    summary = json.loads(storage.read_bytes(f"{url}/summary.json"))
    other = json.loads((plain / "summary.json").read_text())
    for a, b in zip(summary["history"], other["history"], strict=True):
        assert a["phase"] == b["phase"]
        assert round(a["val_accuracy"], 3) == round(b["val_accuracy"], 3), (a, b)


@pytest.mark.slow
@pytest.mark.xdist_group("cached")
def test_kill_9_mid_cached_phase_resumes_bit_exact(
    gcs_server, digits_dir, cached_reference, tmp_path
):
    from tests import gcs_emulator

    ref_url, _ = cached_reference
    gcs_emulator.client().create_bucket("feature-cache-kill")
    bucket = Bucket("gs://feature-cache-kill")
    url, prefix = workdir_in("gs://feature-cache-kill", "run")
    args = ["train", *one_shard(digits_dir, url, "data.cache_features=true")]
    scratch = str(tmp_path)

    first = Run(args, scratch)
    # A committed checkpoint inside the cached phase, not at its end.
    wait_for(
        lambda: (bucket.latest(prefix) or 0) >= 3, first, timeout=300, interval=0.02
    )
    first.kill(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, first.describe()
    killed_at = bucket.latest(prefix)
    assert killed_at < CACHED_STEPS, killed_at

    again = run_to_end(args, scratch)  # A fresh machine: HOME and TMPDIR are new.
    assert again.proc.returncode == 0, again.describe()
    assert re.search(r"resuming from step \d+: phase 'transfer'", again.stdout)
    assert "feature cache: reusing gs://feature-cache-kill/run/cache/features-" in (
        again.stdout
    )

    ref, resumed = all_arrays(ref_url), all_arrays(url)
    assert sorted(ref) == sorted(resumed)
    for key in ref:
        assert np.array_equal(ref[key], resumed[key]), f"{key} differs after resume"
    from trainer import storage

    history = [
        json.loads(storage.read_bytes(f"{u}/summary.json"))["history"]
        for u in (ref_url, url)
    ]
    assert history[0] == history[1]


def cache_folders(workdir: pathlib.Path) -> list[str]:
    return sorted(p.name for p in (workdir / "cache").iterdir())


@pytest.mark.slow
def test_cache_is_rebuilt_when_uncommitted_or_the_shards_change(tmp_path, capsys):
    """Each start trains one step of the cached phase, then its deadline stops it."""
    from trainer import convert

    data, workdir = tmp_path / "digits", tmp_path / "run"
    convert.convert_sample_digits(str(data), shards=7)
    args = job_args(
        str(data),
        str(workdir),
        "data.cache_features=true",
        "phases.transfer.epochs=1",
        "phases.finetune.epochs=0",
        # The cache's bookkeeping is the point: a small backbone, one shard
        # a split, so each of the four builds is quick.
        *SMALL_BACKBONE,
        f"data.train={data}/train-00000-of-00007.tfrecord",
        f"data.validation={data}/validation-00000-of-00007.tfrecord",
    )

    def one_step() -> str:
        proc = run(capsys, "train", *args, "--deadline=1s")
        assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    out = one_step()
    (first,) = cache_folders(workdir)
    assert f"computing backbone features into {workdir}/cache/{first}" in out

    # A cache without its manifest (a build killed half way) is never read.
    (workdir / "cache" / first / "manifest.json").unlink()
    out = one_step()
    assert f"computing backbone features into {workdir}/cache/{first}" in out
    assert (workdir / "cache" / first / "manifest.json").exists()

    out = one_step()
    assert f"feature cache: reusing {workdir}/cache/{first}" in out

    # A part whose bytes changed (same size) fails its CRC32: rebuilt too.
    part = workdir / "cache" / first / "train-00000.npz"
    blob = bytearray(part.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    part.write_bytes(bytes(blob))
    out = one_step()
    assert f"feature cache: {workdir}/cache/{first} has a damaged part" in out
    assert f"computing backbone features into {workdir}/cache/{first}" in out

    # Re-converted shards (convert refuses a folder that holds a dataset):
    # the same names, new modification times.
    time.sleep(0.01)
    shutil.rmtree(data)
    convert.convert_sample_digits(str(data), shards=7)
    done = run(capsys, "train", *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    second = [f for f in cache_folders(workdir) if f != first]
    assert len(second) == 1, cache_folders(workdir)
    assert f"computing backbone features into {workdir}/cache/{second[0]}" in (
        done.stdout
    )
    assert "reusing" not in done.stdout
    assert "phase 'finetune' skipped (epochs = 0)" in done.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [h["phase"] for h in summary["history"]] == ["transfer"]


def test_cache_key_covers_the_image_size(digits):
    from trainer import config, feature_cache, models

    urls = set()
    for size in (32, 40):
        spec = config.load(
            "jobs/digits.toml",
            [
                f"data.train={digits}/train-*.tfrecord",
                f"data.validation={digits}/validation-*.tfrecord",
                f"data.image_size={size}",
            ],
        )
        model = models.build_model(spec)
        material = feature_cache.key_material(spec, model, "float32")
        urls.add(feature_cache.cache_url("/w", material))
    assert len(urls) == 2, urls


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    from trainer import convert

    out = str(tmp_path_factory.mktemp("digits-cache"))
    convert.convert_sample_digits(out, shards=1)
    return out


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "data.augment=flip",
            r'data.cache_features = true cannot be used: data.augment = "flip"',
        ),
        (
            "phases.transfer.trainable_from=all",
            r"data.cache_features = true, but no phase can use cached features",
        ),
    ],
)
def test_cache_true_where_it_cannot_work_is_exit_2(
    digits, tmp_path, capsys, setting, message
):
    args = job_args(digits, str(tmp_path / "run"), "data.cache_features=true", setting)
    assert_bad_input(run(capsys, "check", *args), message)


@pytest.mark.slow  # Two dry runs of ResNet50 (about 18 CPU-s).
def test_check_plan_says_whether_and_how_big(digits, tmp_path, capsys):
    # 12 epochs x (10 x 16 + 359) passes without the cache, 1,797 to build it.
    long = job_args(digits, str(tmp_path / "run"), "phases.transfer.epochs=12")
    proc = run(capsys, "check", *long)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln.strip() for ln in proc.stdout.splitlines() if "feature_cache" in ln]
    assert lines == [
        "feature_cache     yes (frozen backbone, no augmentation; 14.0 MiB in float32)",
        "feature_cache     no (trainable_from = 'res5a_branch2a' trains the backbone; "
        "14.0 MiB in float32)",
    ]
    small = run(capsys, "check", *long, "--set=data.cache_budget_mb=10")
    assert "feature_cache     no (over data.cache_budget_mb = 10; 14.0 MiB" in (
        small.stdout
    )
    assert not (tmp_path / "run" / "cache").exists()


def test_auto_builds_the_cache_only_where_it_saves_backbone_passes(digits):
    """FAST's 2 epochs of 10 steps read a fraction of the split: building
    costs more passes than it saves (`trainer check` prints this reason)."""
    from trainer import config, feature_cache

    def obstacle(*extra):
        sets = job_args(digits, "w", *extra)[2:]
        spec = config.load("jobs/digits.toml", [a.removeprefix("--set=") for a in sets])
        return feature_cache.cost_obstacle(spec, spec.phases[0])

    assert obstacle() == (
        "building it takes 1,797 backbone passes, more than the 1,038 the phase "
        "makes without it"
    )  # 2 x (10 x 16 + 359)
    assert obstacle("phases.transfer.epochs=4") is None  # 2,076
    assert obstacle("phases.transfer.steps_per_epoch=0") is None  # 2 x (1,424 + 359)


def test_cached_batches_hold_the_uncached_records_in_order(tmp_path):
    """The same records, order, skips and tally, at any epoch and start step.

    The "features" here are the image's first pixel (each image is one
    value), so a batch of them names the records it holds.
    """
    from tests.test_input_pipeline import _example, batches, make_spec
    from trainer import convert, feature_cache, input_pipeline, storage, tfrecord

    def image(i: int) -> bytes:
        return convert._encode_png(np.full((32, 32, 3), i, np.uint8))

    records = [_example(label=i % 10, image=image(i)) for i in range(1, 60)]
    records.insert(17, _example(label=99, image=image(200)))  # A bad label.
    for name, part in (
        ("train-00000-of-00002", records[:31]),
        ("train-00001-of-00002", records[31:50]),
        ("validation-00000-of-00001", records[50:]),
    ):
        blob = b"".join(tfrecord.frame_record(r) for r in part)
        storage.write_bytes(f"{tmp_path}/{name}.tfrecord", blob)
    spec = make_spec(str(tmp_path), batch=7, on_corrupt="skip", shuffle_buffer=16)

    def cached(split: str) -> feature_cache.Features:
        got = batches(input_pipeline.cache_source(spec, split, 7))
        images, labels, ids = (np.concatenate(x) for x in zip(*got, strict=True))
        real = ids >= 0
        values = images[real][:, 0, 0, :1].astype(np.float32)
        return feature_cache.Features(ids[real], labels[real], values)

    train, validation = cached("train"), cached("validation")
    assert len(train.labels) == 49  # The bad record is not in the cache.
    tallies = input_pipeline.CorruptTally(), input_pipeline.CorruptTally()
    for epoch, start in ((0, 0), (0, 3), (1, 0), (1, 5)):
        kwargs = {"epoch": epoch, "start_step": start}
        plain = batches(input_pipeline.train_dataset(spec, tally=tallies[0], **kwargs))
        on_features = batches(
            input_pipeline.feature_train_dataset(
                spec, train, tally=tallies[1], **kwargs
            )
        )
        assert len(plain) == len(on_features) == 49 // 7 - start
        for (images, labels), (values, labels2) in zip(plain, on_features, strict=True):
            assert images[:, 0, 0, 0].tolist() == values[:, 0].astype(int).tolist()
            assert labels.tolist() == labels2.tolist()
    assert tallies[0].entries() == tallies[1].entries()
    assert tallies[0].summary()["train"]["skipped"] == 2  # Once per epoch.

    plain = batches(input_pipeline.eval_dataset(spec))
    on_features = batches(input_pipeline.feature_eval_dataset(spec, validation))
    assert len(plain) == len(on_features)
    for (images, labels, w), (values, labels2, w2) in zip(
        plain, on_features, strict=True
    ):
        assert images[:, 0, 0, 0].tolist() == values[:, 0].astype(int).tolist()
        assert labels.tolist() == labels2.tolist() and w.tolist() == w2.tolist()

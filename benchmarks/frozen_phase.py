"""A frozen-phase epoch end to end against an epoch on cached backbone features.

ResNet50 (random weights: no internet here; the speed is the same) with the
digits job's head, at 32x32 on the real digits (1,438 train / 359 validation
records) and at 224x224 on synthetic JPEG shards (crops of scikit-learn's two
sample photos; --n224 train records, a fifth of that for validation). An
epoch is what the trainer's loop runs: every training step of the split (one
step per `tf.function` call, as with train.steps_per_execution = 1), then the
validation pass. Per size it prints the uncached epoch, the time to build the
cache (both splits), the cached epoch, and the ratio. Epoch times are taken
after a warm-up (one step and a validation: tracing), cached ones as the last
of three epochs. The flatten head at 224 px is a Dense(512) on 100,352
features (51M weights): its own training bounds the speed-up; the "avg" row
(GlobalAveragePooling, 2,048 features) shows the backbone's share alone.

    .venv/bin/python benchmarks/frozen_phase.py [--n224=320]
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from trainer import (  # noqa: E402
    config,
    convert,
    feature_cache,
    input_pipeline,
    models,
    runtime,
    steps,
    tfrecord,
    train,
)


def synthetic_jpegs(folder: str, n: int, size: int = 224) -> None:
    """`n` training and n/5 validation JPEGs: random crops of two photos."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for split, count, shards in (("train", n, 4), ("validation", n // 5, 1)):
        per = -(-count // shards)
        for s in range(shards):
            path = os.path.join(folder, f"{split}-{s:05d}-of-{shards:05d}.tfrecord")
            with open(path, "wb") as f:
                for i in range(s * per, min(count, (s + 1) * per)):
                    photo = photos[i % 2]
                    y = rng.integers(0, photo.shape[0] - size)
                    x = rng.integers(0, photo.shape[1] - size)
                    buffer = io.BytesIO()
                    crop = photo[y : y + size, x : x + size]
                    Image.fromarray(crop).save(buffer, "JPEG", quality=90)
                    example = convert.make_example(
                        buffer.getvalue(), i % 10, height=size, width=size,
                        fmt=b"jpeg", text="",
                    )  # fmt: skip
                    f.write(tfrecord.frame_record(example))


def job(data: str, size: int, pooling: str = "flatten") -> config.JobSpec:
    return config.load(
        "jobs/digits.toml",
        [
            f"data.train={data}/train-*.tfrecord",
            f"data.validation={data}/validation-*.tfrecord",
            f"data.image_size={size}",
            f"model.pooling={pooling}",
            "train.deterministic=false",
        ],
    )


def epoch(spec, rt, fns, per_epoch: int, key: int, features) -> float:
    """Seconds for one epoch: its training steps, then validation."""
    train_fn, eval_fn = fns

    def dataset_fn(ctx):
        if features is None:
            return input_pipeline.train_dataset(spec, epoch=key, input_context=ctx)
        return input_pipeline.feature_train_dataset(
            spec, features["train"], epoch=key, input_context=ctx
        )

    start = time.perf_counter()
    iterator = iter(rt.strategy.distribute_datasets_from_function(dataset_fn))
    for _ in range(per_epoch):
        train_fn(iterator, tf.constant(1), tf.constant(0))
    val = None if features is None else features["validation"]
    steps.evaluate(eval_fn, spec, rt.strategy, pass_key=key, features=val)
    return time.perf_counter() - start


def step_fns(spec, rt, model, optimizer, forward):
    kwargs = {"num_classes": spec.data.num_classes, "forward": forward}
    train_fn = steps.make_train_step(
        model,
        optimizer,
        rt.strategy,
        global_batch=spec.train.global_batch_size,
        jit=False,
        **kwargs,
    )
    return train_fn, steps.make_eval_step(model, rt.strategy, **kwargs)


def measure(spec, workdir: str) -> dict[str, float]:
    phase = spec.phases[0]  # transfer: trainable_from = "none"
    with runtime.setup(spec.runtime, deterministic=False, seed=0) as rt:
        with rt.strategy.scope():
            model = models.build_model(spec)
            train.set_trainable(model, spec, phase)
            optimizer = steps.make_optimizer("adam", 1e-3, rt.precision)
            optimizer.build(model.trainable_variables)
        per_epoch = input_pipeline.phase_steps(spec, phase)
        plain = step_fns(spec, rt, model, optimizer, None)
        # Warm up (trace) with one step and a validation, then the measured epoch.
        uncached = [
            epoch(spec, rt, plain, n, k, None) for k, n in enumerate((1, per_epoch))
        ]
        decision = feature_cache.decide(spec, phase, rt, model)
        start = time.perf_counter()
        features = feature_cache.load_or_build(spec, model, rt, workdir, decision.dtype)
        build = time.perf_counter() - start
        head = functools.partial(models.apply_head, model)
        fns = step_fns(spec, rt, model, optimizer, head)
        cached = [epoch(spec, rt, fns, per_epoch, k, features) for k in range(3)]
    return {
        "uncached": uncached[-1],
        "build": build,
        "cached": cached[-1],
        "mib": decision.nbytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n224", type=int, default=320)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        digits = os.path.join(tmp, "digits")
        convert.convert_sample_digits(digits)
        rows.append(("32x32 digits", measure(job(digits, 32), f"{tmp}/w32")))
        jpegs = os.path.join(tmp, "jpegs")
        os.makedirs(jpegs)
        synthetic_jpegs(jpegs, args.n224)
        label = f"224x224 JPEG ({args.n224}+{args.n224 // 5})"
        rows.append((label, measure(job(jpegs, 224), f"{tmp}/w224")))
        # The same backbone features: the cache built above is reused (its
        # "build" is then the time to load it).
        rows.append((label + ", avg", measure(job(jpegs, 224, "avg"), f"{tmp}/w224")))
    print(
        f"\n| {'set':<30} | uncached epoch | cache build | cached epoch | speed-up "
        "| cache |"
    )
    print(
        f"|{'-' * 32}|---------------:|------------:|-------------:|---------:|------:|"
    )
    for label, r in rows:
        print(
            f"| {label:<30} | {r['uncached']:13.2f}s | {r['build']:10.1f}s "
            f"| {r['cached']:11.3f}s | {r['uncached'] / r['cached']:7.1f}x "
            f"| {r['mib']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()

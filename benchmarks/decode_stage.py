"""The decode stage alone: one record to a tf.data call, or a group to a call.

`input_pipeline._decode_stage` decodes images up to GROUPED_DECODE_MAX_SIZE
DECODE_GROUP records to a tf.data call (`tf.map_fn` inside) and larger ones
one record to a call. This measures both ways at several sizes, on the same
chunks of image bytes held in memory (the reader is not measured), through
the product's own source stage (`_records_dataset`) and decode stage: the
threshold is forced to each side. Interleaved (record, group, record, ...)
for `--rounds` rounds after a warm-up round; printed per size: images/s, the
median and spread (min-max) of the ratio group / record, and each way's CPU
microseconds per image and cores busy. The warm-up round also checks that
both ways give the same pixels.

    PYTHONPATH=. .venv/bin/python benchmarks/decode_stage.py [--rounds=5]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import input_pipeline as pipeline  # noqa: E402
from trainer import input_pipeline  # noqa: E402

CASES = ((32, "PNG"), (64, "JPEG"), (96, "JPEG"), (128, "JPEG"), (160, "JPEG"))
CASES += ((192, "JPEG"), (224, "JPEG"), (224, "PNG"))
WAYS = ("record", "group")


def encoded_images(size: int, fmt: str, unique: int = 300) -> list[bytes]:
    """Crops of sklearn's two sample photos, encoded at `size` (real content:
    decode cost depends on it)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    out = []
    for i in range(unique):
        photo = photos[i % 2]
        y = rng.integers(0, photo.shape[0] - 300)
        x = rng.integers(0, photo.shape[1] - 300)
        image = Image.fromarray(photo[y : y + 300, x : x + 300]).resize((size, size))
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def dataset(spec, chunks, way: str) -> tf.data.Dataset:
    """The product's source and decode stages over `chunks`, grouped or not."""
    saved = input_pipeline.GROUPED_DECODE_MAX_SIZE
    input_pipeline.GROUPED_DECODE_MAX_SIZE = 10**6 if way == "group" else 0
    try:
        records = input_pipeline._records_dataset(lambda: iter(chunks))
        ds = input_pipeline._decoded(spec, records, None)
    finally:
        input_pipeline.GROUPED_DECODE_MAX_SIZE = saved
    return ds.batch(pipeline.BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _size(batch) -> int:
    return int(batch[0].shape[0])


def checksum(ds) -> int:
    return int(sum(int(tf.reduce_sum(tf.cast(b, tf.int64))) for b, _ in ds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (>= 5)")
    parser.add_argument("--images", type=int, default=4096, help="per run at >= 96 px")
    args = parser.parse_args()
    prepared = {}
    for size, fmt in CASES:
        made = encoded_images(size, fmt)
        # As many images as 96 px ones for the smaller sizes' pixels: runs
        # of about a second each on 2 cores.
        n = round(args.images * max(1.0, (96 / size) ** 2)) // 256 * 256
        chunks = [
            (
                np.array([made[(c + i) % len(made)] for i in range(256)], object),
                np.zeros(256, np.int32),
                np.arange(c, c + 256, dtype=np.int64),
            )
            for c in range(0, n, 256)
        ]
        prepared[(size, fmt)] = (pipeline.spec_for("unused", size), chunks)
    print(
        f"{os.cpu_count()} CPU cores; load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"GROUPED_DECODE_MAX_SIZE {input_pipeline.GROUPED_DECODE_MAX_SIZE}, "
        f"DECODE_GROUP {input_pipeline.DECODE_GROUP}"
    )
    runs = {(case, way): [] for case in prepared for way in WAYS}
    for r in range(args.rounds + 1):
        for case, (spec, chunks) in prepared.items():
            if not r:  # Warm-up: the same pixels both ways.
                sums = {checksum(dataset(spec, chunks, way)) for way in WAYS}
                assert len(sums) == 1, (case, sums)
                continue
            for way in WAYS:
                ds = dataset(spec, chunks, way)
                runs[(case, way)].append(pipeline.timed(pipeline.drain, ds, _size))
        if r:
            print(f"round {r}/{args.rounds} done, load {os.getloadavg()[0]:.2f}")
    report(runs, prepared)


def report(runs: dict, prepared: dict) -> None:
    print(
        "\n| image | img/s record | img/s group | group x record: median [min-max] "
        "| CPU us/img record | group | cores busy record | group |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for case in prepared:
        rate = {w: [x["n"] / x["wall"] for x in runs[(case, w)]] for w in WAYS}
        ratio = [g / r for r, g in zip(rate["record"], rate["group"], strict=True)]
        cpu = {
            w: statistics.median(x["cpu"] / x["n"] * 1e6 for x in runs[(case, w)])
            for w in WAYS
        }
        busy = {
            w: statistics.median(x["cpu"] / x["wall"] for x in runs[(case, w)])
            for w in WAYS
        }
        print(
            f"| {case[0]} px {case[1]} | {statistics.median(rate['record']):,.0f} "
            f"| {statistics.median(rate['group']):,.0f} "
            f"| {statistics.median(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}] "
            f"| {cpu['record']:.1f} | {cpu['group']:.1f} "
            f"| {busy['record']:.2f} | {busy['group']:.2f} |"
        )


if __name__ == "__main__":
    main()

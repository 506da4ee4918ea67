"""Input pipeline throughput: native tf.data vs ours (local, GCS emulator).

Builds shards of 32x32 PNGs and 224x224 JPEGs in a temporary folder, then in
one run, with identical parse/decode/batch stages, measures

  (a) tf.data.TFRecordDataset on the local files,
  (b) trainer.input_pipeline on the same local files (through fsspec),
  (c) trainer.input_pipeline from fake-gcs-server through gcsfs,

printing raw records/s (TFRecord framing + CRC only, no decode), decoded
images/s, the ratios b/a and c/a, the peak RSS of each phase, and 224x224
JPEG decode images/s on one CPU core.

    .venv/bin/python benchmarks/input_pipeline.py [--n32=20000] [--n224=2000]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from trainer import config, convert, input_pipeline, storage, tfrecord  # noqa: E402

BATCH = 64


class PeakRSS:
    """Samples this process's RSS every 20 ms; `.peak` in MB."""

    def __init__(self):
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss) / 2**20


def build_shards(folder: str, n32: int, n224: int) -> None:
    rng = np.random.default_rng(0)
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two real JPEG photos, 427x640

    def write(prefix: str, n: int, shards: int, make) -> None:
        per = -(-n // shards)
        for s in range(shards):
            url = os.path.join(folder, f"{prefix}-{s:05d}-of-{shards:05d}.tfrecord")
            with open(url, "wb") as f:
                for i in range(s * per, min(n, (s + 1) * per)):
                    data, fmt, size = make(i)
                    ex = convert.make_example(
                        data, i % 10, height=size, width=size, fmt=fmt, text=""
                    )
                    f.write(tfrecord.frame_record(ex))

    def png32(i):
        base = np.repeat(rng.integers(0, 256, (8, 8, 1), np.uint8), 4, 0).repeat(4, 1)
        img = np.repeat(base, 3, 2) ^ rng.integers(0, 16, (32, 32, 3), np.uint8)
        return convert._encode_png(img), b"png", 32

    def jpeg224(i):
        photo = photos[i % 2]
        y, x = (
            rng.integers(0, photo.shape[0] - 300),
            rng.integers(0, photo.shape[1] - 300),
        )
        crop = Image.fromarray(photo[y : y + 300, x : x + 300]).resize((224, 224))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), b"jpeg", 224

    write("s32", n32, 8, png32)
    write("s224", n224, 4, jpeg224)


def spec_for(url_prefix: str, size: int) -> config.JobSpec:
    return config.from_dict(
        {
            "name": "bench",
            "data": {
                "train": f"{url_prefix}-*.tfrecord",
                "validation": f"{url_prefix}-*.tfrecord",
                "image_size": size,
                "num_classes": 10,
                "shuffle_buffer": 0,  # native has no shuffle either
            },
            "train": {"global_batch_size": BATCH},
            "phases": [{"name": "p", "epochs": 1, "learning_rate": 1.0}],
        }
    )


def parse_chunk(spec):
    """tf.io.parse_example on a batch of records: native's parse stage.

    Ours parses each tf.train.Example in its reader threads (it checks every
    record and names the bad one), so this stage is part of each pipeline.
    """
    d = spec.data

    def parse(serialized, ids):
        feats = tf.io.parse_example(
            serialized,
            {
                d.image_key: tf.io.FixedLenFeature([], tf.string),
                d.label_key: tf.io.FixedLenFeature([], tf.int64),
            },
        )
        labels = tf.cast(feats[d.label_key] - d.label_offset, tf.int32)
        return feats[d.image_key], labels, ids

    return parse


def native_raw(files) -> int:
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=len(files)).batch(1024)
    return sum(int(b.shape[0]) for b in ds)


def native_decoded(spec, files, threads: int | None = None) -> int:
    """The same parse/decode/batch stages as ours, fed by TFRecordDataset."""
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=len(files))
    ds = ds.batch(input_pipeline.CHUNK_RECORDS).map(
        lambda s: (s, tf.zeros(tf.shape(s), tf.int64)),
    )
    calls = threads or tf.data.AUTOTUNE
    ds = ds.map(
        parse_chunk(spec), num_parallel_calls=calls, deterministic=True
    ).unbatch()
    ds = ds.map(
        input_pipeline._decode_fn(spec, epoch=None),
        num_parallel_calls=calls,
        deterministic=True,
    )
    ds = ds.batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    if threads:
        opts = tf.data.Options()
        opts.threading.private_threadpool_size = threads
        opts.threading.max_intra_op_parallelism = 1
        opts.autotune.enabled = False
        ds = ds.with_options(opts)
    return sum(int(b[0].shape[0]) for b in ds)


def ours_raw(spec, stats: tfrecord.ReadStats) -> int:
    """Framing and CRCs only; the readers' buffer high-water mark goes to `stats`."""
    info = input_pipeline.split_info(spec, "train")
    stop = threading.Event()
    n = 0
    for datas, _ in input_pipeline._stream(
        info["shards"],
        info["counts"],
        list(range(len(info["shards"]))),
        0,
        reading=input_pipeline._Reading(checker=None, on_corrupt="error", stats=stats),
        parallelism=input_pipeline._parallelism(spec),
        stop=stop,
    ):
        n += len(datas)
    return n


def ours_decoded(spec) -> int:
    ds = input_pipeline.train_dataset(spec, epoch=0)
    return sum(int(b[0].shape[0]) for b in ds)


def timed(fn, *args):
    """One run: (count, items/s, peak RSS MB)."""
    with PeakRSS() as mem:
        t = time.perf_counter()
        count = fn(*args)
        rate = count / (time.perf_counter() - t)
    return count, rate, mem.peak


def best_of(repeat: int, cases: dict) -> dict:
    """Runs every case `repeat` times, interleaved (so load from other processes
    on the machine hits all alike), keeping each case's best rate and peak RSS."""
    best: dict = {}
    for _ in range(repeat):
        for name, (fn, *args) in cases.items():
            count, rate, peak = timed(fn, *args)
            old = best.get(name, (0, 0.0, 0.0))
            best[name] = (count, max(old[1], rate), max(old[2], peak))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n32", type=int, default=20000)
    parser.add_argument("--n224", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = parser.parse_args()
    cores = os.cpu_count()
    tmp = tempfile.mkdtemp(prefix="bench-input-")
    stats = tfrecord.ReadStats()
    t = time.perf_counter()
    build_shards(tmp, args.n32, args.n224)
    sizes = {
        p: sum(
            os.path.getsize(os.path.join(tmp, f))
            for f in os.listdir(tmp)
            if f.startswith(p)
        )
        for p in ("s32", "s224")
    }
    print(
        f"built {args.n32} 32x32 PNG ({sizes['s32'] / 2**20:.1f} MB, 8 shards) and "
        f"{args.n224} 224x224 JPEG ({sizes['s224'] / 2**20:.1f} MB, 4 shards) in "
        f"{time.perf_counter() - t:.1f}s; {cores} CPU cores"
    )

    from tests import gcs_emulator

    server = gcs_emulator.start_emulator()
    try:
        gcs_emulator.client().create_bucket("bench")
        storage.put(tmp, "gs://bench/shards")
        rows = []
        for prefix, size in (("s32", 32), ("s224", 224)):
            local = spec_for(os.path.join(tmp, prefix), size)
            remote = spec_for(f"gs://bench/shards/{prefix}", size)
            files = input_pipeline.list_shards(local.data.train)
            results = {
                "a native": (
                    timed(native_raw, files),
                    timed(native_decoded, local, files),
                ),
                "b ours local": (
                    timed(ours_raw, local, stats),
                    timed(ours_decoded, local),
                ),
                "c ours gcs": (
                    timed(ours_raw, remote, stats),
                    timed(ours_decoded, remote),
                ),
            }
            rows.append((prefix, size, results))
        one_core = timed(
            native_decoded, spec_for(os.path.join(tmp, "s224"), 224), files, 1
        )
    finally:
        server.stop()

    print()
    print(
        f"{'shards':<22}{'raw rec/s':>12}{'decoded img/s':>15}"
        f"{'raw x a':>9}{'dec x a':>9}{'peak RSS MB':>13}"
    )
    for _prefix, size, results in rows:
        (_, raw_a, _), (_, dec_a, _) = results["a native"]
        for name, ((_, raw, m1), (_, dec, m2)) in results.items():
            label = f"{size}x{size} {'PNG' if size == 32 else 'JPEG'} {name}"
            print(
                f"{label:<22}{raw:>12,.0f}{dec:>15,.0f}"
                f"{raw / raw_a:>9.2f}{dec / dec_a:>9.2f}{max(m1, m2):>13,.0f}"
            )
    print()
    print(
        f"224x224 JPEG decode (+parse, batch) on 1 core: {one_core[1]:,.0f} images/s "
        f"per core; {one_core[1] * cores:,.0f} images/s on {cores} cores if linear"
    )
    print(
        f"reader buffer high-water mark (raw reads): {stats.max_buffer_bytes:,} bytes"
    )


if __name__ == "__main__":
    main()

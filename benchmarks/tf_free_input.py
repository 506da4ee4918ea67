"""The TF-free input path (np_input) against tf.data: decoded images/s at 224 JPEG.

Both read the same shards through the same reader (trainer's threaded shard
readers, record checks, the epoch's order) and decode, resize and batch one
epoch with the same number of threads: tf.data's map in a private thread pool
of that size, np_input's Pillow decodes in a pool of that size; each path
in a process of its own (np_input's without TensorFlow). Rounds are
interleaved (tf, np, tf, np, ...) so that a change in the machine's load hits
both; the table gives medians, the spread (min-max) and the process CPU
seconds per image, and the load average around the run.

    .venv/bin/python benchmarks/tf_free_input.py [--images=1024] [--threads=2] [--rounds=5]

`measure(...)` returns the figures as a dict (benchmarks/backends.py uses it).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from trainer import config, convert, np_input, tfrecord  # noqa: E402


def write_jpegs(folder: str, n: int, size: int = 224, shards: int = 4) -> None:
    """`n` training JPEGs (quality 90, 4:2:0) of size x size, crops of two photos,
    and a small validation split."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("validation", max(1, n // 8))):
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


def spec_for(folder: str, size: int, batch: int) -> config.JobSpec:
    return config.from_dict(
        {
            "name": "bench",
            "data": {
                "train": f"{folder}/train-*.tfrecord",
                "validation": f"{folder}/validation-*.tfrecord",
                "image_size": size,
                "num_classes": 10,
                # A window well under the epoch: the reader runs one window
                # ahead, and with the default (10,000) it would read a small
                # set many times over while the epoch is decoded.
                "shuffle_buffer": 256,
            },
            "train": {"global_batch_size": batch},
            "phases": [{"name": "p", "epochs": 1, "learning_rate": 1.0}],
        }
    )


def tf_epoch(spec, threads: int, epoch: int) -> int:
    """Images of one epoch of input_pipeline.train_dataset, `threads` threads."""
    from trainer import input_pipeline

    tf = input_pipeline.tf
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    ds = input_pipeline.train_dataset(spec, epoch=epoch).with_options(options)
    n = 0
    for images, _ in ds:
        n += int(images.shape[0])
    return n


def np_epoch(spec, threads: int, epoch: int) -> int:
    """Images of one epoch of np_input.train_batches, `threads` threads."""
    n = 0
    for images, _ in np_input.train_batches(spec, epoch=epoch, threads=threads):
        n += len(images)
    return n


def _timed(fn, *args) -> tuple[float, float, int]:
    """(images/s, process CPU-s per image, images) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    n = fn(*args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n / wall, cpu / n, n


def _serve(conn, name: str, spec, threads: int) -> None:
    """A child process's loop: one epoch of path `name` per request."""
    fn = {"np": np_epoch, "tf": tf_epoch}[name]
    while (epoch := conn.recv()) is not None:
        conn.send(_timed(fn, spec, threads, epoch))


class _Path:
    """One input path in a process of its own: np_input's never imports
    TensorFlow, whose import changes the process's malloc settings
    (tf.data's from_generator pins M_MMAP_THRESHOLD), as in real use."""

    def __init__(self, name: str, spec, threads: int):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, name, spec, threads))
        self.proc.start()

    def epoch(self, epoch: int) -> tuple[float, float, int]:
        self.conn.send(epoch)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join()


def measure(
    *,
    images: int = 1024,
    threads: int = 2,
    rounds: int = 5,
    size: int = 224,
    batch: int = 64,
    folder: str | None = None,
    with_tf: bool = True,
) -> dict:
    """Decoded images/s of one epoch, np_input and (`with_tf`) tf.data.

    Args:
      images: training JPEGs written (when `folder` is None).
      threads: decoding threads of both paths.
      rounds: interleaved rounds; the first (warm-up) round is not counted.
      size: the JPEGs' side and data.image_size (no resize: decode-bound).
      batch: global batch.
      folder: existing shards (train-*/validation-*.tfrecord) to read instead.
      with_tf: also time tf.data (False where TensorFlow is not installed).

    Returns:
      {"np": {...}, "tf": {...}, "ratio_np_over_tf": float, "ratio_min_max":
      [lo, hi], "load": [before, after], ...}: per path the median and min/max
      images/s and the median CPU-s per image; the ratio is the median of the
      rounds' own np/tf ratios.
    """
    with tempfile.TemporaryDirectory() as scratch:
        if folder is None:
            folder = scratch
            write_jpegs(folder, images, size)
        spec = spec_for(folder, size, batch)
        names = ["np", "tf"] if with_tf else ["np"]
        paths = {name: _Path(name, spec, threads) for name in names}
        runs: dict[str, list] = {name: [] for name in paths}
        load = [os.getloadavg()[0]]
        try:
            for r in range(rounds + 1):
                for name, path in paths.items():
                    result = path.epoch(r)
                    if r:  # Round 0 warms up (imports, tf.data tracing, caches).
                        runs[name].append(result)
        finally:
            for path in paths.values():
                path.close()
        load.append(os.getloadavg()[0])
    out = {"threads": threads, "rounds": rounds, "size": size, "load": load}
    for name, results in runs.items():
        rates = [r[0] for r in results]
        out[name] = {
            "images": results[0][2],
            "images_per_s": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
            "cpu_s_per_image": statistics.median(r[1] for r in results),
        }
    if with_tf:
        # Each round's own ratio: the two epochs of a round ran back to back,
        # under much the same load.
        ratios = [a[0] / b[0] for a, b in zip(runs["np"], runs["tf"], strict=True)]
        out["ratio_np_over_tf"] = statistics.median(ratios)
        out["ratio_min_max"] = [min(ratios), max(ratios)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--no_tf", action="store_true", help="np_input only")
    args = parser.parse_args()
    r = measure(
        images=args.images,
        threads=args.threads,
        rounds=args.rounds,
        size=args.size,
        with_tf=not args.no_tf,
    )
    print(
        f"{args.size}x{args.size} JPEG, {r['np']['images']} images/epoch, "
        f"{r['threads']} threads, {r['rounds']} rounds (median, min-max); "
        f"load average {r['load'][0]:.2f} -> {r['load'][1]:.2f}"
    )
    print("| path | images/s | min-max | CPU-ms/image |")
    print("|---|---|---|---|")
    for name in ("tf", "np"):
        if name in r:
            m = r[name]
            print(
                f"| {name} | {m['images_per_s']:.0f} | {m['min']:.0f}-{m['max']:.0f} "
                f"| {1000 * m['cpu_s_per_image']:.2f} |"
            )
    if "ratio_np_over_tf" in r:
        lo, hi = r["ratio_min_max"]
        print(
            f"np_input / tf.data, per round: median {r['ratio_np_over_tf']:.2f}x "
            f"(min-max {lo:.2f}-{hi:.2f})"
        )


if __name__ == "__main__":
    main()

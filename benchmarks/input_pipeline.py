"""Input pipeline throughput, interleaved: native tf.data vs ours (local, GCS emulator).

Builds shards of 32x32 PNGs and 224x224 JPEGs in a temporary folder and copies
them to fake-gcs-server, then measures

  (a)  tf.data.TFRecordDataset on the local files, in a process of its own
       that runs nothing else: a user's own tf.data pipeline as the tf.data
       guide writes it (parse, then a parallel map that decodes one record to
       a call, then batch), glibc's malloc as TensorFlow leaves it;
  (a2) TensorFlow's reader and parse in this process, after ours has run
       here (with the malloc settings our pipeline makes,
       `input_pipeline._keep_freed_memory`), feeding ours' own decode stage
       (`input_pipeline._decoded`): what separates it from (b) is the reader
       alone, the stricter comparison;
  (b)  trainer.input_pipeline on the same local files (through fsspec),
  (c)  trainer.input_pipeline from fake-gcs-server (ranged GETs),

interleaved a, a2, b, c, a, a2, b, c, ... for `--rounds` rounds after one
untimed warm-up round, so that load from other processes on the machine hits
every variant alike. Each round's ratios are taken against that round's a (the
targets) and a2. Each run is timed to its last item (see `drain`). Printed per
variant: the median rate, the median and spread (min-max) of its ratios, CPU
milliseconds of its process per image (all its threads; a pipeline that leaves
a core idle shows it in "cores busy"), the emulator process's CPU per image,
and the peak RSS of its process. Raw rows are TFRecord framing + CRC only, no
parse or decode. Parsed rows (`--rows=parsed`, a diagnostic without target)
are everything before the decode: native's framing and `tf.io.parse_example`,
ours up to the checked chunks that tf.data hands to the decode stage; where
decoding is cheap (32 px), their CPU per record is what separates the
decoded rows.

    PYTHONPATH=. .venv/bin/python benchmarks/input_pipeline.py [--rounds=5]
"""

from __future__ import annotations

import argparse
import functools
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

# Run as a script: the repository root, for tests.gcs_emulator.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from trainer import config, convert, input_pipeline, storage, tfrecord  # noqa: E402

BATCH = 64
VARIANTS = ("a native", "a2 TF reader, our decode", "b ours local", "c ours gcs")
TARGETS = {"b ours local": 0.95, "c ours gcs": 0.90}  # decoded img/s x a
RAW_TARGET = 0.8  # raw records/s from the emulator x a


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


def build_shards(folder: str, n32: int, n224: int, unique: int = 1000) -> None:
    """`unique` distinct images of each kind, cycled (encoding costs more
    than decoding, and decode cost does not depend on repetition)."""
    rng = np.random.default_rng(0)
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two real JPEG photos, 427x640

    def write(prefix: str, n: int, shards: int, make) -> None:
        made = [make(i) for i in range(min(n, unique))]
        per = -(-n // shards)
        for s in range(shards):
            url = os.path.join(folder, f"{prefix}-{s:05d}-of-{shards:05d}.tfrecord")
            with open(url, "wb") as f:
                for i in range(s * per, min(n, (s + 1) * per)):
                    data, fmt, size = made[i % len(made)]
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

    Ours parses each tf.train.Example in its Python reader (it checks every
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


def drain(batches, size, limit: int | None = None) -> tuple[int, float]:
    """Items in `batches` and the perf_counter when the last one arrived;
    with `limit`, it stops at the first batch that reaches it (and counts
    every item that was timed, that batch's overshoot included).

    Timed to the last item, not to the return: deleting a tf.data iterator
    waits for its autotune thread's timer, 0.25 to 1.2 s at random, native's
    and ours alike (seen with gdb); inside a round of 1 to 3 s that alone
    swung a round's ratio by up to 50%. A training epoch pays it once.
    """
    n, last = 0, time.perf_counter()
    for b in batches:
        n += size(b)
        last = time.perf_counter()
        if limit is not None and n >= limit:
            break
    return n, last


def native_raw(files) -> tuple[int, float]:
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=len(files)).batch(1024)
    return drain(ds, lambda b: int(b.shape[0]))


def _native_chunks(spec, files) -> tf.data.Dataset:
    """Native's records framed and parsed, in chunks as ours hands them over."""
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=len(files))
    ds = ds.batch(input_pipeline.CHUNK_RECORDS).map(
        lambda s: (s, tf.zeros(tf.shape(s), tf.int64)),
    )
    return ds.map(
        parse_chunk(spec), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


def native_parsed(spec, files) -> tuple[int, float]:
    """Framing, CRCs and the parse of every tf.train.Example, no decode."""
    ds = _native_chunks(spec, files).prefetch(tf.data.AUTOTUNE)
    return drain(ds, lambda chunk: int(chunk[0].shape[0]))


def native_decoded(spec, files, ours_stage: bool = False) -> tuple[int, float]:
    """TFRecordDataset and the parse, then the decode of ours' `_decode_fn`:
    one record to a tf.data call (a user's pipeline), or with `ours_stage`
    ours' decode stage (which groups small images, `_decode_stage`)."""
    chunks = _native_chunks(spec, files)
    if ours_stage:
        ds = input_pipeline._decoded(spec, chunks, None)
    else:
        ds = chunks.unbatch().map(
            input_pipeline._decode_fn(spec, epoch=None),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    ds = ds.batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return drain(ds, lambda b: int(b[0].shape[0]))


def ours_raw(spec, stats: tfrecord.ReadStats) -> tuple[int, float]:
    """Framing and CRCs only; the readers' buffer high-water mark goes to `stats`."""
    info = input_pipeline.split_info(spec, "train")
    stream = input_pipeline._stream(
        info["shards"],
        info["counts"],
        list(range(len(info["shards"]))),
        0,
        reading=input_pipeline._Reading(checker=None, on_corrupt="error", stats=stats),
        parallelism=input_pipeline._parallelism(spec),
        stop=threading.Event(),
    )
    return drain(stream, lambda chunk: len(chunk[0]))


def ours_parsed(spec) -> tuple[int, float]:
    """Ours up to the decode: the checked records' chunks as tf.data hands
    them to the decode stage (image bytes, labels, record ids)."""
    gen, batch, batches = input_pipeline._train_stream(spec, 0, 0, None, None)
    # The stream wraps around at the epoch's end (the decoded dataset takes
    # its batches): stopped at the epoch's records.
    ds = input_pipeline._records_dataset(gen)
    return drain(ds, lambda chunk: int(chunk[0].shape[0]), limit=batch * batches)


def ours_decoded(spec) -> tuple[int, float]:
    ds = input_pipeline.train_dataset(spec, epoch=0)
    return drain(ds, lambda b: int(b[0].shape[0]))


# Native's variant of each row by kind: native(spec, files); a2's differs
# in the decoded row only.
NATIVE = {
    "raw": lambda spec, files: native_raw(files),
    "parsed": native_parsed,
    "decoded": native_decoded,
}
NATIVE_HERE = {**NATIVE, "decoded": functools.partial(native_decoded, ours_stage=True)}


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def timed(fn, *args) -> dict:
    """One run in this process: items, wall s, CPU s, peak RSS MB."""
    me = psutil.Process()
    with PeakRSS() as mem:
        c0, t0 = _cpu(me), time.perf_counter()
        count, last = fn(*args)
        wall = last - t0  # To the last item (see `drain`).
        cpu = _cpu(me) - c0
    return {"n": count, "wall": wall, "cpu": cpu, "rss": mem.peak}


def _serve_native(conn) -> None:
    """The own process's loop: one native run per request, until None."""
    while (request := conn.recv()) is not None:
        kind, prefix, size = request
        spec = spec_for(prefix, size)
        files = input_pipeline.list_shards(spec.data.train)
        conn.send(timed(NATIVE[kind], spec, files))


class NativeProcess:
    """Variant a: native tf.data in a spawned process that runs nothing else."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_native, args=(child,), daemon=True)
        self.proc.start()

    def run(self, kind: str, prefix: str, size: int) -> dict:
        self.conn.send((kind, prefix, size))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join()


def run_rounds(cases: dict, rounds: int, server: psutil.Process) -> dict:
    """{(size, kind, variant): [run, ...]}: one warm-up round, then `rounds`
    rounds, every case (a function returning `timed`'s dict) once per round
    in the order of `cases`; the emulator's CPU is added to each run."""
    runs: dict = {key: [] for key in cases}
    for r in range(rounds + 1):
        for key, case in cases.items():
            s0 = _cpu(server)
            result = case()
            result["server"] = _cpu(server) - s0
            if r:  # Round 0 warms up: TF's graphs, gcsfs' session, counts caches.
                runs[key].append(result)
        if r:
            print(f"round {r}/{rounds} done, load average {os.getloadavg()[0]:.2f}")
    return runs


def _spread(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    return f"{med:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def report(runs: dict, sizes, kind: str, unit: str, target) -> None:
    print(
        f"\n| {kind} | {unit} median | x a: median [min-max] | x a2 "
        f"| CPU ms/{unit[:3]} | cores busy | emulator CPU ms/{unit[:3]} "
        "| peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        rate = {
            v: [r["n"] / r["wall"] for r in runs[(size, kind, v)]] for v in VARIANTS
        }
        for variant in VARIANTS:
            rs = runs[(size, kind, variant)]
            ratios = {
                b: [x / y for x, y in zip(rate[variant], rate[b], strict=True)]
                for b in VARIANTS[:2]
            }
            goal = target(variant)
            mark = ""
            if goal:
                ok = statistics.median(ratios[VARIANTS[0]]) >= goal
                mark = f" ({'meets' if ok else 'MISSES'} >= {goal})"
            label = f"{size}x{size} {'PNG' if size == 32 else 'JPEG'} {variant}"
            print(
                f"| {label} | {statistics.median(rate[variant]):,.0f} "
                f"| {_spread(ratios[VARIANTS[0]], '.2f')}{mark} "
                f"| {_spread(ratios[VARIANTS[1]], '.2f')} "
                f"| {statistics.median([r['cpu'] / r['n'] * 1e3 for r in rs]):.3f} "
                f"| {statistics.median([r['cpu'] / r['wall'] for r in rs]):.2f} "
                f"| {statistics.median([r['server'] / r['n'] * 1e3 for r in rs]):.3f} "
                f"| {max(r['rss'] for r in rs):,.0f} |"
            )


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    picked = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in picked if x not in allowed]
    if bad or not picked:
        raise SystemExit(f"{flag}: received {text!r}; expected some of {allowed}")
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n32", type=int, default=20000)
    parser.add_argument("--n224", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (>= 5)")
    parser.add_argument(
        "--rows",
        default="raw,decoded",
        help="which rows to run: raw, parsed, decoded (comma-separated); parsed "
        "is a diagnostic without target: everything before the decode",
    )
    parser.add_argument(
        "--sizes", default="32,224", help="image sizes to run: 32, 224 or both"
    )
    args = parser.parse_args()
    kinds = _choices(args.rows, ("raw", "parsed", "decoded"), "--rows")
    sizes = tuple(int(x) for x in _choices(args.sizes, ("32", "224"), "--sizes"))
    tmp = tempfile.mkdtemp(prefix="bench-input-")
    stats = tfrecord.ReadStats()
    t = time.perf_counter()
    build_shards(tmp, args.n32, args.n224)
    mb = {
        p: sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if p in f)
        for p in ("s32", "s224")
    }
    print(
        f"built {args.n32} 32x32 PNG ({mb['s32'] / 2**20:.1f} MB, 8 shards) and "
        f"{args.n224} 224x224 JPEG ({mb['s224'] / 2**20:.1f} MB, 4 shards) in "
        f"{time.perf_counter() - t:.1f}s; {os.cpu_count()} CPU cores; load average "
        f"(1, 5, 15 min) {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )

    from tests import gcs_emulator

    server = gcs_emulator.start_emulator()
    native = NativeProcess()
    try:
        gcs_emulator.client().create_bucket("bench")
        storage.put(tmp, "gs://bench/shards")
        cases = {}
        for prefix, size in (("s32", 32), ("s224", 224)):
            if size not in sizes:
                continue
            local = spec_for(os.path.join(tmp, prefix), size)
            remote = spec_for(f"gs://bench/shards/{prefix}", size)
            files = input_pipeline.list_shards(local.data.train)
            a, a2, b, c = VARIANTS
            where = (os.path.join(tmp, prefix), size)
            for kind in kinds:
                cases[(size, kind, a)] = functools.partial(native.run, kind, *where)
                cases[(size, kind, a2)] = functools.partial(
                    timed, NATIVE_HERE[kind], local, files
                )
                ours = {  # The raw reads' buffer high-water mark goes to `stats`.
                    "raw": functools.partial(ours_raw, stats=stats),
                    "parsed": ours_parsed,
                    "decoded": ours_decoded,
                }[kind]
                cases[(size, kind, b)] = functools.partial(timed, ours, local)
                cases[(size, kind, c)] = functools.partial(timed, ours, remote)
        runs = run_rounds(cases, args.rounds, psutil.Process(server._process.pid))
    finally:
        native.close()
        server.stop()

    print(f"\nmedians of {args.rounds} interleaved rounds")
    if "decoded" in kinds:
        report(runs, sizes, "decoded", "img/s", TARGETS.get)
    if "parsed" in kinds:
        report(runs, sizes, "parsed", "rec/s", lambda v: None)
    if "raw" in kinds:
        raw_goal = lambda v: RAW_TARGET if v == VARIANTS[3] else None  # noqa: E731
        report(runs, sizes, "raw", "rec/s", raw_goal)
    print(
        f"\nreader buffer high-water mark (raw reads): {stats.max_buffer_bytes:,} "
        f"bytes; load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()

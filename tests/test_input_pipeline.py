"""The streaming input pipeline: byte-exact reads, exact resume, sharding, bad data."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
import threading
import time
import tracemalloc

import fsspec.implementations.memory
import numpy as np
import pytest
import tensorflow as tf

from trainer import config, convert, input_pipeline, records, storage, tfrecord
from trainer.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_spec(data_dir: str, *, batch: int = 32, **data) -> config.JobSpec:
    overrides = [f"data.{k}={_toml(v)}" for k, v in data.items()]
    overrides.append(f"train.global_batch_size={batch}")
    return config.load(
        f"""
name = "t"
[data]
train = "{data_dir}/train-*.tfrecord"
validation = "{data_dir}/validation-*.tfrecord"
image_size = 32
num_classes = 10
[[phases]]
name = "transfer"
epochs = 1
learning_rate = 0.001
""",
        overrides,
        is_text=True,
    )


def _toml(v):
    return f'"{v}"' if isinstance(v, str) else str(v)


@pytest.fixture
def gcs_digits(gcs_server, gcs_bucket, digits_dir):
    """The session's digits shards copied into a fresh emulator bucket."""
    url = storage.join(gcs_bucket, "digits")
    storage.put(digits_dir, url)
    return url


def batches(ds) -> list[tuple[np.ndarray, ...]]:
    return [tuple(t.numpy() for t in b) for b in ds]


def stream_ids(spec, epoch, input_context=None) -> np.ndarray:
    """Record ids of a worker's epoch, in order, straight from the reader."""
    info = input_pipeline.split_info(spec, "train")
    gen = input_pipeline._train_records(spec, info, epoch, 0, input_context)
    per_worker = input_pipeline.steps_per_epoch(spec) * spec.train.global_batch_size
    if input_context is not None:
        per_worker //= input_context.num_input_pipelines
    out, have = [], 0
    for _, _, ids in gen():
        out.append(ids)
        have += len(ids)
        if have >= per_worker:
            break
    return np.concatenate(out)[:per_worker]


# ---------------------------------------------------------------------------
# Reading


def test_records_round_trip_byte_for_byte_from_gcs(gcs_digits, digits_dir):
    for name in ("train-00000-of-00007.tfrecord", "validation-00006-of-00007.tfrecord"):
        ours = list(tfrecord.read_records(storage.join(gcs_digits, name)))
        native = [
            r.numpy() for r in tf.data.TFRecordDataset(os.path.join(digits_dir, name))
        ]
        assert ours == native and len(ours) > 40


def test_epoch_reads_every_image_once_byte_for_byte(gcs_digits, digits_dir):
    spec = make_spec(gcs_digits, batch=1)  # batch 1: no remainder dropped
    info = input_pipeline.split_info(spec, "train")
    gen = input_pipeline._train_records(spec, info, 0, 0, None)
    total = info["records"]
    got = []
    for images, _, _ in gen():
        got.extend(bytes(d) for d in images)
        if len(got) >= total:
            break
    native = [
        tf.train.Example.FromString(r.numpy())
        .features.feature["image/encoded"]
        .bytes_list.value[0]
        for r in tf.data.TFRecordDataset(
            sorted(tf.io.gfile.glob(os.path.join(digits_dir, "train-*")))
        )
    ]
    assert len(got) == total == len(native) == 1438
    assert sorted(got) == sorted(native)
    assert got != native  # shuffled


def test_train_and_eval_batches_have_fixed_shapes_and_types(gcs_digits):
    spec = make_spec(gcs_digits, batch=64)
    assert input_pipeline.steps_per_epoch(spec) == 1438 // 64
    train = batches(input_pipeline.train_dataset(spec, epoch=0))
    assert len(train) == 22
    images, labels = train[0]
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and set(labels) <= set(range(10))
    evals = batches(input_pipeline.eval_dataset(spec))
    assert len(evals) == 6  # ceil(359 / 64)
    assert all(b[0].shape == (64, 32, 32, 3) for b in evals)
    weights = np.concatenate([b[2] for b in evals])
    assert weights.sum() == 359 and weights.dtype == np.float32
    assert not weights[359:].any()


def _stages(ds: tf.data.Dataset) -> tuple[list, dict]:
    """A dataset's stages (graph nodes) from its output back along first
    inputs to its source, and the graph's constants by name."""
    graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())
    nodes = {n.name: n for n in graph.node if "Dataset" in n.op}
    node = [n for n in graph.node if "Dataset" in n.op][-1]  # topological order
    chain = [node]
    while node.input and node.input[0].split(":")[0] in nodes:
        node = nodes[node.input[0].split(":")[0]]
        chain.append(node)
    return chain, {n.name: n for n in graph.node if n.op == "Const"}


def _decoding_stages(spec):
    """`_stages` of each dataset that decodes: train, eval, feature cache source."""
    for ds in (
        input_pipeline.train_dataset(spec, epoch=0),
        input_pipeline.eval_dataset(spec),
        input_pipeline.cache_source(spec, "train", 64),
    ):
        yield _stages(ds)


def test_decode_is_parallel_and_never_waits_on_python(digits_dir):
    """What keeps decoding on every core: between the Python reader (the
    generator, which must take the GIL for every chunk) and the parallel
    decode stands a prefetch buffer, so the decode's dispatching thread never
    calls into Python itself; and the decode runs AUTOTUNE calls at a time.
    Without that buffer, ours decoded 224 px JPEGs at one core's rate."""
    for stages, consts in _decoding_stages(make_spec(digits_dir, batch=64)):
        ops = [n.op for n in stages]
        decode = ops.index("ParallelMapDatasetV2")
        source = ops.index("FlatMapDataset")  # from_generator's Python calls
        assert "PrefetchDataset" in ops[decode:source], ops
        assert ops[decode + 1 : source].count("ParallelMapDatasetV2") == 0, ops
        calls = consts[stages[decode].input[-1].split(":")[0]].attr["value"].tensor
        assert calls.int64_val == [tf.data.AUTOTUNE], stages[decode]


@pytest.mark.parametrize(("size", "grouped"), [(32, True), (96, True), (224, False)])
def test_small_images_are_decoded_a_group_to_a_call(digits_dir, size, grouped):
    """A tf.data call costs about what decoding a small image does: up to
    GROUPED_DECODE_MAX_SIZE (128) the decode stage takes DECODE_GROUP records
    a call; above it, one (there a group's copies cost more)."""
    spec = make_spec(digits_dir, batch=64, image_size=size)
    for stages, consts in _decoding_stages(spec):
        ops = [n.op for n in stages]
        feeds = stages[ops.index("ParallelMapDatasetV2") + 1]
        if not grouped:
            assert feeds.op == "UnbatchDataset", ops
            continue
        assert feeds.op == "BatchDatasetV2", ops
        group = consts[feeds.input[1].split(":")[0]].attr["value"].tensor
        assert group.int64_val == [input_pipeline.DECODE_GROUP]


@pytest.mark.parametrize(("size", "augment"), [(32, "flip_crop"), (96, "flip_crop")])
def test_grouped_decode_gives_the_pixels_of_one_record_to_a_call(
    digits_dir, monkeypatch, size, augment
):
    """The same batches either way, augmented (32 px: pad and crop; 96 px:
    random resized crop of the upscaled digits) and not."""
    spec = make_spec(digits_dir, batch=32, image_size=size, augment=augment)

    def datasets():
        yield input_pipeline.train_dataset(spec, epoch=1, start_step=3)
        yield input_pipeline.eval_dataset(spec)
        yield input_pipeline.cache_source(spec, "validation", 32)

    grouped = [batches(ds) for ds in datasets()]
    monkeypatch.setattr(input_pipeline, "GROUPED_DECODE_MAX_SIZE", 0)
    for got, want in zip(grouped, [batches(ds) for ds in datasets()], strict=True):
        assert len(got) == len(want) > 5
        for a, b in zip(got, want, strict=True):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y)


_MALLOC_CHECK = """
import ctypes, json, sys
import tensorflow as tf
from tests.test_input_pipeline import make_spec
from trainer import input_pipeline

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mmapped(size):  # Whether malloc(size) gets a fresh mmap of its own.
    before = libc.mallinfo2().hblks
    p = libc.malloc(size)
    after = libc.mallinfo2().hblks
    libc.free(p)
    return after - before

# A batch of 224 px images: no free chunk of that size is likely, so malloc
# must either grow a heap or mmap.
batch = 64 * 224 * 224 * 3
if sys.argv[1] == "ours":
    ds = input_pipeline.train_dataset(make_spec(sys.argv[2], batch=64), epoch=0)
else:  # TensorFlow's own from_generator, nothing of ours.
    ds = tf.data.Dataset.from_generator(lambda: iter([1]), output_types=tf.int32)
next(iter(ds))
print(json.dumps(mmapped(batch)))
"""


@pytest.mark.slow
def test_batches_reuse_freed_memory_after_tensorflows_malloc_setting(digits_dir):
    """TensorFlow's first from_generator kernel in a process pins glibc's mmap
    threshold at 128 kB (TF 2.21), so every decoded 224 px image and every
    batch would be a fresh mmap, zeroed page by page: a sixth of the
    pipeline's CPU in page faults. Our generator sets malloc back to reuse
    freed memory when a pass starts. Each in a fresh process (TensorFlow
    makes its setting once per process, when our dataset's iterator is built,
    after the dataset itself): the premise, then ours."""

    def mmapped(*args) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _MALLOC_CHECK, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"},
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert mmapped("tf") == 1, "TensorFlow no longer pins M_MMAP_THRESHOLD"
    assert mmapped("ours", digits_dir) == 0


def test_split_info_counts_from_manifest_or_cached_count(tmp_path, digits_dir):
    data = str(tmp_path / "d")
    storage.put(digits_dir, data)
    spec = make_spec(data)
    assert input_pipeline.split_info(spec, "train")["records"] == 1438
    os.remove(os.path.join(data, "manifest.json"))
    info = input_pipeline.split_info(spec, "validation")
    assert info["records"] == 359 and len(info["shards"]) == 7
    cache_path = os.path.join(data, input_pipeline.COUNTS_CACHE)
    cache = storage.read_json(cache_path)
    assert sum(v["records"] for v in cache.values()) == 359
    # Counts still valid (sizes from the listing match): the cache is not
    # written again; a shard that changed size is read and counted again.
    written = os.stat(cache_path).st_mtime_ns
    assert input_pipeline.split_info(spec, "validation")["records"] == 359
    assert os.stat(cache_path).st_mtime_ns == written
    shard = info["shards"][0]
    with open(shard, "ab") as f:
        f.write(tfrecord.frame_record(_example()))
    assert input_pipeline.split_info(spec, "validation")["records"] == 360
    assert storage.read_json(cache_path)[os.path.basename(shard)]["records"] == (
        cache[os.path.basename(shard)]["records"] + 1
    )


def test_a_second_run_sees_data_added_since_the_first(tmp_path, digits_dir):
    """No shard list or count outlives a call: a notebook that adds data and
    trains again trains on it."""
    data = str(tmp_path / "d")
    storage.put(digits_dir, data)
    spec = make_spec(data, batch=64)
    assert input_pipeline.steps_per_epoch(spec) == 1438 // 64
    _write_shard(f"{data}/train-extra.tfrecord", [_example()] * 130)
    info = input_pipeline.split_info(spec, "train")
    assert len(info["shards"]) == 8 and info["records"] == 1438 + 130
    assert input_pipeline.steps_per_epoch(spec) == (1438 + 130) // 64
    assert len(batches(input_pipeline.train_dataset(spec, epoch=0))) == 24


# ---------------------------------------------------------------------------
# Order and exact resume


@pytest.mark.parametrize("augment", ["none", "flip_crop"])
def test_resume_at_step_equals_tail_of_uninterrupted_epoch(gcs_digits, augment):
    spec = make_spec(gcs_digits, batch=32, shuffle_buffer=300, augment=augment)
    steps = input_pipeline.steps_per_epoch(spec)
    for epoch in (0, 1):
        full = batches(input_pipeline.train_dataset(spec, epoch=epoch))
        assert len(full) == steps == 44
        # 9 is mid-window (300 records), 10 crosses a window, 23 is mid-shard.
        for start in (1, 9, 10, 23, steps - 1, steps):
            tail = batches(
                input_pipeline.train_dataset(spec, epoch=epoch, start_step=start)
            )
            assert len(tail) == steps - start
            for got, want in zip(tail, full[start:], strict=True):
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])
    other = batches(input_pipeline.train_dataset(spec, epoch=2))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(other, full, strict=True))


def test_augmentation_changes_images_but_not_labels(digits_dir):
    plain = batches(input_pipeline.train_dataset(make_spec(digits_dir), epoch=0))
    spec = make_spec(digits_dir, augment="flip_crop")
    aug = batches(input_pipeline.train_dataset(spec, epoch=0))
    np.testing.assert_array_equal(plain[0][1], aug[0][1])
    assert not np.array_equal(plain[0][0], aug[0][0])
    val = batches(input_pipeline.eval_dataset(spec))
    val_plain = batches(input_pipeline.eval_dataset(make_spec(digits_dir)))
    np.testing.assert_array_equal(val[0][0], val_plain[0][0])  # never augmented


def test_binary_labels_for_one_class(tmp_path):
    data = str(tmp_path)
    records = [_example(label=i % 2) for i in range(40)]
    _write_shard(f"{data}/train-00000-of-00001.tfrecord", records)
    _write_shard(f"{data}/validation-00000-of-00001.tfrecord", records[:10])
    spec = make_spec(data, batch=8, num_classes=1)
    labels = np.concatenate(
        [b[1] for b in batches(input_pipeline.train_dataset(spec, epoch=0))]
    )
    assert sorted(set(labels)) == [0, 1] and len(labels) == 40


# ---------------------------------------------------------------------------
# Distribution


def _context(workers, worker, replicas_per_worker=1):
    return tf.distribute.InputContext(
        num_input_pipelines=workers,
        input_pipeline_id=worker,
        num_replicas_in_sync=workers * replicas_per_worker,
    )


def test_each_worker_keeps_its_slice_of_the_one_worker_batches(digits_dir):
    """Step s trains on the same records whatever the number of workers, and
    the replicas of a worker take consecutive parts of its slice."""
    spec = make_spec(digits_dir, batch=32)
    one = stream_ids(spec, 0).reshape(-1, 32)
    for workers, local in ((2, 1), (4, 1), (2, 2)):
        ids = [stream_ids(spec, 0, _context(workers, w, local)) for w in range(workers)]
        slices = [i.reshape(len(one), -1) for i in ids]
        assert np.array_equal(np.concatenate(slices, axis=1), one), (workers, local)
    steps = input_pipeline.steps_per_epoch(spec)
    for w in range(2):
        ds = input_pipeline.train_dataset(
            spec, epoch=0, start_step=3, input_context=_context(2, w)
        )
        got = batches(ds)
        assert len(got) == steps - 3 and got[0][0].shape == (16, 32, 32, 3)


def test_fewer_validation_shards_than_workers_falls_back_to_records(tmp_path, caplog):
    data = str(tmp_path)
    _write_shard(f"{data}/train-00000-of-00001.tfrecord", [_example()] * 12)
    _write_shard(f"{data}/validation-00000-of-00001.tfrecord", [_example()] * 5)
    spec = make_spec(data, batch=12)
    counts, weight = [], 0.0
    with caplog.at_level(logging.WARNING):
        for w in range(3):  # 3 workers x 2 replicas: per-replica eval batch 2
            got = batches(
                input_pipeline.eval_dataset(spec, input_context=_context(3, w, 2))
            )
            counts.append(len(got))
            assert all(b[0].shape == (2, 32, 32, 3) for b in got)
            weight += sum(b[2].sum() for b in got)
    assert "1 shards for 3 workers" in caplog.text
    assert len(set(counts)) == 1 and weight == 5


# ---------------------------------------------------------------------------
# Bad input


def _example(label=3, image=None, keys=None) -> bytes:
    if image is None:
        image = convert._encode_png(np.full((32, 32, 3), 7, np.uint8))
    ex = convert.make_example(image, label, height=32, width=32, fmt=b"png", text="x")
    if keys is not None:
        parsed = tf.train.Example.FromString(ex)
        for k in list(parsed.features.feature):
            if k not in keys:
                del parsed.features.feature[k]
        ex = parsed.SerializeToString()
    return ex


def _write_shard(url: str, records: list[bytes]) -> None:
    storage.write_bytes(url, b"".join(tfrecord.frame_record(r) for r in records))


def _bad_dir(tmp_path, bad_record: bytes | None = None, raw: bytes | None = None):
    data = str(tmp_path)
    good = [_example(label=i % 10) for i in range(20)]
    blob = b"".join(tfrecord.frame_record(r) for r in good)
    if bad_record is not None:
        blob += tfrecord.frame_record(bad_record)
    if raw is not None:
        blob = raw
    storage.write_bytes(f"{data}/train-00000-of-00001.tfrecord", blob)
    _write_shard(f"{data}/validation-00000-of-00001.tfrecord", good[:4])
    return data


def _consume(spec):
    _drain(input_pipeline.train_dataset(spec, epoch=0))


def _drain(ds):
    try:
        batches(ds)
    except tf.errors.OpError as e:
        input_pipeline.reraise_data_error(e)


@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
def test_a_shard_emptied_since_it_was_counted(on_corrupt, digits_dir, tmp_path):
    """The manifest promises records the shard no longer holds. With "skip"
    too the reader's error stops the pass: only a record's decode is
    skipped, never the reader's failures (the pass would end early, silently)."""
    data = str(tmp_path / "d")
    storage.put(digits_dir, data)
    for shard in storage.glob(f"{data}/train-*.tfrecord"):
        storage.write_bytes(shard, b"")
    spec = make_spec(data, batch=8, on_corrupt=on_corrupt)
    with pytest.raises(
        DataError, match=r"no readable training records, though the shards' counts "
        r"\(manifest.json, or the counts cache\) promise 1438"
    ):  # fmt: skip
        _consume(spec)


def test_glob_matching_nothing_names_the_glob(tmp_path):
    spec = make_spec(str(tmp_path / "nothing"))
    with pytest.raises(
        FileNotFoundError, match=r"no TFRecord shards match .*nothing/train-\*"
    ):
        input_pipeline.train_dataset(spec, epoch=0)


def test_shard_deleted_after_listing(gcs_digits):
    spec = make_spec(gcs_digits)
    ds = input_pipeline.train_dataset(spec, epoch=0)  # Lists the shards now.
    storage.rm(storage.join(gcs_digits, "train-00003-of-00007.tfrecord"))
    with pytest.raises(
        DataError, match=r"train-00003-of-00007.tfrecord: shard not found"
    ):
        _drain(ds)


def test_truncated_shard(tmp_path):
    good = b"".join(tfrecord.frame_record(_example()) for _ in range(20))
    data = _bad_dir(tmp_path, raw=good[:-100])
    with pytest.raises(
        DataError,
        match=r"train-00000-of-00001.tfrecord: truncated shard: record 19 at byte offset \d+",
    ):
        _consume(make_spec(data, batch=4))


def test_crc_mismatch(tmp_path):
    frame = tfrecord.frame_record(_example())
    blob = bytearray(frame * 20)
    blob[9 * len(frame) + 12 + 40] ^= 0xFF  # inside record 9's data
    data = _bad_dir(tmp_path, raw=bytes(blob))
    with pytest.raises(
        DataError,
        match=r"tfrecord: CRC mismatch in record 9 at byte offset \d+; re-create",
    ):
        _consume(make_spec(data, batch=4))


@pytest.mark.parametrize(
    "record, message",
    [
        (b"\xff not a proto \x00", r"record 20 is not a serialized tf.train.Example"),
        (
            _example(keys=["image/encoded"]),
            r"record 20 has no int64 feature 'image/class/label'",
        ),
        (_example(image=b"hello"), r"record 20 holds image bytes that are not JPEG"),
        (_example(label=10), r"record 20 has label 10 .* outside \[0, 10\)"),
    ],
    # Serialized protos order their map fields differently in each process:
    # stable ids let pytest-xdist's workers agree on the collected tests.
    ids=["not_a_proto", "no_label", "not_an_image", "label_out_of_range"],
)
def test_bad_record_is_named(tmp_path, record, message):
    data = _bad_dir(tmp_path, bad_record=record)
    with pytest.raises(DataError, match=r"train-00000-of-00001.tfrecord: " + message):
        _consume(make_spec(data, batch=7))


def test_skip_drops_and_counts_corrupt_records(tmp_path):
    data = _bad_dir(tmp_path, bad_record=_example(label=99))
    spec = make_spec(data, batch=7, on_corrupt="skip")
    tally = input_pipeline.CorruptTally()
    for epoch in (0, 1):  # Each pass counts the bad record once.
        got = batches(input_pipeline.train_dataset(spec, epoch=epoch, tally=tally))
        assert len(got) == 21 // 7
    batches(input_pipeline.eval_dataset(spec, tally=tally, pass_key=0))
    # The tally goes through a checkpoint (JSON) and keeps counting exactly.
    resumed = input_pipeline.CorruptTally(json.loads(json.dumps(tally.entries())))
    batches(input_pipeline.train_dataset(spec, epoch=1, tally=resumed))
    assert resumed.summary()["train"] == {
        "skipped": 2,
        "records": 1,
        "reasons": {"bad_label": 2},
    }


# ---------------------------------------------------------------------------
# Memory


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_memory_is_bounded_while_streaming_a_large_shard(tmp_path, read_ahead):
    block = 256 * 1024
    record = os.urandom(8 * 1024)
    url = str(tmp_path / "big.tfrecord")
    with open(url, "wb") as f:
        for _ in range(3000):  # ~24 MB, ~100 blocks
            f.write(tfrecord.frame_record(record))
    stats = tfrecord.ReadStats()
    tracemalloc.start()
    try:
        frames = tfrecord.iter_shard(
            url, block_size=block, stats=stats, read_ahead=read_ahead
        )
        n = sum(1 for _ in frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 3000
    assert block <= stats.max_buffer_bytes <= block + len(record) + 16
    # Buffers of 1.25 blocks: the one being framed and `read_ahead` more.
    assert peak < 1.25 * block * (read_ahead + 1) + 1024 * 1024, peak


class _FlakyFS(fsspec.implementations.memory.MemoryFileSystem):
    """`flaky://`: an in-memory store whose next `failures` reads reset."""

    protocol = "flaky"
    failures = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("flaky://", "memory://", 1))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "r" in mode:  # Both ways of reading (the reader uses readinto).
            f.read, f.readinto = _flaky(f.read), _flaky(f.readinto)
        return f


def _flaky(read):
    def flaky_read(*args):
        if _FlakyFS.failures > 0:
            _FlakyFS.failures -= 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return read(*args)

    return flaky_read


def test_transient_errors_are_retried(caplog):
    fsspec.register_implementation("flaky", _FlakyFS, clobber=True)
    records = [_example(label=i) for i in range(10)]
    _write_shard("flaky://retry/a.tfrecord", records)
    _FlakyFS.failures = 2
    with caplog.at_level(logging.WARNING):
        got = list(tfrecord.read_records("flaky://retry/a.tfrecord"))
    assert got == records and _FlakyFS.failures == 0
    assert caplog.text.count("transient error reading flaky://retry/a.tfrecord") == 2


def test_shard_replaced_mid_read(gcs_server, gcs_bucket):
    """gs:// reads after the first ask for the generation it saw: a shard
    rewritten mid-read (even with the same bytes) is not spliced."""
    url = storage.join(gcs_bucket, "train-00000-of-00001.tfrecord")
    records = [_example(label=i % 10) for i in range(200)]  # ~100 kB
    _write_shard(url, records)
    reader = tfrecord.iter_shard(url, block_size=4096)
    next(reader)
    _write_shard(url, records)
    with pytest.raises(DataError, match=r"byte offset 4096 \(it was deleted, moved or"):
        list(reader)
    assert list(tfrecord.read_records(url)) == records  # A fresh read is fine.


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_blocks_are_read_into_reused_buffers(tmp_path, read_ahead):
    """No fresh block-sized object per block (each would be new pages from
    the OS): blocks go into `read_ahead` + 1 buffers, used in turn; a record
    longer than the room in front of a block is gathered in one of its own."""
    url = str(tmp_path / "s.tfrecord")
    records = [os.urandom(1000) for _ in range(200)] + [os.urandom(50_000)]
    _write_shard(url, records + records[:10])
    frames = tfrecord._Frames(url, 8192, None, read_ahead)
    buffers, got = set(), []
    while frames.next(len(got), check_length=True):  # As iter_shard reads.
        got.extend(data for _, data in frames.whole(len(got), 0, True, None))
        buffers.add(id(frames._buf))
    frames.close()
    assert got == records + records[:10]
    assert len(buffers) == read_ahead + 2  # And one for the long record.


class _CountingFS(fsspec.implementations.memory.MemoryFileSystem):
    """`counting://`: an in-memory store that counts the block reads."""

    protocol = "counting"
    reads = 0
    threads: set[str] = set()  # The names of the threads that read.

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("counting://", "memory://", 1))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "r" in mode:
            f.readinto = _counted(f.readinto)
        return f


def _counted(readinto):
    def counted_readinto(buf):
        _CountingFS.reads += 1
        _CountingFS.threads.add(threading.current_thread().name)
        return readinto(buf)

    return counted_readinto


def _read_ahead_threads() -> int:
    names = [t.name for t in threading.enumerate()]
    return names.count(tfrecord.READ_AHEAD_THREAD)


def _until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_read_ahead_reads_from_the_call_on_and_ends_with_the_reader():
    """A shard's blocks are read by a thread before the records are asked
    for, `read_ahead` blocks ahead (plus the one the consumer holds), and the
    thread ends at the shard's end, when the reader is closed or dropped, and
    when the pass's `stop` is set."""
    fsspec.register_implementation("counting", _CountingFS, clobber=True)
    url = "counting://ahead/a.tfrecord"
    datas = [os.urandom(1000) for _ in range(100)]  # ~100 kB: 25 blocks of 4 kB
    _write_shard(url, datas)
    assert _until(lambda: _read_ahead_threads() == 0)
    _CountingFS.reads = 0
    reader = tfrecord.iter_shard(url, block_size=4096, read_ahead=2)
    assert _until(lambda: _CountingFS.reads == 3)
    time.sleep(0.2)
    assert _CountingFS.reads == 3  # Waits for the consumer to free a buffer.
    assert [data for _, data in reader] == datas
    assert _until(lambda: _read_ahead_threads() == 0)  # Ended at the shard's end.

    for end in ("close", "drop", "stop"):
        stop = threading.Event()
        reader = tfrecord.iter_shard(url, block_size=4096, read_ahead=2, stop=stop)
        assert next(reader) == (0, datas[0]) and _read_ahead_threads() == 1
        if end == "close":
            reader.close()
        elif end == "drop":
            del reader
        else:
            stop.set()
        assert _until(lambda: _read_ahead_threads() == 0), end


def test_shard_readers_only_read_and_the_consumer_frames_and_checks():
    """Per-shard threads do the I/O; framing, CRCs and record checks run in
    the stream's consumer thread (threads that framed fought for the GIL)."""
    fsspec.register_implementation("counting", _CountingFS, clobber=True)
    urls = [f"counting://split/train-{s:05d}-of-00006.tfrecord" for s in range(6)]
    counts = [10 + 300 * s for s in range(6)]  # Up to 120 blocks of 4 kB.
    for url, n in zip(urls, counts, strict=True):
        _write_shard(url, [_example(label=i % 10) for i in range(n)])
    spec = make_spec("counting://split")
    checked = set()

    class Checker(records._Checker):
        def check(self, data):
            checked.add(threading.current_thread().name)
            return super().check(data)

    def stream():
        return records._stream(
            urls,
            counts,
            list(range(6)),
            0,
            reading=records._Reading(Checker(spec), "error", block_size=4096),
            # Above the interleave cycle of 4: shards 4 and 5 are launched
            # with the first group, their reads ahead before they are framed.
            parallelism=6,
            stop=threading.Event(),
        )

    assert _until(lambda: _read_ahead_threads() == 0)
    _CountingFS.threads = set()
    assert sum(len(datas) for datas, _ in stream()) == sum(counts)
    assert checked == {threading.current_thread().name}
    assert _CountingFS.threads == {tfrecord.READ_AHEAD_THREAD}
    assert _until(lambda: _read_ahead_threads() == 0)
    # Stopped early: the readers of shards not finished end too, those of
    # shards launched but not yet framed (their generators never started) too.
    it = stream()
    next(it)
    # Shards 1 to 5 (shard 0, one block, may be read to its end already).
    assert _read_ahead_threads() >= 5
    it.close()
    assert _until(lambda: _read_ahead_threads() == 0)


def test_shard_deleted_mid_read(gcs_server, gcs_bucket):
    url = storage.join(gcs_bucket, "train-00000-of-00001.tfrecord")
    _write_shard(url, [_example(label=i % 10) for i in range(200)])  # ~100 kB
    reader = tfrecord.iter_shard(url, block_size=4096)
    next(reader)
    storage.rm(url)
    with pytest.raises(
        DataError, match=r"tfrecord: shard not found at byte offset 4096"
    ):
        list(reader)


@pytest.mark.parametrize("shuffle_buffer, workers", [(0, 1), (7, 1), (20, 1), (5, 8)])
def test_every_start_record_on_uneven_shards(tmp_path, shuffle_buffer, workers):
    """Round robin over shards of unequal length, resumed at every record.

    With 8 workers (a global batch of 8), worker 3 keeps every 8th record of
    the one-worker stream, from any start.
    """
    data = str(tmp_path)
    sizes = [3, 17, 1, 9, 30, 4]  # in groups of 4 (after the epoch's shard shuffle)
    for s, n in enumerate(sizes):
        name = f"train-{s:05d}-of-{len(sizes):05d}.tfrecord"
        _write_shard(f"{data}/{name}", [_example(label=i % 10) for i in range(n)])
    _write_shard(f"{data}/validation-00000-of-00001.tfrecord", [_example()])
    spec = make_spec(data, batch=workers, shuffle_buffer=shuffle_buffer)
    mine = 3 if workers > 1 else 0
    ctx = _context(workers, mine) if workers > 1 else None
    total = sum(sizes)  # 64: whole global batches
    info = input_pipeline.split_info(spec, "train")

    def ids_from(start, context, n):
        out = []
        for _, _, ids in input_pipeline._train_records(spec, info, 5, start, context)():
            out.extend(ids.tolist())
            if len(out) >= n:
                break
        return out[:n]

    one = ids_from(0, None, total)
    every = sorted((s << 32) + i for s, n in enumerate(sizes) for i in range(n))
    assert sorted(one) == every
    for start in range(total):
        kept = [one[p] for p in range(start, total) if p % workers == mine]
        assert ids_from(start, ctx, len(kept)) == kept, start


def test_undecodable_image_bytes(tmp_path):
    bad = _example(image=b"\xff\xd8\xff\xe0 truncated jpeg")
    data = _bad_dir(tmp_path, bad_record=bad)
    reason = r"image bytes could not be decoded \(jpeg::Uncompress failed\. Invalid"
    with pytest.raises(DataError, match=reason):
        _consume(make_spec(data, batch=7))
    # Taken inside a tf.function, as the train step takes its batches: TF's
    # message starts "Graph execution error:", and the decoder's words are
    # still the ones shown.
    batches_of = iter(input_pipeline.train_dataset(make_spec(data, batch=7), epoch=0))

    @tf.function
    def three_steps():
        for _ in tf.range(3):
            next(batches_of)

    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        three_steps()
    assert caught.value.message.startswith("Graph execution error")
    with pytest.raises(DataError, match=reason):
        input_pipeline.reraise_data_error(caught.value)
    spec = make_spec(data, batch=7, on_corrupt="skip")
    tally = input_pipeline.CorruptTally()
    assert len(batches(input_pipeline.train_dataset(spec, epoch=0, tally=tally))) == 3
    assert tally.summary()["train"]["reasons"] == {"undecodable": 1}

"""The tf.data stages: decode, resize, augment, batch and pad the reader's records.

The records come from `records` (shard listing and counts, record checks, the
threaded shard readers, the epoch's order, per-worker slices; no TensorFlow),
whose public names are re-exported here. Image bytes, labels and record ids
cross into tf.data as 1-D tensors of up to CHUNK_RECORDS records (one Python
call per chunk, not per record), buffered PREFETCH_CHUNKS ahead so the decode
never waits on Python; decoding, resizing and augmentation run in tf.data
with AUTOTUNE parallelism (deterministic) and prefetch. Augmentation
is stateless, seeded by (seed, epoch, record id), so a resumed run sees the
same images. `np_input` computes the same batches without TensorFlow.

Errors raised in the reader reach the consumer as tf.errors.OpError; the train
loop recovers the DataError with `data_error_from(e)` / `reraise_data_error(e)`.
"""

from __future__ import annotations

import ctypes
import functools
import re

import numpy as np

from trainer import backend, tfrecord
from trainer.errors import DataError, NotFound, PermissionDenied, StorageError

# Re-exported for callers of input_pipeline: the reader's public names, and
# the internals that tests and benchmarks/input_pipeline.py reach into.
from trainer.records import (  # noqa: F401
    CHUNK_RECORDS,
    COUNTS_CACHE,
    CorruptTally,
    _eval_records,
    _eval_stream,
    _parallelism,
    _Reading,
    _reading,
    _stream,
    _train_records,
    _train_stream,
    _worker_share,
    check_class_count,
    list_shards,
    phase_steps,
    split_info,
    steps_per_epoch,
    with_class_names,
)

# None without TensorFlow (the JAX backend on a TPU runtime): the reader
# (trainer.records) needs none; the tf.data stages here do.
tf = backend.import_tensorflow_or_none()
PREFETCH_CHUNKS = 2  # Chunks buffered in tf.data between the reader and decode.
# Up to this image_size, records are decoded DECODE_GROUP to a tf.data call
# (`_decode_stage`). Measured on 2 cores (benchmarks/decode_stage.py, three
# runs of 5 interleaved rounds, their medians), images/s grouped x one to a
# call: 1.39-1.46 at 32 px (PNG), 1.38-1.42 at 64, 1.14-1.20 at 96, 1.08-1.12
# at 128 (JPEG); above, small (1.03-1.07 at 160, 1.02-1.06 at 192) and then
# below (0.95-0.98 at 224, JPEG and PNG).
GROUPED_DECODE_MAX_SIZE = 128
DECODE_GROUP = 64
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters (malloc.h).


# ---------------------------------------------------------------------------
# Errors raised in the reader, as tf.data hands them on


def data_error_from(e: BaseException) -> DataError | StorageError | None:
    """The DataError behind a tf.data error (raised inside the reader), if any.

    Errors raised in a `from_generator` reach the consumer as
    `tf.errors.InvalidArgumentError` (or `UnknownError`) whose message holds the
    Python exception; decode failures in tf.data come as InvalidArgumentError.

    Args:
      e: the error the consumer caught.

    Returns:
      The DataError (or StorageError) to raise instead, else None.
    """
    if isinstance(e, (DataError, StorageError)):
        return e
    message = getattr(e, "message", None) or str(e)
    match = re.search(
        r"(DataError|NotFound|PermissionDenied): (.*?)(?:\nTraceback|\n\n|$)",
        message,
        re.S,
    )
    if match:
        kind = {"NotFound": NotFound, "PermissionDenied": PermissionDenied}
        return kind.get(match.group(1), DataError)(match.group(2).strip())
    if isinstance(e, tf.errors.InvalidArgumentError) and re.search(
        r"decode|image|Unknown image file format", message, re.I
    ):
        return DataError(
            f"a record's image bytes could not be decoded ({_decoder_words(message)}); "
            f"{tfrecord.REMEDY}"
        )
    return None


def _decoder_words(message: str) -> str:
    """The decode op's own reason in a tf.data error message, without TF's
    framing: e.g. "jpeg::Uncompress failed. Invalid JPEG data or crop window."
    from a message that starts "Graph execution error:" when the batch was
    taken inside the train step's tf.function."""
    for line in message.splitlines():
        line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line.strip())
        line = re.sub(
            r"^Error in user-defined function .*? with iterator: \S+: ", "", line
        )
        framing = ("Graph execution error", "Detected at node", "<stack", "[[")
        if line and not line.startswith(framing):
            return line
    return message.strip()


def reraise_data_error(e: BaseException) -> None:
    """Raises the DataError behind `e` (see `data_error_from`), else `e` itself.

    Use in the train loop:  `except tf.errors.OpError as e: reraise_data_error(e)`.

    Args:
      e: the error the consumer caught.
    """
    err = data_error_from(e)
    if err is not None:
        raise err from None
    raise e


# ---------------------------------------------------------------------------
# tf.data stages


def _to_uint8(image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _resize(image, size: int):
    shape = tf.shape(image)
    return tf.cond(
        tf.logical_and(shape[0] == size, shape[1] == size),
        lambda: image,
        lambda: _to_uint8(tf.image.resize(image, [size, size])),
    )


def decode_for_model(image_bytes, size: int):
    """One image's encoded bytes to the (size, size, 3) uint8 pixels training sees.

    The unaugmented path of `_decode_fn` (validation, and every phase without
    augmentation); the serving export and `trainer predict` use it too, so a
    served image is resized exactly as the training images were.
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return tf.ensure_shape(_resize(image, size), [size, size, 3])


def _decode_fn(spec, *, epoch: int | None):
    """Decode, resize and (when `epoch` is given) augment one record."""
    size = spec.data.image_size
    mode = spec.data.augment if epoch is not None else "none"
    base = None
    if epoch is not None:
        base = (spec.train.seed * 1_000_003 + epoch) % (2**62)

    def decode(image_bytes, label, rid):
        if mode == "none":
            return decode_for_model(image_bytes, size), label
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        seed = tf.stack([tf.constant(base, tf.int64), rid])
        seeds = tf.random.experimental.stateless_split(seed, num=2)
        if mode in ("crop", "flip_crop"):
            image = _random_crop(image, size, seeds[0])
        else:
            image = _resize(image, size)
        if mode in ("flip", "flip_crop"):
            image = tf.image.stateless_random_flip_left_right(image, seeds[1])
        return tf.ensure_shape(image, [size, size, 3]), label

    return decode


def _random_crop(image, size: int, seed):
    """Small images: pad by size/8 and crop; larger: random resized crop."""
    if size <= 64:
        image = _resize(image, size)
        pad = max(1, size // 8)
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        return tf.image.stateless_random_crop(padded, [size, size, 3], seed)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.25, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, extent)
    return _to_uint8(tf.image.resize(crop, [size, size]))


@functools.cache
def _mallopt():
    """glibc's `mallopt`, or None (macOS, musl: their own malloc rules)."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def _keep_freed_memory() -> None:
    """Tells glibc's malloc to keep freed memory for reuse.

    Must run after TensorFlow's own setting, which the first `from_generator`
    kernel of the process makes (`ApplyPython311MemoryPatch`, TF 2.21: its
    log line says M_TRIM_THRESHOLD, its call sets M_MMAP_THRESHOLD to 128 kB,
    which also turns off glibc's adaptive threshold). Under it every buffer of
    128 kB or more is a fresh mmap, zeroed by the kernel page by page and
    unmapped when freed: each decoded 224 px image (150 kB) and each batch
    (64 of them). That cost 21 minor page faults per image (about 5 with this
    setting) and a sixth of the process's CPU in the kernel. Hence the call
    from inside the generator (`_after_tf_malloc_setting`), as a pass starts.

    The values are those glibc's adaptive rule reaches once it has freed one
    32 MB block (mmap threshold 32 MB, trim threshold twice that), set from
    the start; memory is still given back above them.
    """
    mallopt = _mallopt()
    if mallopt is not None:
        mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)
        mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)


def _after_tf_malloc_setting(gen):
    """`gen` (a generator factory) that first calls `_keep_freed_memory`.

    A from_generator's generator runs after its kernel was built, so after
    TensorFlow's malloc setting (see `_keep_freed_memory`).
    """

    def chunks():
        _keep_freed_memory()
        yield from gen()

    return chunks


def _records_dataset(gen) -> tf.data.Dataset:
    """The reader's chunks as a dataset, buffered PREFETCH_CHUNKS ahead.

    The buffer is what keeps decoding on every core. Without it the parallel
    decode's one dispatching thread calls into Python for each next chunk and
    waits there for the GIL, which the reader's threads hold in turns (5 ms
    switch interval, longer when the OS deschedules the holder on a busy
    machine); the decodes already dispatched finish and the cores idle. Behind
    the buffer, a tf.data thread of its own does that waiting ahead of time.
    """
    return tf.data.Dataset.from_generator(
        _after_tf_malloc_setting(gen),
        output_signature=(
            tf.TensorSpec([None], tf.string),  # image bytes
            tf.TensorSpec([None], tf.int32),  # 0-based labels
            tf.TensorSpec([None], tf.int64),  # record ids (augmentation seeds)
        ),
    ).prefetch(PREFETCH_CHUNKS)


def _decoded(spec, records: tf.data.Dataset, epoch: int | None) -> tf.data.Dataset:
    """(image, label) elements of the reader's chunks (see `_decode_stage`)."""
    return _decode_stage(spec, records, _decode_fn(spec, epoch=epoch), ids=False)


def _decode_stage(spec, records: tf.data.Dataset, decode, *, ids: bool):
    """(pixels, label[, record id]) elements: each record of the reader's
    chunks through `decode(image, label, rid) -> (pixels, label)`, in
    parallel, in order.

    The reader already parsed each tf.train.Example (to check it and name the
    record when it is bad), so image bytes and labels arrive here. Images up
    to GROUPED_DECODE_MAX_SIZE are decoded DECODE_GROUP records to a tf.data
    call (`tf.map_fn` inside it): a call costs about what a small image's
    decode does, so one per record spent a quarter of the 32 px pipeline's
    CPU on calls. Larger images are decoded one to a call, where a group's
    extra copies (its stacked output) would cost more than the calls it
    saves (benchmarks/decode_stage.py measures both). The pixels are the same.
    With data.on_corrupt = "skip", see `_decode_skipping`.
    """
    size = spec.data.image_size
    one = (
        (lambda image, label, rid: (*decode(image, label, rid), rid)) if ids else decode
    )
    if spec.data.on_corrupt == "skip":
        return _decode_skipping(records, one)
    if size > GROUPED_DECODE_MAX_SIZE:
        return records.unbatch().map(
            one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    pixels = tf.TensorSpec([size, size, 3], tf.uint8)

    def group(images, labels, rids):
        decoded = tf.map_fn(
            lambda record: decode(*record)[0],
            (images, labels, rids),
            fn_output_signature=pixels,
        )
        return (decoded, labels, rids) if ids else (decoded, labels)

    ds = records.unbatch().batch(DECODE_GROUP)
    ds = ds.map(group, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.unbatch()


def _decode_skipping(records: tf.data.Dataset, one) -> tf.data.Dataset:
    """`one` per record, dropping (with a logged warning) the records whose
    bytes pass the reader's checks yet fail to decode (Pillow accepts them,
    TF does not). Each group of DECODE_GROUP records is a dataset of its own
    inside `ignore_errors`, decoded one record to an element: around the
    whole stream, `ignore_errors` would also swallow the reader's errors (a
    shard gone, a store refusing reads) and end the pass early and silently.
    In order, in parallel (a group to a thread)."""

    def group(*fields):
        alone = tf.data.Dataset.from_tensor_slices(fields).map(lambda *f: one(*f))
        return alone.ignore_errors(log_warning=True)

    # A group's records leave its dataset before the next group's (the block
    # holds a whole group): the stream's order.
    return (
        records.unbatch()
        .batch(DECODE_GROUP)
        .interleave(
            group,
            block_length=DECODE_GROUP,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    )


def train_dataset(
    spec,
    *,
    epoch: int,
    start_step: int = 0,
    input_context: tf.distribute.InputContext | None = None,
    tally: CorruptTally | None = None,
) -> tf.data.Dataset:
    """One epoch of training batches from `start_step` on.

    Lists the training shards (and reads their counts) now: the dataset reads
    the data as it was when this was called.

    Args:
      spec: the JobSpec.
      epoch: the global epoch counter (unique across phases); with
        `train.seed` it fixes the order and the augmentation.
      start_step: the global step within the epoch to start at.
      input_context: from `strategy.distribute_datasets_from_function`.
      tally: where records skipped as corrupt are counted (pass: `epoch`).

    Returns:
      (images uint8 [B, S, S, 3], labels int32 [B]) batches, B the per-replica
      batch, exactly (steps_per_epoch - start_step) * replicas-on-this-worker
      of them (that is steps_per_epoch - start_step without an input context).
    """
    gen, batch, batches = _train_stream(spec, epoch, start_step, input_context, tally)
    ds = _decoded(spec, _records_dataset(gen), epoch)
    ds = ds.batch(batch, drop_remainder=True).take(batches)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(
    spec,
    *,
    input_context: tf.distribute.InputContext | None = None,
    tally: CorruptTally | None = None,
    pass_key: int = 0,
) -> tf.data.Dataset:
    """The validation split: (images uint8, labels int32, weights float32) batches.

    Not augmented, in a fixed order. Every batch has the same shape: the last
    is padded with zero images of weight 0.0, and every worker yields the same
    number of batches.

    Args:
      spec: the JobSpec.
      input_context: from `strategy.distribute_datasets_from_function`.
      tally: where records skipped as corrupt are counted.
      pass_key: the pass they are counted under (the run's epoch counter: one
        validation pass each).

    Returns:
      The batches of this worker, B the per-replica eval batch.
    """
    gen, batch, batches = _eval_stream(spec, input_context, tally, pass_key)
    ds = _decoded(spec, _records_dataset(gen), None).batch(batch)
    size = spec.data.image_size
    ds = _padded(ds, batch, tf.TensorSpec([size, size, 3], tf.uint8))
    return ds.take(batches).prefetch(tf.data.AUTOTUNE)


def _padded(ds: tf.data.Dataset, batch: int, item: tf.TensorSpec) -> tf.data.Dataset:
    """Weighted batches of `batch`, then zero batches of weight 0.0 forever.

    `item` is the shape and dtype of one example (an image, or its features).
    """
    # Padding whole batches, not records: a concatenate right behind the
    # parallel decode makes op determinism rewrite that decode into a
    # sequential MapDataset (one core, and an "E0000 NodeDef mentions
    # attribute use_unbounded_threadpool" line on stderr).
    zeros = tf.data.Dataset.from_tensors(
        (
            tf.zeros([batch, *item.shape], item.dtype),
            tf.zeros([batch], tf.int32),
            tf.zeros([batch], tf.float32),
        )
    ).repeat()
    return ds.map(functools.partial(_pad_batch, batch=batch)).concatenate(zeros)


def _pad_batch(images, labels, *, batch: int):
    """Weights 1.0 for a batch's examples; a short last batch is padded to
    `batch` with zero images of weight 0.0."""
    missing = batch - tf.shape(labels)[0]
    images = tf.pad(images, [[0, missing]] + [[0, 0]] * (images.shape.rank - 1))
    weights = tf.pad(tf.ones_like(labels, tf.float32), [[0, missing]])
    labels = tf.pad(labels, [[0, missing]])
    return (
        tf.ensure_shape(images, [batch, *images.shape[1:]]),
        tf.ensure_shape(labels, [batch]),
        tf.ensure_shape(weights, [batch]),
    )


# ---------------------------------------------------------------------------
# Cached backbone features (feature_cache.py): the same records in the same
# order as above, with their backbone features in place of the images


def cache_source(spec, split: str, batch: int) -> tf.data.Dataset:
    """Every record of `split` once, in shard order, decoded without augmentation.

    Batches of (images uint8, labels int32, record ids int64), all of `batch`
    records (one traced shape): the last one is padded with record id -1.
    Records the reader skips as corrupt are left out: the passes that read
    the cached features skip (and count) them again, as uncached ones do.
    """
    info = split_info(spec, split)
    share = _worker_share(info, np.arange(len(info["shards"])), 1, 0)
    gen = functools.partial(_eval_records, share, _reading(spec), _parallelism(spec))
    ds = _decode_stage(
        spec, _records_dataset(gen), _decode_fn(spec, epoch=None), ids=True
    )
    ds = ds.batch(batch).map(functools.partial(_pad_ids, batch=batch))
    return ds.prefetch(tf.data.AUTOTUNE)


def _pad_ids(images, labels, ids, *, batch: int):
    """A short batch padded to `batch` records: zero images, record id -1."""
    missing = batch - tf.shape(ids)[0]
    return (
        tf.ensure_shape(
            tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]]),
            [batch, *images.shape[1:]],
        ),
        tf.ensure_shape(tf.pad(labels, [[0, missing]]), [batch]),
        tf.ensure_shape(tf.pad(ids, [[0, missing]], constant_values=-1), [batch]),
    )


def feature_train_dataset(
    spec, features, *, epoch: int, start_step: int = 0, input_context=None, tally=None
) -> tf.data.Dataset:
    """`train_dataset` on cached features: the same records in the same order.

    Args:
      spec, epoch, start_step, input_context, tally: as for `train_dataset`.
      features: the split's cached features (`feature_cache.Features`).

    Returns:
      (features [B, ...], labels int32 [B]) batches, as many as `train_dataset`.
    """
    gen, batch, batches = _train_stream(spec, epoch, start_step, input_context, tally)
    ds = _features_dataset(gen, features, batch, drop_remainder=True)
    return ds.take(batches).prefetch(tf.data.AUTOTUNE)


def feature_eval_dataset(
    spec, features, *, input_context=None, tally=None, pass_key: int = 0
) -> tf.data.Dataset:
    """`eval_dataset` on cached features: (features, labels, weights) batches."""
    gen, batch, batches = _eval_stream(spec, input_context, tally, pass_key)
    ds = _features_dataset(gen, features, batch, drop_remainder=False)
    ds = _padded(ds, batch, tf.TensorSpec(features.shape, features.dtype))
    return ds.take(batches).prefetch(tf.data.AUTOTUNE)


def _features_dataset(gen, features, batch: int, *, drop_remainder: bool):
    """Batches of the cached features of the reader's records, in its order.

    The reader still reads and checks the records (cheap next to decoding
    and the backbone), which keeps the order, the skips and their tally
    exactly those of the uncached path. A record missing from the cache
    (its image failed to decode when the cache was built, with
    data.on_corrupt = "skip") is dropped, as `_decoded` drops it. Batches
    are gathered here, in one copy per record: large feature maps (7x7x2048
    at 224 px) through tf.data's unbatch and batch cost more than the head.
    """

    def batches():
        rows: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        have = 0
        for _, chunk_labels, ids in gen():
            found_rows, found = features.rows(ids)
            rows.append(found_rows[found])
            labels.append(chunk_labels[found])
            have += int(found.sum())
            while have >= batch:
                rs, ls = np.concatenate(rows), np.concatenate(labels)
                yield features.values[rs[:batch]], ls[:batch]
                rows, labels, have = [rs[batch:]], [ls[batch:]], have - batch
        if have and not drop_remainder:
            yield features.values[np.concatenate(rows)], np.concatenate(labels)

    return tf.data.Dataset.from_generator(
        _after_tf_malloc_setting(batches),
        output_signature=(
            tf.TensorSpec(
                [batch if drop_remainder else None, *features.shape], features.dtype
            ),
            tf.TensorSpec([batch if drop_remainder else None], tf.int32),
        ),
    )

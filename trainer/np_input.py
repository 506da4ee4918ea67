"""The input pipeline without TensorFlow: the same batches as numpy arrays.

Where TensorFlow cannot be imported (Colab's TPU runtimes, the JAX backend's
machines), the shards are read by the same reader as the tf.data path (fsspec,
framing, CRC, record checks, the epoch's order, exact skip, per-worker slices:
`records`), and each record is decoded, resized and augmented by `np_image`
in a thread pool (Pillow and numpy release the GIL), in order, a bounded
number of records ahead of the consumer. The batches are those the tf.data
path gives one process of `workers` (one replica each): PNG pixels equal,
JPEG within libjpeg's IDCT difference (np_image), the same records, labels,
padding, weights, skips and tally entries. One difference in kind: with
data.on_corrupt = "skip", tf.data also drops an image that Pillow decodes and
TensorFlow cannot (rare: the reader's check already decodes with Pillow);
here that image is kept.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
from typing import Callable, Iterator, NamedTuple

import numpy as np

from trainer import np_image, records, tfrecord
from trainer.errors import DataError

GROUP = 8  # Records per decode task: fewer hand-offs between threads.
AHEAD = 4  # Decode tasks queued per thread ahead of the consumer.


class _Context(NamedTuple):
    """The parts of tf.distribute.InputContext the reader reads: one replica
    per worker process."""

    num_input_pipelines: int
    input_pipeline_id: int
    num_replicas_in_sync: int

    def get_per_replica_batch_size(self, global_batch: int) -> int:
        if global_batch % self.num_replicas_in_sync:
            raise ValueError(
                f"train.global_batch_size: received {global_batch}; expected a "
                f"multiple of the {self.num_replicas_in_sync} worker processes"
            )
        return global_batch // self.num_replicas_in_sync


def _context(worker: int, workers: int) -> _Context:
    if not 0 <= worker < workers:
        raise ValueError(f"worker: received {worker}; expected 0..{workers - 1}")
    return _Context(workers, worker, workers)


def train_batches(
    spec,
    *,
    epoch: int,
    start_step: int = 0,
    worker: int = 0,
    workers: int = 1,
    tally: records.CorruptTally | None = None,
    threads: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of this process's training batches from `start_step` on.

    What `input_pipeline.train_dataset(spec, epoch=, start_step=,
    input_context=InputContext(workers, worker, workers), tally=)` yields.

    Args:
      spec: the JobSpec.
      epoch: the global epoch counter; with `train.seed` it fixes the order
        and the augmentation.
      start_step: the global step within the epoch to start at.
      worker, workers: this process and the number of processes.
      tally: where records skipped as corrupt are counted (pass: `epoch`).
      threads: decoding threads (default: the CPU count).

    Yields:
      (images uint8 [B, S, S, 3], labels int32 [B]), B the global batch over
      `workers`, steps_per_epoch - start_step of them.
    """
    gen, batch, batches = records._train_stream(
        spec, epoch, start_step, _context(worker, workers), tally
    )
    with contextlib.closing(_decoded(spec, gen(), epoch, threads)) as decoded:
        for _ in range(batches):
            images, labels = _take(decoded, batch)
            if len(labels) < batch:  # The reader wraps around: never short.
                raise RuntimeError("the training stream ended before the epoch did")
            yield images, labels


def eval_batches(
    spec,
    *,
    worker: int = 0,
    workers: int = 1,
    tally: records.CorruptTally | None = None,
    pass_key: int = 0,
    threads: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's validation batches: (images uint8, labels int32, weights
    float32), as `input_pipeline.eval_dataset` yields them.

    Every batch has the same shape: the last is padded with zero images of
    weight 0.0, and every worker yields the same number of batches.

    Args:
      spec: the JobSpec.
      worker, workers: this process and the number of processes.
      tally: where records skipped as corrupt are counted.
      pass_key: the pass they are counted under.
      threads: decoding threads (default: the CPU count).
    """
    gen, batch, batches = records._eval_stream(
        spec, _context(worker, workers), tally, pass_key
    )
    size = spec.data.image_size
    with contextlib.closing(_decoded(spec, gen(), None, threads)) as decoded:
        for _ in range(batches):
            yield _padded(*_take(decoded, batch), batch, size)


def _padded(images, labels, batch: int, size: int):
    """(images, labels, weights): weights 1.0 for the records, a short batch
    padded to `batch` with zero images of label 0 and weight 0.0."""
    n = len(labels)
    weights = np.zeros([batch], np.float32)
    weights[:n] = 1.0
    if n < batch:
        pad = np.zeros((batch - n, size, size, 3), np.uint8)
        images = np.concatenate([images.reshape(n, size, size, 3), pad])
        labels = np.concatenate([labels, np.zeros([batch - n], np.int32)])
    return images, labels, weights


def _take(decoded: Iterator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `n` (image, label) pairs stacked (fewer at the end of the stream)."""
    images, labels = [], []
    for image, label in decoded:
        images.append(image)
        labels.append(label)
        if len(labels) == n:
            break
    if not images:
        return np.zeros((0,), np.uint8), np.zeros([0], np.int32)
    return np.stack(images), np.asarray(labels, np.int32)


def _decoded(spec, chunks, epoch: int | None, threads: int | None):
    """(image, label) of each record of the reader's chunks, in order, decoded
    in a thread pool at most `threads * AHEAD` groups of records ahead of the
    consumer."""
    threads = threads or os.cpu_count() or 1
    decode = _decode_fn(spec, epoch=epoch)
    skip = spec.data.on_corrupt == "skip"
    pool = concurrent.futures.ThreadPoolExecutor(threads, "trainer-decode")
    pending: collections.deque = collections.deque()
    try:
        for images, labels, ids in chunks:
            for i in range(0, len(labels), GROUP):
                part = slice(i, i + GROUP)
                task = pool.submit(_decode_group, decode, images[part], ids[part])
                pending.append((task, labels[part]))
                while len(pending) >= threads * AHEAD:
                    yield from _ready(*pending.popleft(), skip)
        while pending:
            yield from _ready(*pending.popleft(), skip)
    finally:
        for task, _ in pending:
            task.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        chunks.close()


def _decode_group(decode, datas, ids) -> list:
    """Each record's pixels, or the exception its decoding raised."""
    out: list = []
    for data, rid in zip(datas, ids, strict=True):
        try:
            out.append(decode(data, int(rid)))
        except Exception as e:  # Pillow raises many types for bad bytes.
            out.append(e)
    return out


def _ready(task, labels, skip: bool):
    """The decoded (image, label) pairs of a group; a skipped record gives none."""
    for image, label in zip(task.result(), labels, strict=True):
        if isinstance(image, Exception):
            if not skip:
                raise DataError(
                    "a record's image bytes could not be decoded "
                    f"({type(image).__name__}: {image}); {tfrecord.REMEDY}"
                )
            # As tf.data's ignore_errors: dropped with a warning, not tallied
            # (the reader's own decode check tallies what Pillow cannot decode).
            logging.warning("skipping an image that does not decode: %s", image)
            continue
        yield image, label


def _decode_fn(spec, *, epoch: int | None) -> Callable[[bytes, int], np.ndarray]:
    """`input_pipeline._decode_fn` without TensorFlow: decode, resize and (when
    `epoch` is given) augment one record, seeded by (seed, epoch, record id)."""
    size = spec.data.image_size
    mode = spec.data.augment if epoch is not None else "none"
    base = None if epoch is None else (spec.train.seed * 1_000_003 + epoch) % (2**62)

    def decode(data: bytes, rid: int) -> np.ndarray:
        image = np_image.decode(data)
        if mode == "none":
            return np_image.resize(image, size)
        crop_seed, flip_seed = np_image.split((base, rid), 2)
        if mode in ("crop", "flip_crop"):
            image = _random_crop(image, size, crop_seed)
        else:
            image = np_image.resize(image, size)
        if mode in ("flip", "flip_crop") and np_image.flips(flip_seed):
            image = image[:, ::-1]
        return np.ascontiguousarray(image)

    return decode


def _random_crop(image: np.ndarray, size: int, seed) -> np.ndarray:
    """`input_pipeline._random_crop`: small images padded by size/8 (reflect)
    and cropped; larger ones a random resized crop."""
    if size <= 64:
        image = np_image.resize(image, size)
        pad = max(1, size // 8)
        padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)], mode="reflect")
        return np_image.random_crop(padded, size, seed)
    y, x, h, w = np_image.distorted_box(image.shape[0], image.shape[1], seed)
    crop = image[y : y + h, x : x + w]
    return np_image.to_uint8(np_image.resize_bilinear(crop, size))

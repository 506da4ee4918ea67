"""Backbone features of frozen phases, computed once and kept under the workdir.

A phase that trains no backbone layer on unaugmented images gets the same
backbone output for an image in every epoch. Here it is computed once per
record (batched, under the run's strategy), stored in
`{workdir}/cache/features-KEY/` and read back by every epoch of such phases,
by this run or by a resumed one on another machine. KEY hashes everything the
features depend on (the backbone's variable values, image size,
preprocessing, dtypes, the record checks and every shard's URL, size and
checksum or mtime), so a changed input gets a new folder and the old one is
never read. A cache counts only once its `manifest.json`, written after
every part, names the parts with their sizes and CRC32s: a half-written or
damaged one is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
import zlib
from typing import Any

import numpy as np

from trainer import backend, input_pipeline, models, storage, workdir
from trainer.errors import SpecError

tf = backend.import_tensorflow()

FORMAT = 1  # Bump when what a cache folder holds changes.
PART_BYTES = 64 * 2**20  # Features per part file.
SPLITS = ("train", "validation")
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Decision:
    """Whether a phase trains on cached features, why (not), and their size."""

    use: bool
    reason: str
    nbytes: int
    dtype: str

    def describe(self) -> str:
        size = f"{self.nbytes / 2**20:.1f} MiB in {self.dtype}"
        return f"{'yes' if self.use else 'no'} ({self.reason}; {size})"


class Features:
    """One split's cached features in host memory, looked up by record id."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, values: np.ndarray):
        self._order = np.argsort(ids, kind="stable")
        self._ids = ids[self._order]
        self.labels = labels
        self.values = values
        self.shape = tuple(values.shape[1:])
        self.dtype = values.dtype.name

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of each id, whether it is in the cache)."""
        if not len(self._ids):
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        pos = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        return self._order[pos], self._ids[pos] == ids


# ---------------------------------------------------------------------------
# Whether a phase uses the cache


def storage_dtype(spec, precision: str) -> str:
    """The dtype features are stored in.

    "auto" keeps the backbone's output exactly: float16 under mixed_float16
    (the backbone computes in it), float32 otherwise (bfloat16 outputs fit
    float32 exactly; float16 would clip their range).
    """
    if spec.data.cache_dtype != "auto":
        return spec.data.cache_dtype
    return "float16" if precision == "mixed_float16" else "float32"


def estimate_bytes(spec, model, dtype: str) -> int:
    """Bytes of both splits' features."""
    records = sum(input_pipeline.split_info(spec, s)["records"] for s in SPLITS)
    per_record = int(np.prod(models.feature_shape(model))) * np.dtype(dtype).itemsize
    return records * per_record


def run_obstacle(spec, rt, model) -> str | None:
    """Why no phase of this run can use cached features; None if phases can."""
    if spec.data.augment != "none":
        return f'data.augment = "{spec.data.augment}" changes the images every epoch'
    if rt.workers > 1:
        return (
            f"{rt.workers} workers: the cache is built and read by one process "
            "(several workers train uncached)"
        )
    noisy = models.training_dependent_layers(model)
    if noisy:
        return (
            f"backbone {spec.model.backbone!r} has layers that compute "
            f"differently in training ({', '.join(noisy[:3])})"
        )
    return None


def decide(spec, phase, rt, model) -> Decision:
    """Whether `phase` trains on cached features (`data.cache_features`).

    Raises:
      SpecError: `data.cache_features = true` where this run cannot use them.
    """
    setting = spec.data.cache_features
    dtype = storage_dtype(spec, rt.precision)
    nbytes = estimate_bytes(spec, model, dtype)
    blocked = run_obstacle(spec, rt, model)
    if setting is True and blocked:
        raise SpecError(
            f"data.cache_features = true cannot be used: {blocked}; set "
            'data.cache_features = "auto" (or false) to train without it'
        )
    if setting is False:
        blocked = "data.cache_features = false"
    elif blocked is None and phase.trainable_from != "none":
        blocked = f"trainable_from = {phase.trainable_from!r} trains the backbone"
    elif blocked is None and phase.epochs == 0:
        blocked = "the phase is skipped"
    budget = spec.data.cache_budget_mb
    if blocked is None and setting == "auto" and nbytes > budget * 2**20:
        blocked = f"over data.cache_budget_mb = {budget}"
    if blocked is None and setting == "auto":
        blocked = cost_obstacle(spec, phase)
    if blocked:
        return Decision(False, blocked, nbytes, dtype)
    return Decision(True, "frozen backbone, no augmentation", nbytes, dtype)


def cost_obstacle(spec, phase) -> str | None:
    """Why building the cache costs more backbone passes than `phase` saves.

    Building runs every record of both splits through the backbone once; the
    phase without it runs epochs x (its training images + the validation
    split). A short phase over a large split (a dry run, a few steps per
    epoch) reads most records never, and would wait for all of them. Counted
    over the whole phase, not what is left of it, so that a resumed run
    decides as the first one did.
    """
    records = {s: input_pipeline.split_info(spec, s)["records"] for s in SPLITS}
    train_images = (
        input_pipeline.phase_steps(spec, phase) * spec.train.global_batch_size
    )
    without = phase.epochs * (train_images + records["validation"])
    build = records["train"] + records["validation"]
    if build < without:
        return None
    return (
        f"building it takes {build:,} backbone passes, more than the "
        f"{without:,} the phase makes without it"
    )


def check_spec(spec, rt, model) -> None:
    """`data.cache_features = true` needs a phase that can use the cache.

    Raises:
      SpecError: naming why none can.
    """
    if spec.data.cache_features is not True:
        return
    if not any(decide(spec, p, rt, model).use for p in spec.phases):
        raise SpecError(
            "data.cache_features = true, but no phase can use cached features "
            '(each needs trainable_from = "none" and epochs > 0); set '
            'data.cache_features = "auto" (or false)'
        )


# ---------------------------------------------------------------------------
# The key, and a committed cache


def key_material(spec, model, dtype: str) -> dict[str, Any]:
    """Everything the cached features depend on."""
    d = spec.data
    splits = {}
    for split in SPLITS:
        shards = input_pipeline.split_info(spec, split)["shards"]
        splits[split] = [[url, storage.fingerprint(url)] for url in shards]
    return {
        "format": FORMAT,
        "backbone": spec.model.backbone,
        "backbone_variables": models.backbone_digest(model),
        "image_size": d.image_size,
        "preprocess": models.get_backbone(spec.model.backbone).preprocess,
        "compute_dtype": model.get_layer("backbone").compute_dtype,
        "dtype": dtype,
        "records": [d.image_key, d.label_key, d.label_offset, d.num_classes],
        "on_corrupt": d.on_corrupt,
        "splits": splits,
    }


def cache_url(root: str, material: dict[str, Any]) -> str:
    blob = json.dumps(material, sort_keys=True).encode()
    return workdir.feature_cache(root, hashlib.sha256(blob).hexdigest()[:16])


def load_or_build(spec, model, rt, root: str, dtype: str) -> dict[str, Features]:
    """The committed cache for this model and data, built first if there is none."""
    url = cache_url(root, key_material(spec, model, dtype))
    start = time.perf_counter()
    cached = load(url)
    if cached is not None:
        print(f"feature cache: reusing {url} ({time.perf_counter() - start:.1f}s)")
        return cached
    print(f"feature cache: computing backbone features into {url}")
    # Uncommitted first: a manifest left from a damaged cache must not name
    # parts that this build is rewriting.
    storage.rm(storage.join(url, MANIFEST))
    built = build(spec, model, rt, url, dtype)
    records = sum(len(f.labels) for f in built.values())
    print(
        f"feature cache: {records} records in {time.perf_counter() - start:.1f}s "
        f"({sum(f.values.nbytes for f in built.values()) / 2**20:.1f} MiB)"
    )
    return built


def load(url: str) -> dict[str, Features] | None:
    """The cache at `url` if it is committed and whole, else None."""
    manifest_url = storage.join(url, MANIFEST)
    if not storage.exists(manifest_url):
        return None
    manifest = storage.read_json(manifest_url)
    out = {}
    for split, entry in manifest["splits"].items():
        arrays = []
        for part in entry["parts"]:
            arrays.append(_read_part(storage.join(url, part["name"]), part))
            if arrays[-1] is None:
                print(f"feature cache: {url} has a damaged part; rebuilding it")
                return None
        out[split] = _joined(arrays, entry["shape"], manifest["dtype"])
    return out


def _read_part(url: str, part: dict[str, Any]) -> tuple[np.ndarray, ...] | None:
    """(ids, labels, values) of a part, None unless its size and CRC match."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        return None
    if len(data) != part["bytes"] or zlib.crc32(data) != part["crc32"]:
        return None
    with np.load(io.BytesIO(data)) as npz:
        return npz["ids"], npz["labels"], npz["values"]


def _joined(arrays, shape, dtype: str) -> Features:
    if not arrays:
        empty = np.zeros((0,), np.int64)
        return Features(empty, empty.astype(np.int32), np.zeros((0, *shape), dtype))
    ids, labels, values = (np.concatenate(a) for a in zip(*arrays, strict=True))
    return Features(ids, labels, values)


# ---------------------------------------------------------------------------
# Building a cache


def build(spec, model, rt, url: str, dtype: str) -> dict[str, Features]:
    """Computes both splits' features into `url`; the manifest goes last."""
    extract = _extractor(model, rt.strategy)
    batch = spec.train.eval_batch_size or spec.train.global_batch_size
    manifest: dict[str, Any] = {"format": FORMAT, "dtype": dtype, "splits": {}}
    out = {}
    for split in SPLITS:
        dataset = rt.strategy.experimental_distribute_dataset(
            input_pipeline.cache_source(spec, split, batch)
        )
        parts, arrays = _write_parts(
            url, split, _batches(dataset, extract, rt.strategy, dtype)
        )
        out[split] = _joined(arrays, models.feature_shape(model), dtype)
        manifest["splits"][split] = {
            "records": int(len(out[split].labels)),
            "shape": list(out[split].shape or models.feature_shape(model)),
            "parts": parts,
        }
    storage.write_json(storage.join(url, MANIFEST), manifest)  # The commit.
    return out


def _extractor(model, strategy):
    """A `tf.function`: per-replica (features, labels, ids) of one batch."""

    def replica(images, labels, ids):
        features = models.backbone_features(model, tf.cast(images, tf.float32))
        return features, labels, ids

    @tf.function
    def extract(images, labels, ids):
        return strategy.run(replica, args=(images, labels, ids))

    return extract


def _batches(dataset, extract, strategy, dtype: str):
    """(ids, labels, features) numpy batches, gathered from every replica."""
    for images, labels, ids in dataset:
        host = [
            np.concatenate(
                [np.asarray(t) for t in strategy.experimental_local_results(out)]
            )
            for out in extract(images, labels, ids)
        ]
        values, labels_np, ids_np = host
        real = ids_np >= 0  # The last batch's padding has record id -1.
        yield ids_np[real], labels_np[real], values[real].astype(dtype)


def _write_parts(url: str, split: str, batches):
    """Writes batches as parts of about PART_BYTES; (manifest entries, arrays)."""
    parts: list[dict[str, Any]] = []
    arrays: list[tuple[np.ndarray, ...]] = []
    pending: list[tuple[np.ndarray, ...]] = []

    def flush() -> None:
        if not pending:
            return
        ids, labels, values = (np.concatenate(a) for a in zip(*pending, strict=True))
        buffer = io.BytesIO()
        np.savez(buffer, ids=ids, labels=labels, values=values)
        name = f"{split}-{len(parts):05d}.npz"
        data = buffer.getvalue()
        storage.write_bytes(storage.join(url, name), data)
        parts.append(
            {
                "name": name,
                "records": len(ids),
                "bytes": len(data),
                "crc32": zlib.crc32(data),
            }
        )
        arrays.append((ids, labels, values))
        pending.clear()

    for batch in batches:
        pending.append(batch)
        if sum(b[2].nbytes for b in pending) >= PART_BYTES:
            flush()
    flush()
    return parts, arrays

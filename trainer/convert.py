"""`trainer convert`: images (a class-per-folder tree, or sklearn's digits) -> TFRecord shards.

Writes `{split}-00000-of-0000N.tfrecord` shards of `tf.train.Example` records in
the TF-slim / Model Garden schema (design.md) through fsspec to any URL, and a
`manifest.json` next to them with the record count of every shard, which the
input pipeline uses to skip whole shards when it resumes mid-epoch.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tqdm

from trainer import example_proto, storage, tfrecord
from trainer.errors import DataError, NotFound, UsageError

DEFAULT_SHARD_BYTES = 100 * 1024 * 1024
# JPEG and PNG are stored as they are; the others (Keras'
# image_dataset_from_directory reads BMP and GIF too) are stored as PNG.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_FORMATS = {"JPEG": b"jpeg", "PNG": b"png"}


def make_example(
    encoded: bytes, label: int, *, height: int, width: int, fmt: bytes, text: str
) -> bytes:
    """A serialized `tf.train.Example` in the TF-slim / Model Garden schema."""
    example = example_proto.Example()  # No TensorFlow: converts on a JAX-only VM.
    feature = example.features.feature
    for key, value in (
        ("image/encoded", encoded),
        ("image/format", fmt),
        ("image/class/text", text.encode()),
    ):
        feature[key].bytes_list.value.append(value)
    for key, number in (
        ("image/height", height),
        ("image/width", width),
        ("image/class/label", label),
    ):
        feature[key].int64_list.value.append(number)
    # Map entries in key order: the same images give the same shard bytes
    # (upb otherwise orders them differently from one process to the next).
    return example.SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------
# Public entry points


def convert_sample_digits(
    out: str,
    *,
    shards: int | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Writes sklearn's 1,797 real 8x8 digits as 32x32 RGB PNG shards to `out`.

    Pixel values 0..16 are scaled to 0..255, each pixel repeated 4x4 (nearest
    upscaling) and the grey channel replicated to RGB.

    Args:
      out: the output folder, any fsspec URL or a local path.
      shards: shards per split; None sizes them by `shard_bytes`.
      validation_fraction: the share of each class held out for validation.
      seed: seeds the stratified split and the record order.
      shard_bytes: the target size of a shard when `shards` is None.

    Returns:
      The manifest written to `{out}/manifest.json`.
    """
    from sklearn.datasets import load_digits

    _check_fraction(validation_fraction)
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    pixels = pixels.repeat(4, axis=1).repeat(4, axis=2)  # 8x8 -> 32x32, nearest.
    labels = digits.target.astype(np.int64)
    class_names = [str(c) for c in range(10)]
    train_idx, val_idx = _stratified_split(labels, validation_fraction, seed)

    # 1,797 PNGs of ~200 bytes: encode them up front to size shards exactly.
    pngs = [_encode_png(np.repeat(p[:, :, None], 3, axis=2)) for p in pixels]

    def records(indices: np.ndarray) -> Iterator[_Item]:
        for i in indices:
            label = int(labels[i])
            yield _Item(pngs[i], label, 32, 32, b"png", class_names[label])

    splits = {
        name: (records(idx), [len(pngs[i]) + 160 for i in idx])  # + Example keys
        for name, idx in (("train", train_idx), ("validation", val_idx))
    }
    return _write_dataset(
        out,
        splits,
        class_names=class_names,
        shards=shards,
        shard_bytes=shard_bytes,
        source="sklearn.datasets.load_digits (8x8, values 0..16) -> 32x32 RGB PNG",
    )


def describe(manifest: dict[str, Any], out: str) -> str:
    """A short report of what a conversion wrote, for the CLI."""
    lines = [f"wrote {out}/{tfrecord.MANIFEST}: {manifest['num_classes']} classes"]
    for split, info in manifest["splits"].items():
        lines.append(
            f"  {split}: {info['records']} records in {len(info['shards'])} shard(s)"
        )
    size = manifest.get("image_size", {})
    if size.get("height"):
        h, w = size["height"], size["width"]
        lines.append(
            f"  image size: {h['min']}-{h['max']} x {w['min']}-{w['max']} pixels"
        )
    return "\n".join(lines)


def convert_images(
    images_dir: str,
    out: str,
    *,
    shards: int | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Writes a class-per-subfolder tree of images as shards to `out`.

    Class names are the subfolder names, sorted; labels are their 0-based
    indices. JPEG and PNG bytes are stored as they are (no re-encoding); BMP,
    GIF and WebP files as PNG.

    Args:
      images_dir: a folder (local path or fsspec URL) with one subfolder per class.
      out: the output folder, any fsspec URL or a local path.
      shards: shards per split; None sizes them by `shard_bytes`.
      validation_fraction: the share of each class held out for validation.
      seed: seeds the stratified split and the record order.
      shard_bytes: the target size of a shard when `shards` is None.

    Returns:
      The manifest written to `{out}/manifest.json`.

    Raises:
      FileNotFoundError: `images_dir` does not exist.
      ValueError: it holds fewer than two class subfolders, or one without
        images.
    """
    _check_fraction(validation_fraction)
    class_names = _class_folders(images_dir)
    files, sizes, labels = _class_images(images_dir, class_names)
    label_arr = np.asarray(labels, np.int64)
    train_idx, val_idx = _stratified_split(label_arr, validation_fraction, seed)

    def records(indices: np.ndarray) -> Iterator[_Item]:
        for i in indices:
            yield _image_item(files[i], labels[i], class_names[labels[i]])

    splits = {
        "train": (records(train_idx), [sizes[i] for i in train_idx]),
        "validation": (records(val_idx), [sizes[i] for i in val_idx]),
    }
    return _write_dataset(
        out,
        splits,
        class_names=class_names,
        shards=shards,
        shard_bytes=shard_bytes,
        source=images_dir,
    )


def _class_folders(images_dir: str) -> list[str]:
    """The class subfolders of `images_dir`, sorted (hidden ones left out)."""
    if not storage.exists(images_dir) or not storage.isdir(images_dir):
        raise NotFound(
            f"--images={images_dir}: no such folder; expected a folder with one "
            "subfolder of images per class"
        )
    class_names = [
        n
        for n in storage.listdir(images_dir)
        if not n.startswith(".") and storage.isdir(storage.join(images_dir, n))
    ]
    if len(class_names) < 2:
        got = "no class subfolders"
        if class_names:
            got = f"one class subfolder ({class_names[0]}/)"
        raise DataError(
            f"--images={images_dir}: {got}; a classifier needs one subfolder "
            "per class, at least two (e.g. cats/, dogs/; pass/, fail/ for a "
            "binary job), each holding its images"
        )
    return class_names


def _class_images(
    images_dir: str, class_names: list[str]
) -> tuple[list[str], list[int], list[int]]:
    """(image URLs, their sizes in bytes, their labels) of all class folders.

    Files of other types are left out with a warning; an empty class folder
    is refused (its class would be trained without a single example)."""
    files: list[str] = []
    sizes: list[int] = []
    labels: list[int] = []
    skipped: list[str] = []
    for label, name in enumerate(class_names):
        folder = storage.join(images_dir, name)
        count = len(files)
        for entry in storage.listdir(folder):
            url = storage.join(folder, entry)
            if not entry.lower().endswith(IMAGE_EXTENSIONS):
                if not entry.startswith("."):
                    skipped.append(f"{name}/{entry}")
                continue
            files.append(url)
            sizes.append(storage.size(url))
            labels.append(label)
        if len(files) == count:
            raise DataError(
                f"--images={images_dir}: class subfolder {name}/ holds no images "
                f"({', '.join('*' + e for e in IMAGE_EXTENSIONS)}); add its "
                "images, or move the folder out if it is no class"
            )
    if skipped:
        logging.warning(
            "convert: left out %d %s that %s no %s file (folders inside a "
            "class folder are not read): %s%s",
            len(skipped),
            *(("entry", "is") if len(skipped) == 1 else ("entries", "are")),
            "/".join(e[1:] for e in IMAGE_EXTENSIONS),
            ", ".join(skipped[:5]),
            ", ..." if len(skipped) > 5 else "",
        )
    return files, sizes, labels


def _image_item(url: str, label: int, text: str) -> _Item:
    """One image file, its bytes as they are unless PIL calls it neither JPEG nor PNG."""
    from PIL import Image

    data = storage.read_bytes(url)
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt = _FORMATS.get(im.format or "")
            if fmt is None:  # e.g. a GIF named .png: store it as PNG.
                data = _encode_png(np.asarray(im.convert("RGB")))
                fmt = b"png"
    except Exception as e:  # PIL raises many types for bad files.
        raise DataError(
            f"{url}: not a readable image ({e}); remove or "
            "replace the file and run convert again"
        ) from None
    return _Item(data, label, height, width, fmt, text)


# ---------------------------------------------------------------------------
# Helpers


class _Item:
    __slots__ = ("encoded", "label", "height", "width", "fmt", "text")

    def __init__(self, encoded, label, height, width, fmt, text):
        self.encoded, self.label = encoded, label
        self.height, self.width, self.fmt, self.text = height, width, fmt, text


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise UsageError(
            f"--validation_fraction={fraction}: expected 0 <= fraction < 1"
        )


def _encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, `round(n * fraction)` records go to validation; both shuffled."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train_idx = np.concatenate(train) if train else np.zeros(0, np.int64)
    val_idx = np.concatenate(val) if val else np.zeros(0, np.int64)
    return rng.permutation(train_idx), rng.permutation(val_idx)


def _shard_bounds(
    est_sizes: Sequence[int], shards: int | None, shard_bytes: int
) -> list[int]:
    """Start index of each shard (plus the end), cutting at ~equal byte sizes."""
    n = len(est_sizes)
    if shards is None:
        shards = max(1, math.ceil(sum(est_sizes) / max(1, shard_bytes)))
    if shards <= 0:
        raise UsageError(f"--shards={shards}: expected a positive number")
    shards = max(1, min(shards, n)) if n else 1
    cum = np.concatenate([[0], np.cumsum(est_sizes, dtype=np.int64)])
    total = cum[-1]
    bounds = [0]
    for k in range(1, shards):
        cut = int(np.searchsorted(cum, total * k / shards))
        bounds.append(min(max(cut, bounds[-1] + 1), n - (shards - k)))
    bounds.append(n)
    return bounds


def _write_dataset(
    out: str,
    splits: dict[str, tuple[Iterable[_Item], list[int]]],
    *,
    class_names: list[str],
    shards: int | None,
    shard_bytes: int,
    source: str,
) -> dict[str, Any]:
    _refuse_old_shards(out, list(splits))
    storage.makedirs(out)
    heights: list[int] = []
    widths: list[int] = []
    manifest_splits: dict[str, Any] = {}
    try:
        for split, (items, est_sizes) in splits.items():
            manifest_splits[split] = _write_split(
                out, split, items, est_sizes, shards, shard_bytes, (heights, widths)
            )
    except BaseException:  # A bad image, Ctrl-C: the same command can run again.
        _remove_shards(out, list(splits))
        raise
    manifest = {
        "version": 1,
        "format": "TFRecord of tf.train.Example",
        "keys": {
            "image": "image/encoded",
            "label": "image/class/label",
            "format": "image/format",
            "height": "image/height",
            "width": "image/width",
            "text": "image/class/text",
        },
        "source": source,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "image_size": {"height": _stats(heights), "width": _stats(widths)},
        "splits": manifest_splits,
    }
    storage.write_json(storage.join(out, tfrecord.MANIFEST), manifest)
    return manifest


def _shard_names(out: str, splits: list[str]) -> list[str]:
    return [
        name
        for name in storage.listdir(out)
        if any(name.startswith(f"{s}-") and name.endswith(".tfrecord") for s in splits)
    ]


def _remove_shards(out: str, splits: list[str]) -> None:
    """The shards of a conversion that failed (`_refuse_old_shards` saw none
    before it), so that running it again is not refused for them."""
    for name in _shard_names(out, splits):
        try:
            storage.rm(storage.join(out, name))
        except OSError as e:  # The error being raised says more.
            logging.warning("convert: could not remove %s/%s: %s", out, name, e)


def _refuse_old_shards(out: str, splits: list[str]) -> None:
    """New shards beside old ones would be read with them: a job's
    `train-*.tfrecord` matches both sets, and the data is silently doubled."""
    if not storage.exists(out):
        return
    old = _shard_names(out, splits)
    finished = storage.exists(storage.join(out, tfrecord.MANIFEST))
    if finished:
        old = [tfrecord.MANIFEST, *old]
    if old:
        what = "of a dataset" if finished else "(no manifest.json: a cut-short run?)"
        raise DataError(
            f"--out={out} already holds {len(old)} file(s) {what} "
            f"({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}); shards written "
            "beside them would be read with them. Choose an empty folder, or delete "
            "them first"
        )


def _write_split(
    out: str,
    split: str,
    items: Iterable[_Item],
    est_sizes: list[int],
    shards: int | None,
    shard_bytes: int,
    seen: tuple[list[int], list[int]],
) -> dict[str, Any]:
    """Writes one split's shards; its manifest entry. Image sizes go to `seen`."""
    if not est_sizes:
        return {"records": 0, "shards": []}
    bounds = _shard_bounds(est_sizes, shards, shard_bytes)
    n_shards = len(bounds) - 1
    it = iter(items)
    entries = []
    bar = tqdm.tqdm(total=len(est_sizes), desc=f"convert {split}", unit="img")
    try:
        for k in range(n_shards):
            name = f"{split}-{k:05d}-of-{n_shards:05d}.tfrecord"
            count = bounds[k + 1] - bounds[k]
            written = 0
            with storage.open_file(storage.join(out, name), "wb") as f:
                for _ in range(count):
                    item = next(it)
                    rec = tfrecord.frame_record(
                        make_example(
                            item.encoded,
                            item.label,
                            height=item.height,
                            width=item.width,
                            fmt=item.fmt,
                            text=item.text,
                        )
                    )
                    f.write(rec)
                    written += len(rec)
                    seen[0].append(item.height)
                    seen[1].append(item.width)
                    bar.update(1)
            entries.append({"name": name, "records": count, "bytes": written})
    finally:
        bar.close()
    logging.info("convert: wrote %d %s shards to %s", n_shards, split, out)
    return {"records": sum(e["records"] for e in entries), "shards": entries}


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": int(min(values)),
        "max": int(max(values)),
        "mean": round(float(np.mean(values)), 2),
    }

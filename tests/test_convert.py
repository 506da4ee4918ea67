"""`trainer convert`: digits and image folders -> TFRecord shards and manifest.json."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer import convert, input_pipeline, storage


def _parse(record: bytes) -> dict:
    return tf.io.parse_single_example(
        record,
        {
            "image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64),
            "image/format": tf.io.FixedLenFeature([], tf.string),
            "image/height": tf.io.FixedLenFeature([], tf.int64),
            "image/width": tf.io.FixedLenFeature([], tf.int64),
            "image/class/text": tf.io.FixedLenFeature([], tf.string),
        },
    )


def test_digits_shards_manifest_and_schema(digits_dir):
    manifest = storage.read_json(os.path.join(digits_dir, "manifest.json"))
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    assert (train["records"], val["records"]) == (1438, 359)
    assert [s["name"] for s in train["shards"]][0] == "train-00000-of-00007.tfrecord"
    assert manifest["class_names"] == [str(i) for i in range(10)]
    assert manifest["image_size"]["height"] == {"min": 32, "max": 32, "mean": 32.0}
    labels = []
    for entry in val["shards"]:
        url = os.path.join(digits_dir, entry["name"])
        records = [r.numpy() for r in tf.data.TFRecordDataset(url)]  # CRCs valid
        assert len(records) == entry["records"]
        assert os.path.getsize(url) == entry["bytes"]
        for r in records:
            f = _parse(r)
            labels.append(int(f["image/class/label"]))
            image = tf.io.decode_png(f["image/encoded"]).numpy()
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
            assert f["image/format"] == b"png"
            assert f["image/class/text"].numpy().decode() == str(labels[-1])
            # grey replicated; 4x4 nearest upscaling of an 8x8 digit
            assert (image[..., 0] == image[..., 2]).all()
            assert (image[::4, ::4, 0] == image[3::4, 3::4, 0]).all()
    # Stratified: every class in validation, in proportion (~36 each).
    assert sorted(np.bincount(labels))[0] >= 30


def test_digits_to_gcs_with_byte_sized_shards(gcs_server, gcs_bucket):
    out = storage.join(gcs_bucket, "digits")
    manifest = convert.convert_sample_digits(
        out, shard_bytes=100_000, validation_fraction=0.5, seed=1
    )
    train = manifest["splits"]["train"]
    assert len(train["shards"]) >= 3  # ~900 records x ~400 B / 100 kB
    assert all(80_000 < s["bytes"] < 120_000 for s in train["shards"])
    assert train["records"] + manifest["splits"]["validation"]["records"] == 1797
    shards = input_pipeline.list_shards(storage.join(out, "train-*.tfrecord"))
    assert [storage.basename(s) for s in shards] == [s["name"] for s in train["shards"]]
    assert storage.read_json(storage.join(out, "manifest.json")) == manifest


def _image(fmt: str, size=(40, 30), value=100) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.slow  # Two processes.
def test_the_same_images_give_the_same_shard_bytes(tmp_path):
    """Two processes convert the digits: byte-identical shards (a checksum of
    the data means something; protobuf's map order alone used to differ)."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        proc = subprocess.run(
            [sys.executable, "-m", "trainer", "convert", "--sample=digits",
             f"--out={out}"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    for name in names:
        a, b = (pathlib.Path(out, name).read_bytes() for out in outs)
        assert a == b, f"{name} differs between two conversions"


def test_convert_images_folder(tmp_path):
    src = tmp_path / "images"
    for cls, fmt, ext in (("dogs", "PNG", "png"), ("cats", "JPEG", "jpg")):
        (src / cls).mkdir(parents=True)
        for i in range(5):
            (src / cls / f"{i}.{ext}").write_bytes(_image(fmt, size=(40 + i, 30)))
    (src / "cats" / "notes.txt").write_text("not an image")
    out = str(tmp_path / "out")
    manifest = convert.convert_images(str(src), out, validation_fraction=0.2)
    assert manifest["class_names"] == ["cats", "dogs"]
    assert manifest["splits"]["train"]["records"] == 8
    assert manifest["splits"]["validation"]["records"] == 2
    assert manifest["image_size"]["width"] == {"min": 40, "max": 44, "mean": 42.0}
    records = [
        r.numpy()
        for r in tf.data.TFRecordDataset(
            tf.io.gfile.glob(os.path.join(out, "train-*.tfrecord"))
        )
    ]
    formats = {
        (int(_parse(r)["image/class/label"]), _parse(r)["image/format"].numpy())
        for r in records
    }
    assert formats == {(0, b"jpeg"), (1, b"png")}


def test_bmp_gif_and_webp_are_stored_as_png_and_other_files_named(tmp_path, caplog):
    src = tmp_path / "images"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for fmt in ("BMP", "GIF", "WEBP", "JPEG"):
            (src / cls / f"x.{fmt.lower()}").write_bytes(_image(fmt))
    (src / "a" / "notes.txt").write_text("not an image")
    (src / "b" / "2019").mkdir()  # Nested folders are not read.
    (src / "b" / ".DS_Store").write_bytes(b"")  # Hidden: not worth a word.
    out = str(tmp_path / "out")
    with caplog.at_level("WARNING"):
        manifest = convert.convert_images(str(src), out, validation_fraction=0.0)
    assert manifest["splits"]["train"]["records"] == 8
    assert "left out 2 entries that are no jpg/jpeg/png/bmp/gif/webp file" in (
        caplog.text
    )
    assert "a/notes.txt, b/2019" in caplog.text
    records = [
        r.numpy()
        for r in tf.data.TFRecordDataset(f"{out}/train-00000-of-00001.tfrecord")
    ]
    formats = sorted(_parse(r)["image/format"].numpy() for r in records)
    assert formats == [b"jpeg"] * 2 + [b"png"] * 6
    for r in records:  # What TensorFlow decodes, at the size PIL read.
        example = _parse(r)
        pixels = tf.io.decode_image(example["image/encoded"], channels=3)
        assert pixels.shape[:2] == (example["image/height"], example["image/width"])


def test_bad_images_dir_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--images=.*missing: no such folder"):
        convert.convert_images(str(tmp_path / "missing"), str(tmp_path / "o"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(_image("PNG"))
    with pytest.raises(ValueError, match=r"no class subfolders"):
        convert.convert_images(str(tmp_path / "flat"), str(tmp_path / "o"))
    (tmp_path / "one" / "pass").mkdir(parents=True)
    (tmp_path / "one" / "pass" / "a.png").write_bytes(_image("PNG"))
    with pytest.raises(ValueError, match=r"one class subfolder \(pass/\); .*two"):
        convert.convert_images(str(tmp_path / "one"), str(tmp_path / "o"))
    (tmp_path / "one" / "fail").mkdir()
    (tmp_path / "one" / "fail" / "a.tiff").write_bytes(b"II*\0")
    with pytest.raises(ValueError, match=r"class subfolder fail/ holds no images"):
        convert.convert_images(str(tmp_path / "one"), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match=r"validation_fraction=1.5"):
        convert.convert_sample_digits(str(tmp_path / "o"), validation_fraction=1.5)


def test_converting_into_a_folder_with_shards_is_refused(tmp_path, capsys):
    """Two sets of shards in one folder would both match `train-*.tfrecord`:
    the second conversion is refused, and the first left as it was."""
    from tests.test_cli import assert_one_error, run

    out = tmp_path / "data"
    first = run(capsys, "convert", "--sample=digits", f"--out={out}", "--shards=3")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run(capsys, "convert", "--sample=digits", f"--out={out}", "--shards=2")
    assert_one_error(
        again,
        rf"--out={out} already holds 7 file\(s\) of a dataset \(manifest.json, "
        r"train-00000-of-00003.tfrecord, .*\); .*Choose an empty folder, or delete",
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_failed_conversion_leaves_no_shards_to_refuse(tmp_path, capsys):
    """A bad image stops convert half way: the shards written before it are
    removed, so that the same command runs again once the image is fixed."""
    from tests.test_cli import assert_one_error, run

    src, out = tmp_path / "images", tmp_path / "data"
    for cls in ("ok", "nok"):
        (src / cls).mkdir(parents=True)
        for i in range(4):
            (src / cls / f"{i}.jpg").write_bytes(_image("JPEG", value=60 * i))
    whole = (src / "ok" / "2.jpg").read_bytes()
    (src / "ok" / "2.jpg").write_bytes(whole[: len(whole) // 2])
    args = ("convert", f"--images={src}", f"--out={out}", "--validation_fraction=0")
    assert_one_error(
        run(capsys, *args),
        rf"{src}/ok/2.jpg: not a readable image \(.*\); remove or replace the file "
        "and run convert again",
    )
    assert list(out.iterdir()) == []
    (src / "ok" / "2.jpg").write_bytes(whole)
    again = run(capsys, *args)
    assert again.returncode == 0, again.stderr
    assert "train: 8 records in 1 shard(s)" in again.stdout

    # Shards without a manifest (a conversion killed with -9) are named so.
    (out / "manifest.json").unlink()
    assert_one_error(
        run(capsys, *args),
        rf"--out={out} already holds 1 file\(s\) \(no manifest.json: a cut-short "
        r"run\?\) \(train-00000-of-00001.tfrecord\)",
    )

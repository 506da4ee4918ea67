"""Tests for trainer.models: table, preprocessing, head, weights, trainable_from."""

from __future__ import annotations

import os

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from trainer import config, models, storage

SMALL = "mobilenetv3small"  # ~1M parameters: the cheapest backbone to build.


def make_spec(
    backbone="resnet50",
    image_size=32,
    num_classes=10,
    weights="none",
    weights_mirror="",
    pooling="flatten",
    dense=(16,),
    dropout=0.0,
) -> config.JobSpec:
    return config.JobSpec(
        name="test",
        data=config.DataConfig(
            train="unused",
            validation="unused",
            image_size=image_size,
            num_classes=num_classes,
        ),
        model=config.ModelConfig(
            backbone=backbone,
            weights=weights,
            weights_mirror=weights_mirror,
            pooling=pooling,
            dense=tuple(dense),
            dropout=dropout,
        ),
    )


@pytest.fixture(scope="module")
def resnet():
    """One ResNet50 classifier (10 classes, dense 16, dropout) for the module."""
    return models.build_model(make_spec(dropout=0.5))


@pytest.fixture(scope="module")
def vgg_binary():
    return models.build_model(make_spec("vgg16", num_classes=1, pooling="avg"))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty Keras cache, no mirror from the environment, no download."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.delenv(models.MIRROR_ENV, raising=False)
    monkeypatch.setenv(models.NO_DOWNLOAD_ENV, "1")
    return tmp_path


@pytest.fixture(scope="module")
def legacy_weights(tmp_path_factory):
    """A random no-top `SMALL` saved as Keras' legacy .h5, under Keras' name.

    Keras 3's `save_weights` only writes `.weights.h5`; keras.applications
    files are the legacy format, which `save_weights_to_hdf5_group` writes.
    """
    backbone = models.build_backbone(SMALL, 32)
    folder = tmp_path_factory.mktemp("mirror")
    path = folder / models.weights_file_name(SMALL, 32)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    return str(folder), str(path), [np.asarray(w) for w in backbone.weights]


def _assert_weights(model, expected):
    got = [np.asarray(w) for w in model.get_layer("backbone").weights]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


# ---------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize(
    "mode, reference",
    [
        ("caffe", keras.applications.resnet50.preprocess_input),
        ("caffe", keras.applications.vgg16.preprocess_input),
        ("tf", keras.applications.resnet_v2.preprocess_input),
        ("tf", keras.applications.mobilenet_v2.preprocess_input),
        ("torch", keras.applications.densenet.preprocess_input),
    ],
)
def test_preprocess_matches_keras(mode, reference):
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    got = np.asarray(models.Preprocess(mode)(x))
    np.testing.assert_allclose(got, reference(x.copy()), rtol=1e-5, atol=1e-4)


def test_preprocess_none_is_identity_and_bad_mode_raises():
    x = np.full((1, 4, 4, 3), 200.0, "float32")
    np.testing.assert_array_equal(np.asarray(models.Preprocess("none")(x)), x)
    with pytest.raises(ValueError, match="mode='bgr'"):
        models.Preprocess("bgr")


@pytest.mark.parametrize("name", sorted(models.BACKBONES))
def test_table_matches_each_builders_module(name):
    """Each row's preprocessing and minimum size are its Keras module's own."""
    import importlib

    entry = models.BACKBONES[name]
    module = importlib.import_module(entry.builder.__module__)
    x = np.random.default_rng(0).uniform(0, 255, (1, 8, 8, 3)).astype("float32")
    got = np.asarray(models.Preprocess(entry.preprocess)(x))
    np.testing.assert_allclose(
        got, module.preprocess_input(x.copy()), rtol=1e-5, atol=1e-4
    )
    # Keras refuses one pixel below the minimum before it builds a layer.
    small = entry.min_size - 1
    with pytest.raises(ValueError, match=rf"at least {small + 1}x{small + 1};"):
        entry.builder(include_top=False, weights=None, input_shape=(small, small, 3))


def test_mobilenetv2_weights_file_per_size():
    assert models.weights_file_name("mobilenetv2", 96).endswith("1.0_96_no_top.h5")
    assert models.weights_file_name("mobilenetv2", 32).endswith("1.0_224_no_top.h5")


def test_table_weights_match_installed_keras():
    """File names, URLs and hashes equal the constants of the installed Keras."""
    from keras.src.applications import (
        convnext,
        efficientnet,
        efficientnet_v2,
        inception_v3,
        mobilenet_v3,
        resnet,
        vgg16,
        vgg19,
        xception,
    )

    table = models.BACKBONES
    for name in ("resnet50", "resnet101", "resnet152", "resnet50v2", "resnet152v2"):
        assert table[name].weights_base == resnet.BASE_WEIGHTS_PATH
        assert table[name].weights_hash == resnet.WEIGHTS_HASHES[name][1]
    assert table["vgg16"].weights_url == vgg16.WEIGHTS_PATH_NO_TOP
    assert table["vgg19"].weights_url == vgg19.WEIGHTS_PATH_NO_TOP
    assert table["inceptionv3"].weights_url == inception_v3.WEIGHTS_PATH_NO_TOP
    assert table["xception"].weights_url == xception.WEIGHTS_PATH_NO_TOP
    for i in range(8):
        entry = table[f"efficientnetb{i}"]
        assert entry.weights_base == efficientnet.BASE_WEIGHTS_PATH
        assert entry.weights_hash == efficientnet.WEIGHTS_HASHES[f"b{i}"][1]
    for key in ("b0", "b1", "b2", "b3", "s"):
        entry = table[f"efficientnetv2{key}"]
        assert entry.weights_base == efficientnet_v2.BASE_WEIGHTS_PATH
        hash_key = key if key.startswith("b") else f"-{key}"
        assert entry.weights_hash == efficientnet_v2.WEIGHTS_HASHES[hash_key][1]
    assert table["mobilenetv3small"].weights_base == mobilenet_v3.BASE_WEIGHT_PATH
    small = mobilenet_v3.WEIGHTS_HASHES["small_224_1.0_float"][1]
    assert table["mobilenetv3small"].weights_hash == small
    tiny = convnext.WEIGHTS_HASHES["convnext_tiny"][1]
    assert table["convnext_tiny"].weights_hash == tiny


# ---------------------------------------------------------------------------
# Model and head


def test_softmax_head(resnet):
    names = [layer.name for layer in resnet.layers]
    assert names == [
        "image", "preprocess", "backbone", "head_pool", "head_dense_0",
        "head_dropout_0", "head_output",
    ]  # fmt: skip
    assert resnet.input_shape == (None, 32, 32, 3)
    assert resnet.output_shape == (None, 10)
    assert isinstance(resnet.get_layer("head_pool"), keras.layers.Flatten)
    out = resnet.get_layer("head_output")
    assert out.activation is keras.activations.softmax
    assert out.dtype_policy.compute_dtype == "float32"
    probs = np.asarray(resnet(np.zeros((2, 32, 32, 3), "float32")))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_sigmoid_head(vgg_binary):
    assert vgg_binary.output_shape == (None, 1)
    assert isinstance(
        vgg_binary.get_layer("head_pool"), keras.layers.GlobalAveragePooling2D
    )
    assert vgg_binary.get_layer("head_output").activation is keras.activations.sigmoid
    assert "head_dropout_0" not in [layer.name for layer in vgg_binary.layers]


def test_image_size_below_minimum():
    with pytest.raises(ValueError, match=r"data\.image_size.*64.*inceptionv3.*75"):
        models.build_model(make_spec("inceptionv3", image_size=64))


def test_unknown_backbone_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        models.build_model(make_spec("resnet5"))


def test_param_counts(vgg_binary):
    counts = models.count_params(vgg_binary)
    assert counts["trainable"] + counts["non_trainable"] == vgg_binary.count_params()


# ---------------------------------------------------------------------------
# trainable_from


def _head_params(model) -> int:
    return sum(
        layer.count_params() for layer in model.layers if layer.name.startswith("head_")
    )


def _expected_trainable(model, first: str | None) -> int:
    """Params of non-BatchNorm backbone layers from `first` on, plus the head."""
    layers = model.get_layer("backbone").layers
    start = len(layers) if first is None else [x.name for x in layers].index(first)
    return _head_params(model) + sum(
        layer.count_params()
        for layer in layers[start:]
        if not isinstance(layer, keras.layers.BatchNormalization)
    )


@pytest.mark.parametrize(
    "requested, resolved, first",
    [
        ("none", "none", None),
        ("all", "all", "input_layer"),
        ("res5a_branch2a", "conv5_block1_1_conv", "conv5_block1_1_conv"),
        ("conv5", "conv5_block1_1_conv", "conv5_block1_1_conv"),
        ("conv5_block3_1_conv", "conv5_block3_1_conv", "conv5_block3_1_conv"),
    ],
)
def test_trainable_from_resnet(resnet, requested, resolved, first):
    if first == "input_layer":
        first = resnet.get_layer("backbone").layers[0].name
    assert models.set_trainable(resnet, "resnet50", requested) == resolved
    counts = models.count_params(resnet)
    assert counts["trainable"] == _expected_trainable(resnet, first)
    assert counts["trainable"] + counts["non_trainable"] == resnet.count_params()


def test_trainable_from_vgg_block5(vgg_binary):
    assert models.set_trainable(vgg_binary, "vgg16", "block5") == "block5_conv1"
    backbone = vgg_binary.get_layer("backbone")
    # Three 3x3 512->512 convolutions with biases, then the head.
    expected = 3 * (3 * 3 * 512 * 512 + 512) + _head_params(vgg_binary)
    assert models.count_params(vgg_binary)["trainable"] == expected
    assert not backbone.get_layer("block4_conv3").trainable
    assert backbone.get_layer("block5_conv1").trainable


def test_bad_trainable_from_suggests(resnet):
    with pytest.raises(ValueError, match="res5a_brnch2a") as e:
        models.set_trainable(resnet, "resnet50", "res5a_brnch2a")
    assert "res5a_branch2a" in str(e.value)
    assert "trainer layers --backbone=resnet50" in str(e.value)


def test_batchnorm_keeps_moving_stats_when_training(resnet):
    """Fine-tuning must not update BN statistics (Keras 3 ignores the nested
    training=False; set_trainable freezes BN instead)."""
    models.set_trainable(resnet, "resnet50", "all")
    bn = resnet.get_layer("backbone").get_layer("conv5_block3_3_bn")
    before = np.asarray(bn.moving_mean).copy()
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    resnet(x, training=True)
    np.testing.assert_array_equal(np.asarray(bn.moving_mean), before)


def test_legacy_aliases_deep_resnets():
    r101 = models.resnet_legacy_aliases(models.BACKBONES["resnet101"].legacy_blocks)
    assert r101["res4b22_branch2c"] == "conv4_block23_3_conv"
    assert r101["res3d_branch2a"] == "conv3_block4_1_conv"
    r152 = models.resnet_legacy_aliases(models.BACKBONES["resnet152"].legacy_blocks)
    assert r152["res3b7_branch2b"] == "conv3_block8_2_conv"
    assert r152["bn4b35_branch2a"] == "conv4_block36_1_bn"
    r50 = models.resnet_legacy_aliases(models.BACKBONES["resnet50"].legacy_blocks)
    assert r50["res4f_branch2b"] == "conv4_block6_2_conv"
    assert r50["res2a_branch1"] == "conv2_block1_0_conv"
    assert r50["bn_conv1"] == "conv1_bn"
    assert "res2b_branch1" not in r50  # Only first blocks have a projection.


def test_layer_table_shows_aliases_and_stages():
    rows = models.layer_table("resnet50", image_size=32)
    by_name = {r["name"]: r for r in rows}
    row = by_name["conv5_block1_1_conv"]
    assert row["aliases"] == ["res5a_branch2a"]
    assert row["new_stage"] and row["stage"] == "conv5"
    assert row["params"] == 1024 * 512 + 512
    assert [r["index"] for r in rows] == list(range(len(rows)))
    text = models.format_layer_table(rows)
    line = next(x for x in text.splitlines() if "conv5_block1_1_conv" in x)
    assert "res5a_branch2a" in line
    assert "--- stage conv5 ---" in text


# ---------------------------------------------------------------------------
# Weights


def test_imagenet_from_local_mirror_then_cache(offline, legacy_weights):
    folder, path, expected = legacy_weights
    model = models.build_model(
        make_spec(SMALL, weights="imagenet", weights_mirror=folder)
    )
    _assert_weights(model, expected)
    cached = os.path.join(offline, "keras_home", "models", os.path.basename(path))
    assert os.path.isfile(cached)
    # The next run finds the cache with no mirror at all.
    model = models.build_model(make_spec(SMALL, weights="imagenet"))
    _assert_weights(model, expected)


def test_imagenet_from_gcs_mirror(offline, legacy_weights, gcs_bucket, monkeypatch):
    _, path, expected = legacy_weights
    mirror = f"{gcs_bucket}/keras-weights"
    with open(path, "rb") as f:
        storage.write_bytes(storage.join(mirror, os.path.basename(path)), f.read())
    monkeypatch.setenv(models.MIRROR_ENV, mirror)
    model = models.build_model(make_spec(SMALL, weights="imagenet"))
    _assert_weights(model, expected)


def test_imagenet_all_sources_fail(offline):
    fname = models.weights_file_name(SMALL)
    empty = str(offline / "empty-mirror")
    os.makedirs(empty)
    with pytest.raises(models.WeightsError, match=fname) as e:
        models.build_model(make_spec(SMALL, weights="imagenet", weights_mirror=empty))
    message = str(e.value)
    assert f"{empty}/{fname}: no such file" in message
    assert "Keras cache" in message and "skipped" in message
    assert models.MIRROR_ENV in message and 'weights = "none"' in message


def test_weights_h5_url_loads_and_missing_raises(offline, legacy_weights):
    backbone = models.build_backbone(SMALL, 32)
    expected = [np.asarray(w) for w in backbone.weights]
    local = str(offline / "bb.weights.h5")
    backbone.save_weights(local)  # Keras 3 format.
    url = "memory://weights/bb.weights.h5"
    with open(local, "rb") as f:
        storage.write_bytes(url, f.read())
    _assert_weights(models.build_model(make_spec(SMALL, weights=url)), expected)
    # The legacy .h5 by URL (a plain path here) loads too.
    _, legacy, legacy_expected = legacy_weights
    _assert_weights(
        models.build_model(make_spec(SMALL, weights=legacy)), legacy_expected
    )
    missing = "memory://weights/nope.weights.h5"
    with pytest.raises(models.WeightsError, match=missing):
        models.build_model(make_spec(SMALL, weights=missing))


def test_weights_wrong_architecture(offline, legacy_weights):
    _, path, _ = legacy_weights
    with pytest.raises(models.WeightsError, match=r"does not fit backbone 'vgg16'"):
        models.build_model(make_spec("vgg16", weights=path))


def test_efficientnet_imagenet_rescaling_folded(offline, tmp_path):
    backbone = models.build_backbone("efficientnetb0", 32)
    norm = next(x for x in backbone.layers if isinstance(x, keras.layers.Normalization))
    norm.adapt_variance.assign([4.0, 9.0, 16.0])
    fname = models.weights_file_name("efficientnetb0")
    with h5py.File(tmp_path / fname, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    model = models.build_model(
        make_spec("efficientnetb0", weights="imagenet", weights_mirror=str(tmp_path))
    )
    loaded = next(
        x
        for x in model.get_layer("backbone").layers
        if isinstance(x, keras.layers.Normalization)
    )
    # Keras' imagenet build divides by sqrt(stddev) after the normalization.
    np.testing.assert_allclose(
        np.asarray(loaded.adapt_variance), [4 * 0.229, 9 * 0.224, 16 * 0.225], rtol=1e-6
    )


# ---------------------------------------------------------------------------
# Export, jit


def test_export_round_trip(tmp_path):
    model = models.build_model(make_spec("mobilenetv2", dense=(8,), dropout=0.2))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # safe_mode=True: no Lambda layers.
    assert loaded.get_layer("preprocess").mode == "tf"
    x = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6
    )


def test_jit_rule():
    assert models.jit_rule("none", "CPU") is False
    assert models.jit_rule("conv5", "cpu") is True
    assert models.jit_rule("all", "CPU") is True
    assert models.jit_rule("none", "GPU") is True
    assert models.jit_rule("none", "TPU") is True
    # No collectives in XLA's CPU backend: never on several CPU replicas.
    assert models.jit_rule("conv5", "CPU", replicas=2) is False
    assert models.jit_rule("conv5", "GPU", replicas=2) is True
    assert models.jit_unsupported("CPU", 1) is None
    assert "2 CPU replicas" in models.jit_unsupported("cpu", 2)
    with pytest.raises(ValueError, match="device_type='NPU'"):
        models.jit_rule("none", "NPU")

"""Backbones, preprocessing, the head, weights, trainable_from, checkpoint variables."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import re
import tempfile
from typing import Any, Callable, Mapping

from trainer import backend

backend.prepare_keras()  # Before Keras: picks its backend, mutes TensorFlow.

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from trainer import config, storage  # noqa: E402
from trainer.errors import CheckpointError, SpecError, WeightsError  # noqa: E402

# ---------------------------------------------------------------------------
# Backbone table

# Preprocessing modes, as in keras.applications.imagenet_utils.preprocess_input.
# "none": the Keras model already holds its own Rescaling/Normalization layers
# (EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3) and takes raw 0-255.
PREPROCESS_MODES = ("caffe", "tf", "torch", "none")

_TF_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_KERAS_APPS = "https://storage.googleapis.com/keras-applications/"


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One row of `BACKBONES`.

    Attributes:
      builder: the `keras.applications` constructor.
      preprocess: one of `PREPROCESS_MODES`, as the model's `preprocess_input`.
      min_size: the smallest image side the builder accepts (its
        `obtain_input_shape(min_size=...)`).
      weights_file: the no-top ImageNet file name as Keras caches it under
        `~/.keras/models/`; `{rows}` is filled by `weights_file_name`.
      weights_base: the folder URL Keras downloads that file from.
      weights_hash: the hash Keras checks it against ("" when Keras has none).
      legacy_blocks: ResNet v1 only: (stage, blocks) pairs, for the Caffe-style
        layer aliases (`res5a_branch2a`).
    """

    builder: Callable[..., keras.Model]
    preprocess: str
    min_size: int
    weights_file: str
    weights_base: str
    weights_hash: str = ""
    legacy_blocks: tuple[tuple[int, int], ...] = ()

    @property
    def weights_url(self) -> str:
        return self.weights_base + self.weights_file


# File names, URLs and hashes are those of keras/src/applications/*.py (Keras
# 3.15), so a mirror filled from a machine that ran plain Keras works here.
# MobileNetV2: one file per input side, and Keras has no hash for them.
BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone(
        keras.applications.ResNet50,
        "caffe",
        32,
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _TF_APPS + "resnet/",
        "4d473c1dd8becc155b73f8504c6f6626",
        legacy_blocks=((2, 3), (3, 4), (4, 6), (5, 3)),
    ),
    "resnet101": Backbone(
        keras.applications.ResNet101,
        "caffe",
        32,
        "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _TF_APPS + "resnet/",
        "88cf7a10940856eca736dc7b7e228a21",
        legacy_blocks=((2, 3), (3, 4), (4, 23), (5, 3)),
    ),
    "resnet152": Backbone(
        keras.applications.ResNet152,
        "caffe",
        32,
        "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _TF_APPS + "resnet/",
        "ee4c566cf9a93f14d82f913c2dc6dd0c",
        legacy_blocks=((2, 3), (3, 8), (4, 36), (5, 3)),
    ),
    "resnet50v2": Backbone(
        keras.applications.ResNet50V2,
        "tf",
        32,
        "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _TF_APPS + "resnet/",
        "fac2f116257151a9d068a22e544a4917",
    ),
    "resnet101v2": Backbone(
        keras.applications.ResNet101V2,
        "tf",
        32,
        "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _TF_APPS + "resnet/",
        "c0ed64b8031c3730f411d2eb4eea35b5",
    ),
    "resnet152v2": Backbone(
        keras.applications.ResNet152V2,
        "tf",
        32,
        "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _TF_APPS + "resnet/",
        "ed17cf2e0169df9d443503ef94b23b33",
    ),
    "vgg16": Backbone(
        keras.applications.VGG16,
        "caffe",
        32,
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _TF_APPS + "vgg16/",
        "6d6bbae143d832006294945121d1f1fc",
    ),
    "vgg19": Backbone(
        keras.applications.VGG19,
        "caffe",
        32,
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _TF_APPS + "vgg19/",
        "253f8cb515780f3b799900260a226db6",
    ),
    "mobilenetv2": Backbone(
        keras.applications.MobileNetV2,
        "tf",
        32,
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5",
        _TF_APPS + "mobilenet_v2/",
    ),
    "mobilenetv3small": Backbone(
        keras.applications.MobileNetV3Small,
        "none",
        32,
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        _TF_APPS + "mobilenet_v3/",
        "d3e8ec802a04aa4fc771ee12a9a9b836",
    ),
    "mobilenetv3large": Backbone(
        keras.applications.MobileNetV3Large,
        "none",
        32,
        "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        _TF_APPS + "mobilenet_v3/",
        "07fb09a5933dd0c8eaafa16978110389",
    ),
    "efficientnetb0": Backbone(
        keras.applications.EfficientNetB0,
        "none",
        32,
        "efficientnetb0_notop.h5",
        _KERAS_APPS,
        "50bc09e76180e00e4465e1a485ddc09d",
    ),
    "efficientnetb1": Backbone(
        keras.applications.EfficientNetB1,
        "none",
        32,
        "efficientnetb1_notop.h5",
        _KERAS_APPS,
        "74c4e6b3e1f6a1eea24c589628592432",
    ),
    "efficientnetb2": Backbone(
        keras.applications.EfficientNetB2,
        "none",
        32,
        "efficientnetb2_notop.h5",
        _KERAS_APPS,
        "111f8e2ac8aa800a7a99e3239f7bfb39",
    ),
    "efficientnetb3": Backbone(
        keras.applications.EfficientNetB3,
        "none",
        32,
        "efficientnetb3_notop.h5",
        _KERAS_APPS,
        "af6d107764bb5b1abb91932881670226",
    ),
    "efficientnetb4": Backbone(
        keras.applications.EfficientNetB4,
        "none",
        32,
        "efficientnetb4_notop.h5",
        _KERAS_APPS,
        "ebc24e6d6c33eaebbd558eafbeedf1ba",
    ),
    "efficientnetb5": Backbone(
        keras.applications.EfficientNetB5,
        "none",
        32,
        "efficientnetb5_notop.h5",
        _KERAS_APPS,
        "38879255a25d3c92d5e44e04ae6cec6f",
    ),
    "efficientnetb6": Backbone(
        keras.applications.EfficientNetB6,
        "none",
        32,
        "efficientnetb6_notop.h5",
        _KERAS_APPS,
        "9ecce42647a20130c1f39a5d4cb75743",
    ),
    "efficientnetb7": Backbone(
        keras.applications.EfficientNetB7,
        "none",
        32,
        "efficientnetb7_notop.h5",
        _KERAS_APPS,
        "cbcfe4450ddf6f3ad90b1b398090fe4a",
    ),
    "efficientnetv2b0": Backbone(
        keras.applications.EfficientNetV2B0,
        "none",
        32,
        "efficientnetv2-b0_notop.h5",
        _TF_APPS + "efficientnet_v2/",
        "893217f2bb855e2983157299931e43ff",
    ),
    "efficientnetv2b1": Backbone(
        keras.applications.EfficientNetV2B1,
        "none",
        32,
        "efficientnetv2-b1_notop.h5",
        _TF_APPS + "efficientnet_v2/",
        "0e80663031ca32d657f9caa404b6ec37",
    ),
    "efficientnetv2b2": Backbone(
        keras.applications.EfficientNetV2B2,
        "none",
        32,
        "efficientnetv2-b2_notop.h5",
        _TF_APPS + "efficientnet_v2/",
        "1dfe2e7a5d45b6632553a8961ea609eb",
    ),
    "efficientnetv2b3": Backbone(
        keras.applications.EfficientNetV2B3,
        "none",
        32,
        "efficientnetv2-b3_notop.h5",
        _TF_APPS + "efficientnet_v2/",
        "f6abf7b5849ac99a89b50dd3fd532856",
    ),
    "efficientnetv2s": Backbone(
        keras.applications.EfficientNetV2S,
        "none",
        32,
        "efficientnetv2-s_notop.h5",
        _TF_APPS + "efficientnet_v2/",
        "af0682fb74e8c54910f2d4393339c070",
    ),
    "convnext_tiny": Backbone(
        keras.applications.ConvNeXtTiny,
        "none",
        32,
        "convnext_tiny_notop.h5",
        _TF_APPS + "convnext/",
        "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
    ),
    "densenet121": Backbone(
        keras.applications.DenseNet121,
        "torch",
        32,
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _TF_APPS + "densenet/",
        "30ee3e1110167f948a6b9946edeeb738",
    ),
    "inceptionv3": Backbone(
        keras.applications.InceptionV3,
        "tf",
        75,
        "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _TF_APPS + "inception_v3/",
        "bcbd6486424b2319ff4ef7d526e38f63",
    ),
    "xception": Backbone(
        keras.applications.Xception,
        "tf",
        71,
        "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _TF_APPS + "xception/",
        "b0042744bf5b25fce3cb969f33bebb97",
    ),
}


def get_backbone(name: str) -> Backbone:
    """The table row for `name`.

    Raises:
      ValueError: an unknown name, with a did-you-mean and the choices.
    """
    if name in BACKBONES:
        return BACKBONES[name]
    close = difflib.get_close_matches(name.lower(), BACKBONES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise SpecError(
        f"model.backbone: received {name!r}{hint} (choices: {', '.join(BACKBONES)})"
    )


def weights_file_name(backbone: str, image_size: int = 224) -> str:
    """The no-top ImageNet weights file Keras uses for `backbone`.

    MobileNetV2 has one file per input side in (96, 128, 160, 192, 224); any
    other side gets the 224 file, as Keras does.
    """
    entry = get_backbone(backbone)
    rows = image_size if image_size in (96, 128, 160, 192, 224) else 224
    return entry.weights_file.format(rows=rows)


# ---------------------------------------------------------------------------
# Preprocessing inside the model

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="trainer")
class Preprocess(keras.layers.Layer):
    """`preprocess_input` of a backbone, as a layer: raw 0-255 RGB in.

    Living inside the model (not in the input pipeline) means the exported
    `model.keras` takes plain pixels, and unlike a `Lambda` it loads in safe mode.
    """

    def __init__(self, mode: str = "none", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(
                f"Preprocess: received mode={mode!r}; expected one of "
                f"{', '.join(PREPROCESS_MODES)}"
            )
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            # RGB -> BGR, then the ImageNet mean per BGR channel, no scaling.
            return ops.flip(x, axis=-1) - ops.array(_CAFFE_MEAN_BGR, x.dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.array(_TORCH_MEAN, x.dtype)
            std = ops.array(_TORCH_STD, x.dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


# ---------------------------------------------------------------------------
# Pretrained weights


NO_DOWNLOAD_ENV = "TRAINER_WEIGHTS_NO_DOWNLOAD"
MIRROR_ENV = "TRAINER_WEIGHTS_MIRROR"


def keras_cache_dir() -> str:
    """`$KERAS_HOME/models`, else `~/.keras/models`, read at call time.

    Keras reads KERAS_HOME once at import; reading it here lets a job (or a
    test) point it elsewhere later.
    """
    base = os.environ.get("KERAS_HOME")
    if not base:
        home = os.path.expanduser("~")
        # Keras falls back to /tmp when the home folder is read-only.
        base = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    return os.path.join(os.path.expanduser(base), "models")


def resolve_imagenet_weights(
    backbone: str, image_size: int = 224, mirror: str = ""
) -> str:
    """Finds the no-top ImageNet file for `backbone`; returns its local path.

    Looks in order in the Keras cache, the mirror (`mirror`, else
    $TRAINER_WEIGHTS_MIRROR; copied into the cache so the next run finds it
    there) and Keras' own download (off when $TRAINER_WEIGHTS_NO_DOWNLOAD is
    set, for offline machines and tests).

    Args:
      backbone: a `BACKBONES` key.
      image_size: the input side (picks MobileNetV2's file).
      mirror: any fsspec URL of a folder holding Keras' weight files.

    Raises:
      WeightsError: every source failed; names the file, each source and why.
    """
    entry = get_backbone(backbone)
    fname = weights_file_name(backbone, image_size)
    cache_dir = keras_cache_dir()
    cached = os.path.join(cache_dir, fname)
    if os.path.isfile(cached):
        return cached
    tried = [f"Keras cache {cached}: not there"]

    found = _from_mirror(mirror or os.environ.get(MIRROR_ENV, ""), fname, tried)
    found = found or _keras_download(entry, fname, cache_dir, tried)
    if found:
        return found
    lines = "\n".join(f"  - {t}" for t in tried)
    raise WeightsError(
        f"model.weights: 'imagenet' weights for backbone {backbone!r} need the "
        f"file {fname}, and no source had it:\n{lines}\n"
        f"Remedy: put {fname} in a folder (local or gs://...) and set "
        f"${MIRROR_ENV} or model.weights_mirror to that folder, or use "
        'model.weights = "none" to train from scratch.'
    )


def _from_mirror(mirror: str, fname: str, tried: list[str]) -> str | None:
    """The file copied from the mirror into the Keras cache; None, noted in `tried`."""
    if not mirror:
        tried.append(f"mirror: none set (model.weights_mirror or ${MIRROR_ENV})")
        return None
    url = storage.join(mirror, fname)
    cached = os.path.join(keras_cache_dir(), fname)
    try:
        _copy_into(url, cached)
        return cached
    except FileNotFoundError:
        tried.append(f"mirror {url}: no such file")
    except Exception as e:  # Any backend error: report it and go on.
        tried.append(f"mirror {url}: {type(e).__name__}: {e}")
    return None


def _keras_download(entry, fname: str, cache_dir: str, tried: list[str]) -> str | None:
    """Keras' own download of the file; None, noted in `tried`."""
    url = entry.weights_base + fname
    if os.environ.get(NO_DOWNLOAD_ENV):
        tried.append(f"Keras download {url}: skipped (${NO_DOWNLOAD_ENV} is set)")
        return None
    try:
        return keras.utils.get_file(
            fname,
            url,
            cache_dir=os.path.dirname(cache_dir),
            cache_subdir="models",
            file_hash=entry.weights_hash or None,
        )
    except Exception as e:  # No network, a proxy, a bad hash: all the same.
        tried.append(f"Keras download {url}: {type(e).__name__}: {e}")
        return None


def _copy_into(url: str, local: str) -> None:
    """Copies `url` to `local` so that `local` is whole or absent."""
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(local), prefix=".tmp-")
    os.close(fd)
    try:
        storage.get(url, tmp)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_weights_file(backbone: keras.Model, url: str, backbone_name: str) -> None:
    """Loads a weights file from any fsspec URL into `backbone`.

    `.h5` is the legacy format (keras.applications' files, Keras 2), read in
    layer order; `.weights.h5` is Keras 3's.

    Raises:
      WeightsError: the file is missing, or does not fit the architecture.
    """
    if url.endswith(".weights.h5"):
        suffix = ".weights.h5"
    elif url.endswith(".h5"):
        suffix = ".h5"
    else:
        raise WeightsError(
            f"model.weights: received {url!r}; expected 'imagenet', 'none' or the "
            "URL of a .h5 / .weights.h5 file"
        )
    if storage.is_local(url):
        path = storage.local_path(url)
        if not os.path.isfile(path):
            raise WeightsError(f"model.weights: no such file {url}")
        _load(backbone, path, url, backbone_name)
        return
    # Keras loads from a local path only; fetch into a temp file first. The
    # suffix matters: it picks the legacy or the Keras 3 reader.
    with tempfile.TemporaryDirectory(prefix="trainer-weights-") as tmp:
        path = os.path.join(tmp, "weights" + suffix)
        try:
            storage.get(url, path)
        except FileNotFoundError:
            raise WeightsError(f"model.weights: no such file {url}") from None
        except Exception as e:
            raise WeightsError(
                f"model.weights: could not read {url} ({type(e).__name__}: {e})"
            ) from None
        _load(backbone, path, url, backbone_name)


def _load(backbone: keras.Model, path: str, source: str, backbone_name: str) -> None:
    try:
        # A legacy .h5 loads in layer order (Keras' load_weights_from_hdf5_group
        # matches the n-th layer with weights to the n-th saved layer).
        backbone.load_weights(path)
    except Exception as e:  # h5py, shape and count mismatches all mean "wrong file".
        raise WeightsError(
            f"model.weights: {source} does not fit backbone {backbone_name!r} "
            f"({type(e).__name__}: {e}); was it saved from a no-top "
            f"{backbone_name}?"
        ) from None


def _fix_efficientnet_imagenet(backbone: keras.Model) -> None:
    """Folds EfficientNet B0-B7's extra ImageNet rescaling into Normalization.

    Keras builds EfficientNet with one more layer when `weights="imagenet"`:
    `Rescaling(1/sqrt(stddev))` after `Normalization` (see
    tensorflow/tensorflow#49930). We build with `weights=None` and load the file
    ourselves, so that layer is missing; (x - m) / sqrt(v) / sqrt(s) equals
    (x - m) / sqrt(v * s), so scaling the loaded variance by the stddev gives
    the same function without changing the architecture.
    """
    stddev = np.array(_TORCH_STD, dtype="float32")
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.adapt_variance.assign(np.asarray(layer.adapt_variance) * stddev)
            layer.finalize_state()
            return


# ---------------------------------------------------------------------------
# The model


def build_backbone(name: str, image_size: int) -> keras.Model:
    """A randomly initialised no-top backbone, a nested model named "backbone".

    Raises:
      ValueError: unknown name, or `image_size` under the backbone's minimum.
    """
    entry = get_backbone(name)
    if image_size < entry.min_size:
        raise SpecError(
            f"data.image_size: received {image_size}; backbone {name!r} needs at "
            f"least {entry.min_size} (its smallest accepted input side)"
        )
    backbone = entry.builder(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3)
    )
    # Renamed after the build: EfficientNetV2 looks its config up by `name`.
    backbone.name = "backbone"
    return backbone


def build_model(spec: config.JobSpec) -> keras.Model:
    """Raw pixels -> Preprocess -> backbone -> head, with weights per `spec`.

    Args:
      spec: the job spec; reads `model.*`, `data.image_size`, `data.num_classes`.

    Returns:
      An uncompiled model: input "image" (S, S, 3) float32 in 0-255; output
      softmax over `num_classes`, or one sigmoid unit when `num_classes == 1`.

    Raises:
      ValueError: unknown backbone, or image size under its minimum.
      WeightsError: pretrained weights missing or not fitting.
    """
    m, size = spec.model, spec.data.image_size
    entry = get_backbone(m.backbone)
    backbone = build_backbone(m.backbone, size)
    if m.weights == "imagenet":
        path = resolve_imagenet_weights(m.backbone, size, m.weights_mirror)
        _load(backbone, path, path, m.backbone)
        if m.backbone.startswith("efficientnetb"):
            _fix_efficientnet_imagenet(backbone)
    elif m.weights != "none":
        load_weights_file(backbone, m.weights, m.backbone)

    inputs = keras.Input(shape=(size, size, 3), dtype="float32", name="image")
    # float32 even under a mixed policy: the caffe mean is subtracted from
    # values up to 255, and the backbone casts to its compute dtype anyway.
    x = Preprocess(entry.preprocess, name="preprocess", dtype="float32")(inputs)
    # training=False, as in the Keras transfer-learning guide. NOTE: in Keras 3
    # an outer model(x, training=True) overrides it (keras-team/keras#20285;
    # checked here), so `set_trainable` also freezes BatchNormalization layers.
    x = backbone(x, training=False)
    if m.pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    else:
        x = keras.layers.Flatten(name="head_pool")(x)
    for i, units in enumerate(m.dense):
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense_{i}")(x)
        if m.dropout > 0:
            x = keras.layers.Dropout(m.dropout, name=f"head_dropout_{i}")(x)
    if not m.dense and m.dropout > 0:
        x = keras.layers.Dropout(m.dropout, name="head_dropout_0")(x)
    # The output stays float32 under mixed precision (Keras mixed-precision
    # guide): softmax/sigmoid and the loss in float16 lose precision.
    n = spec.data.num_classes
    if n == 1:
        out = keras.layers.Dense(1, "sigmoid", dtype="float32", name="head_output")
    else:
        out = keras.layers.Dense(n, "softmax", dtype="float32", name="head_output")
    return keras.Model(inputs, out(x), name="classifier")


# The model as two computations, for cached features (feature_cache.py):
# backbone_features(images) then apply_head(features) is model(images), with
# the model's own layers and variables, so a phase trained on cached features
# leaves a normal checkpoint of the whole model.


def backbone_features(model: keras.Model, images):
    """Preprocess and backbone, in inference mode: what the head sees."""
    x = model.get_layer("preprocess")(images)
    return model.get_layer("backbone")(x, training=False)


def head_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers after the backbone (pooling, dense, dropout, output), in order."""
    layers = model.layers
    return layers[layers.index(model.get_layer("backbone")) + 1 :]


def apply_head(model: keras.Model, features, training: bool = False):
    """The head on backbone features: the model's output for those images."""
    x = features
    for layer in head_layers(model):
        x = layer(x, training=training)
    return x


def feature_shape(model: keras.Model) -> tuple[int, ...]:
    """Shape of one image's backbone output (e.g. (1, 1, 2048) at 32 px)."""
    return tuple(int(d) for d in model.get_layer("backbone").output.shape[1:])


def training_dependent_layers(model: keras.Model) -> list[str]:
    """Backbone layers that compute differently in training: not cacheable.

    Dropout-like layers (EfficientNet's, ConvNeXt's stochastic depth) still
    drop when the outer model is called with training=True, even frozen;
    frozen BatchNormalization runs in inference mode and is fine.
    """
    noisy = ("Dropout", "Noise", "StochasticDepth")
    return [
        layer.name
        for layer in model.get_layer("backbone").layers
        if any(n in type(layer).__name__ for n in noisy)
    ]


def backbone_digest(model: keras.Model) -> str:
    """A hash of every backbone variable's value (weights, BatchNorm statistics)."""
    digest = hashlib.blake2b(digest_size=16)
    for v in model.get_layer("backbone").variables:
        digest.update(v.path.encode())
        digest.update(np.ascontiguousarray(ops.convert_to_numpy(v)).tobytes())
    return digest.hexdigest()


def count_params(model: keras.Model) -> dict[str, int]:
    """`{"trainable": N, "non_trainable": M}` parameter counts of `model`."""

    def total(weights) -> int:
        return int(sum(int(np.prod(w.shape)) for w in weights))

    return {
        "trainable": total(model.trainable_weights),
        "non_trainable": total(model.non_trainable_weights),
    }


# ---------------------------------------------------------------------------
# trainable_from: layer names, legacy aliases and stage shorthands


def resnet_legacy_aliases(blocks: tuple[tuple[int, int], ...]) -> dict[str, str]:
    """Caffe-style ResNet v1 layer names (original Keras) -> Keras 3 names.

    `res{s}{b}_branch{1|2a|2b|2c}` -> `conv{s}_block{n}_{0|1|2|3}_conv` and
    `bn{s}{b}_branch...` -> `..._bn`; `conv1` -> `conv1_conv`, `bn_conv1` ->
    `conv1_bn`. Block `b` is a letter (a, b, c, ...) in stages of up to 6 blocks,
    else `a`, `b1`, `b2`, ... as in the Caffe ResNet-101/152 (res4b22, res4b35).

    Args:
      blocks: (stage, number of blocks) pairs, e.g. ((2, 3), (3, 4), ...).
    """
    aliases = {"conv1": "conv1_conv", "bn_conv1": "conv1_bn"}
    branches = (("1", 0), ("2a", 1), ("2b", 2), ("2c", 3))
    for stage, count in blocks:
        for n in range(1, count + 1):
            if count <= 6:
                letter = "abcdef"[n - 1]
            else:
                letter = "a" if n == 1 else f"b{n - 1}"
            for branch, k in branches:
                if branch == "1" and n != 1:
                    continue  # Only the first block has a projection shortcut.
                for old, new in (("res", "conv"), ("bn", "bn")):
                    aliases[f"{old}{stage}{letter}_branch{branch}"] = (
                        f"conv{stage}_block{n}_{k}_{new}"
                    )
    return aliases


def _aliases_for(backbone_name: str, names: list[str]) -> dict[str, str]:
    blocks = get_backbone(backbone_name).legacy_blocks
    present = set(names)
    return {a: c for a, c in resnet_legacy_aliases(blocks).items() if c in present}


def resolve_layer_name(
    names: list[str], backbone_name: str, trainable_from: str
) -> str:
    """The backbone layer `trainable_from` names.

    Tried in order: an exact layer name; a legacy alias (`res5a_branch2a`); a
    prefix of layer names, which picks the FIRST layer in the backbone's order
    whose name starts with it, preferring a match at a `_` boundary (`conv5` ->
    `conv5_block1_1_conv` in ResNets, `block5` -> `block5_conv1` in VGG,
    `block6` -> `block6a_expand_conv` in EfficientNet).

    Args:
      names: the backbone's layer names in order.
      backbone_name: the `BACKBONES` key (for aliases and messages).
      trainable_from: the requested name.

    Raises:
      ValueError: nothing matches; lists the 5 closest names and aliases.
    """
    if trainable_from in names:
        return trainable_from
    aliases = _aliases_for(backbone_name, names)
    if trainable_from in aliases:
        return aliases[trainable_from]
    for prefix in (trainable_from + "_", trainable_from):
        for name in names:
            if name.startswith(prefix):
                return name
    close = difflib.get_close_matches(
        trainable_from, [*names, *aliases], n=5, cutoff=0.5
    )
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise SpecError(
        f"trainable_from: received {trainable_from!r}, which is not a layer, alias "
        f'or stage of backbone {backbone_name!r}{hint}. Expected "none", "all" '
        f"or a layer name: run `trainer layers --backbone={backbone_name}`"
    )


def set_trainable(model: keras.Model, backbone_name: str, trainable_from: str) -> str:
    """Sets which backbone layers train for a phase; the head always trains.

    Args:
      model: a model from `build_model` (holds a nested "backbone").
      backbone_name: its `BACKBONES` key.
      trainable_from: "none" (backbone frozen), "all", or a layer name, legacy
        alias or stage prefix: that layer and every later one (in the backbone's
        layer order) train; the earlier ones are frozen.

    Returns:
      "none", "all" or the canonical layer name it resolved to.

    Raises:
      ValueError: `trainable_from` matches nothing (the caller prefixes the
        `phases.NAME.trainable_from` key).
    """
    backbone = model.get_layer("backbone")
    for layer in model.layers:
        if layer.name.startswith("head_"):
            layer.trainable = True
    if trainable_from == "none":
        backbone.trainable = False
        return "none"
    names = [layer.name for layer in backbone.layers]
    resolved = (
        "all"
        if trainable_from == "all"
        else resolve_layer_name(names, backbone_name, trainable_from)
    )
    start = 0 if resolved == "all" else names.index(resolved)
    backbone.trainable = True  # A frozen parent hides its children's weights.
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= start
        # BatchNormalization stays frozen even inside the trainable range: in
        # Keras 3 a non-trainable BN runs in inference mode (moving statistics,
        # no updates) whatever `training` says, which is what fine-tuning on a
        # small set needs (Keras transfer-learning guide). The backbone's
        # `training=False` call alone does not do it in Keras 3: the outer
        # model's training=True overrides it (keras-team/keras#20285). The cost:
        # BN gamma/beta do not fine-tune.
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return resolved


# ---------------------------------------------------------------------------
# `trainer layers`

_STAGE = re.compile(r"^([A-Za-z]+_?\d+)")


def _stage(layer: keras.layers.Layer) -> str | None:
    """`conv5` for `conv5_block1_1_conv`, `block5` for `block5_conv1`, ...

    EfficientNet blocks (`block6a_...`) fall in stage `block6`. Names Keras made
    up (`conv2d_7`, `activation_3` in InceptionV3) are no stage.
    """
    cls = type(layer).__name__
    snake = re.sub(
        "([a-z])([A-Z])", r"\1_\2", re.sub("(.)([A-Z][a-z]+)", r"\1_\2", cls)
    )
    if re.fullmatch(re.escape(snake.lower()) + r"(_\d+)?", layer.name):
        return None
    m = _STAGE.match(layer.name)
    return m.group(1) if m else None


def layer_table(backbone_name: str, image_size: int = 224) -> list[dict[str, Any]]:
    """One row per backbone layer, in order, for `trainer layers`.

    Rows: `index`, `name`, `class_name`, `params`, `aliases` (legacy names of
    this layer), `stage` and `new_stage` (true where a new stage begins). Built
    with random weights (no download).
    """
    backbone = build_backbone(backbone_name, image_size)
    names = [layer.name for layer in backbone.layers]
    by_canonical: dict[str, list[str]] = {}
    for alias, canonical in _aliases_for(backbone_name, names).items():
        by_canonical.setdefault(canonical, []).append(alias)
    rows, last_stage = [], None
    for i, layer in enumerate(backbone.layers):
        stage = _stage(layer)
        new_stage = stage is not None and stage != last_stage
        if stage is not None:
            last_stage = stage
        rows.append(
            {
                "index": i,
                "name": layer.name,
                "class_name": type(layer).__name__,
                "params": int(layer.count_params()) if layer.built else 0,
                "aliases": by_canonical.get(layer.name, []),
                "stage": stage,
                "new_stage": new_stage,
            }
        )
    return rows


def format_layer_table(rows: list[dict[str, Any]]) -> str:
    """The text `trainer layers` prints: a line per layer, a rule per stage."""
    width = max([len(r["name"]) for r in rows] + [4])
    cls_width = max([len(r["class_name"]) for r in rows] + [5])
    head = (
        f"{'#':>4}  {'name':<{width}}  {'class':<{cls_width}}  {'params':>10}  aliases"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["new_stage"]:
            lines.append(f"{'':>4}  --- stage {r['stage']} ---")
        alias = ", ".join(r["aliases"])
        lines.append(
            f"{r['index']:>4}  {r['name']:<{width}}  {r['class_name']:<{cls_width}}  "
            f"{r['params']:>10,}  {alias}".rstrip()
        )
    total = sum(r["params"] for r in rows)
    lines.append(f"total parameters: {total:,}")
    lines.append(
        'trainable_from takes a name, an alias or a stage prefix ("conv5"): '
        "that layer and all below it in this list train."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# jit_compile = "auto"


def jit_rule(trainable_from: str, device_type: str, replicas: int = 1) -> bool:
    """Whether `jit_compile = "auto"` turns XLA on for a phase.

    A fixed rule, never timing, so two runs of one spec compute the same way.
    Figures (design.md, ResNet50 32x32, batch 64, this 2-core CPU, images/s):
    frozen backbone 674 without XLA vs 112 with (6x slower); from conv5_block1
    18 vs 85 (4.6x faster); from conv4 13 vs 51. TF's CPU conv weight-gradient
    kernels are slow on small maps, and XLA's are not. Never on more than one
    CPU replica: see `jit_unsupported`.

    Args:
      trainable_from: the phase's `trainable_from` ("none" = backbone frozen).
      device_type: "CPU", "GPU" or "TPU" (case-insensitive).
      replicas: replicas in sync (devices times workers).
    """
    device = device_type.upper()
    if device not in ("CPU", "GPU", "TPU"):
        raise ValueError(
            f"jit_rule: received device_type={device_type!r}; expected CPU, GPU or TPU"
        )
    if jit_unsupported(device, replicas):
        return False
    if device == "CPU":
        return trainable_from != "none"
    return True  # GPUs gain from XLA; TPUs run compiled programs only.


def jit_unsupported(device_type: str, replicas: int) -> str | None:
    """Why XLA cannot compile the training step here; None when it can.

    The compiled step holds the cross-replica gradient reduction (the
    optimizer's all-reduce under a distribution strategy), and XLA's CPU
    backend has no collectives: two CPU replicas fail with "Collectives are
    not yet implemented for CPU devices when compiling with XLA" (two worker
    processes), or with a variable read from another replica's device (two
    logical CPUs in one process).
    """
    if device_type.upper() == "CPU" and replicas > 1:
        return (
            f"XLA's CPU backend has no cross-replica collectives, and this run "
            f"has {replicas} CPU replicas"
        )
    return None


# ---------------------------------------------------------------------------
# Checkpoint variables: Keras 3 model and optimizer state <-> {key: array}


def _keyed_variables(
    model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None
) -> dict[str, Any]:
    """Unique keys, stable across processes, for the variables to checkpoint.

    Model variables are keyed by their Keras path ("model/conv1_conv/kernel").
    Seed-generator states are named from a global counter (seed_generator_3),
    which depends on what else the process built, so they are keyed by their
    order instead. Optimizer variables drop the optimizer's own name (adam,
    adam_1, ...) for the same reason. The learning rate is left out: it comes
    from the job spec, which a resume may change. Remaining duplicates get
    `#1`, `#2` in variable order.
    """
    keyed: dict[str, Any] = {}

    def add(key: str, variable) -> None:
        unique, n = key, 0
        while unique in keyed:
            n += 1
            unique = f"{key}#{n}"
        keyed[unique] = variable

    seeds = 0
    for v in model.variables:
        if v.path.rsplit("/", 1)[-1] == "seed_generator_state":
            add(f"model/seed_generator_state/{seeds}", v)
            seeds += 1
        else:
            add(f"model/{v.path}", v)
    if optimizer is not None:
        for v in optimizer.variables:
            path = v.path.split("/", 1)[-1]
            if path == "learning_rate":
                continue
            add(f"optimizer/{path}", v)
    return keyed


def snapshot_variables(
    model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None
) -> dict[str, np.ndarray]:
    """Host copies of every model (and optimizer) variable, by stable key.

    Includes non-trainable state (BatchNorm statistics, seed generators) and
    the optimizer's iteration counter and slots (Adam's momentum, velocity).

    Args:
      model: the model.
      optimizer: its optimizer, or None to leave the optimizer's state out.

    Returns:
      {key: array}, fresh arrays the training can no longer change.
    """
    return {
        key: np.asarray(value)
        for key, value in device_snapshot(model, optimizer).items()
    }


def device_snapshot(
    model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None
) -> dict[str, Any]:
    """`snapshot_variables` without the host copy: what a checkpoint takes.

    On TensorFlow the values are reads of the variables: immutable tensors
    (a later update of a variable whose buffer a read still holds writes to
    a new buffer, in eager, graph and XLA steps alike), so they stay exact
    while `np.asarray` copies them to the host later, in the checkpoint's
    background thread. Reading 749 ResNet50 + Adam variables takes ~25 ms;
    the host copy it defers (307 MB, and page faults on fresh memory) took
    most of the 0.2-0.35 s the loop was blocked per checkpoint. Elsewhere
    (JAX: a train step may donate, and so delete, the buffers a snapshot
    holds) the values are host arrays, fetched in one batched transfer.

    Returns:
      {key: numpy array or immutable tensor}; `np.asarray` of each value is
      the variable's value at the call.
    """
    keyed = _keyed_variables(model, optimizer)
    if keras.backend.backend() == "tensorflow":
        return {key: _tf_read(v.value) for key, v in keyed.items()}
    values = [v.value for v in keyed.values()]
    if keras.backend.backend() == "jax":
        import jax

        values = jax.device_get(values)  # Starts every transfer, then waits.
    # np.array copies: a host value may share memory with a live buffer.
    return {
        key: np.array(ops.convert_to_numpy(value), copy=True)
        for key, value in zip(keyed, values, strict=True)
    }


def _tf_read(variable):
    """A read of a tf.Variable (mirrored or not) as an immutable tensor."""
    read = getattr(variable, "read_value", None)
    if read is None:  # Already a tensor.
        return variable
    return read()


def assign_variables(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer | None,
    arrays: Mapping[str, np.ndarray],
) -> None:
    """Assigns `arrays` (from `snapshot_variables` or a restore) to the variables.

    Build the optimizer first (`optimizer.build(model.trainable_variables)`)
    with the same trainable variables as when the checkpoint was saved.

    Args:
      model: the model to assign to.
      optimizer: its built optimizer, or None to assign the model's variables
        only (then `arrays` holds no `optimizer/` keys).
      arrays: {key: array}, one for every variable.

    Raises:
      CheckpointError: naming missing, unexpected and shape- or dtype-mismatched
        keys; nothing is assigned then.
    """
    keyed = _keyed_variables(model, optimizer)
    arrays = {k: _integers_as(keyed.get(k), a) for k, a in arrays.items()}
    problems = _mismatches(keyed, arrays)
    if problems:
        raise CheckpointError(f"checkpoint does not match the model: {problems}")
    for key, v in keyed.items():
        v.assign(arrays[key])


def _integers_as(variable, array: np.ndarray) -> np.ndarray:
    """An integer array in the variable's integer dtype, when every value fits.

    The backends keep counters in other widths (Keras on TensorFlow: int64
    optimizer iterations and seed-generator states; on JAX without x64: int32
    and uint32), so a checkpoint written on one resumes on the other.
    """
    if variable is None:
        return array
    dtype = np.dtype(variable.dtype)
    if dtype == array.dtype or not (
        np.issubdtype(dtype, np.integer) and np.issubdtype(array.dtype, np.integer)
    ):
        return array
    cast = array.astype(dtype)
    return cast if np.array_equal(cast, array) else array


def _mismatches(keyed: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """What keeps `arrays` from being assigned to `keyed`; "" when nothing."""
    missing = sorted(set(keyed) - set(arrays))
    extra = sorted(set(arrays) - set(keyed))
    mismatched = []
    for key in sorted(set(keyed) & set(arrays)):
        v, a = keyed[key], arrays[key]
        if tuple(v.shape) != tuple(a.shape) or np.dtype(v.dtype) != a.dtype:
            mismatched.append(
                f"{key} (variable {tuple(v.shape)} {np.dtype(v.dtype).name}, "
                f"checkpoint {tuple(a.shape)} {a.dtype.name})"
            )

    def listing(label: str, items: list[str]) -> str:
        shown = ", ".join(items[:10]) + (" ..." if len(items) > 10 else "")
        return f"{len(items)} {label}: {shown}" if items else ""

    parts = [
        listing("missing from the checkpoint", missing),
        listing("in the checkpoint but not in the model/optimizer", extra),
        listing("with another shape or dtype", mismatched),
    ]
    message = "; ".join(p for p in parts if p)
    if any(k.startswith("optimizer/") for k in missing + extra):
        message += (
            " (build the optimizer for the checkpoint's phase first: "
            "optimizer.build(model.trainable_variables))"
        )
    return message

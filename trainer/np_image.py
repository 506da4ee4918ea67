"""The tf.data path's image ops in numpy and Pillow: decode, resize, augment.

What `input_pipeline._decode_fn` computes with TensorFlow, computed without it
for `np_input`: the same bilinear resize (half-pixel centres, no antialias,
float32, in TensorFlow's order of operations), the same rounding to uint8, and
the same augmentation streams: TensorFlow's stateless random ops are
Philox-4x32-10 keyed by the seed, which is re-implemented here, so
`(seed, epoch, record id)` picks the same flips and crops (tests/test_np_input.py
checks them against TensorFlow pixel for pixel).

Decoding is Pillow's. PNG (and other lossless formats) decode to the same
pixels as `tf.io.decode_image`. TensorFlow decodes JPEG with libjpeg-turbo's
fast integer IDCT (JDCT_IFAST) and smooth ("fancy") chroma upsampling;
Pillow's default is the accurate IDCT (JDCT_ISLOW). Pillow's draft mode
selects the fast IDCT but also turns the smooth upsampling off, so it is used
where there is no chroma upsampling (grey and 4:4:4 JPEGs: then the pixels
equal TensorFlow's); subsampled JPEGs (4:2:0, 4:2:2) decode with the accurate
IDCT, within a few levels of TensorFlow's (README states the measured figures).
"""

from __future__ import annotations

import io

import numpy as np

# ---------------------------------------------------------------------------
# Decoding (tf.io.decode_image(channels=3, expand_animations=False))


def decode(data: bytes) -> np.ndarray:
    """Image bytes to uint8 [H, W, 3] pixels, as `tf.io.decode_image` gives them.

    Raises:
      Exception: whatever Pillow raises for bytes it cannot decode.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" and _unsampled(image):
            # Pillow's draft flag: libjpeg's JDCT_IFAST, TensorFlow's IDCT.
            image.decoderconfig = (1, 1)  # (scale, draft)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: TensorFlow keeps the high byte; Pillow's own
            # conversion would clip at 255 instead.
            grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        if image.mode != "RGB":
            image = image.convert("RGB")  # Grey replicated, alpha dropped.
        return np.asarray(image)


def _unsampled(image) -> bool:
    """Grey, or 4:4:4 colour: no chroma upsampling for the draft flag to change."""
    from PIL import JpegImagePlugin

    return image.layers == 1 or JpegImagePlugin.get_sampling(image) == 0


# ---------------------------------------------------------------------------
# tf.image.resize(method="bilinear", antialias=False) and the cast to uint8


def _axis_weights(in_size: int, out_size: int):
    """Lower and upper source index and lerp of each output index (float32)."""
    scale = np.float32(in_size) / np.float32(out_size)
    centres = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
    centres = centres - np.float32(0.5)
    floor = np.floor(centres)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(centres), in_size - 1).astype(np.intp)
    return lower, upper, (centres - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] to float32 [size, size, C], as TensorFlow's ResizeBilinear.

    TensorFlow's kernel computes top = tl + (tr - tl) * x_lerp, the same for the
    bottom row, then top + (bottom - top) * y_lerp, all in float32: done here
    a row pass then a column pass, which are those same operations.
    """
    y0, y1, yl = _axis_weights(image.shape[0], size)
    x0, x1, xl = _axis_weights(image.shape[1], size)
    rows = np.union1d(y0, y1)
    source = np.zeros((image.shape[0], size, image.shape[2]), np.float32)
    picked = image[rows].astype(np.float32)
    left, right = picked[:, x0], picked[:, x1]
    source[rows] = left + (right - left) * xl[None, :, None]
    top, bottom = source[y0], source[y1]
    return top + (bottom - top) * yl[:, None, None]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8): round half to even."""
    return np.clip(np.round(image), 0.0, 255.0).astype(np.uint8)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """`input_pipeline._resize`: unchanged at size x size, else bilinear to uint8."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return to_uint8(resize_bilinear(image, size))


# ---------------------------------------------------------------------------
# TensorFlow's stateless random numbers (Philox-4x32-10, CPU)

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _philox(counter: list[int], key: list[int]) -> list[int]:
    """One block of four uint32 for a 128-bit counter and a 64-bit key."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = (
            ((p1 >> 32) ^ c1 ^ k0) & _U32,
            p1 & _U32,
            ((p0 >> 32) ^ c3 ^ k1) & _U32,
            p0 & _U32,
        )
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return [c0, c1, c2, c3]


class Philox:
    """TensorFlow's generator for a stateless op's `seed` (two int64).

    `GenerateKey` in stateless_random_ops.cc: the seed is scrambled into the
    key and counter by one Philox block; blocks follow with the counter
    incremented. `uint32()` hands out the blocks' words in order, as
    `SingleSampleAdapter` does; the `block()`s are what the fill of a tensor
    takes, one per group of outputs.
    """

    def __init__(self, seed0: int, seed1: int):
        s0, s1 = seed0 & (2**64 - 1), seed1 & (2**64 - 1)
        counter = [s0 & _U32, s0 >> 32, s1 & _U32, s1 >> 32]
        mix = _philox(counter, [0x3EC8F720, 0x02461E29])
        self.key = mix[:2]
        self.counter = [0, 0, mix[2], mix[3]]
        self._words: list[int] = []

    def block(self) -> list[int]:
        out = _philox(self.counter, self.key)
        value = sum(c << (32 * i) for i, c in enumerate(self.counter)) + 1
        self.counter = [(value >> (32 * i)) & _U32 for i in range(4)]
        return out

    def uint32(self) -> int:
        if not self._words:
            self._words = self.block()
        return self._words.pop(0)


def _uint32_to_float(x: int) -> np.float32:
    """Philox word to [0, 1): a float in [1, 2) from 23 mantissa bits, minus 1."""
    bits = np.array([(127 << 23) | (x & 0x7FFFFF)], np.uint32)
    return bits.view(np.float32)[0] - np.float32(1.0)


def split(seed: tuple[int, int], num: int = 2) -> list[tuple[int, int]]:
    """`tf.random.experimental.stateless_split(seed, num)` for an int64 seed."""
    gen = Philox(*seed)
    words = [w for _ in range(num) for w in gen.block()]  # 2 int64 per block.
    values = []
    for i in range(2 * num):
        u = words[2 * i] | words[2 * i + 1] << 32
        values.append(u - 2**64 if u >= 2**63 else u)
    return [(values[2 * i], values[2 * i + 1]) for i in range(num)]


def flips(seed: tuple[int, int]) -> bool:
    """Whether `tf.image.stateless_random_flip_left_right` flips for `seed`."""
    return bool(_uint32_to_float(Philox(*seed).block()[0]) < np.float32(0.5))


def random_crop(image: np.ndarray, size: int, seed: tuple[int, int]) -> np.ndarray:
    """`tf.image.stateless_random_crop(image, [size, size, C], seed)`."""
    words = Philox(*seed).block()
    limit = [image.shape[0] - size + 1, image.shape[1] - size + 1, 1]
    # stateless_random_uniform(int32, maxval=int32 max) % limit.
    offset = [(words[i] % 0x7FFFFFFF) % limit[i] for i in range(3)]
    return image[offset[0] : offset[0] + size, offset[1] : offset[1] + size]


def _uniform(gen: Philox, n: int) -> int:
    """SimplePhilox::Uniform(n): ExactUniformInt, rejection sampling."""
    if n & (n - 1) == 0:
        return gen.uint32() & (n - 1)
    rem = _U32 % n + 1
    while (rnd := gen.uint32()) < rem:
        pass
    return rnd % n


def _rint(x) -> int:
    return int(np.rint(np.float32(x)))  # lrintf: half to even.


def _crop_rect(width: int, height: int, aspect, gen: Philox, area_range):
    """GenerateRandomCrop (sample_distorted_bounding_box_op.cc), float32 maths:
    (y, x, h, w) of a crop, or None when the constraints cannot be met."""
    f32 = np.float32
    min_area = f32(area_range[0]) * f32(width) * f32(height)
    max_area = f32(area_range[1]) * f32(width) * f32(height)
    h = _rint(np.sqrt(min_area / aspect))
    max_h = _rint(np.sqrt(max_area / aspect))
    if _rint(f32(max_h) * aspect) > width:
        max_h = int((width + 0.5 - float(f32(1e-7))) / float(aspect))
        if _rint(f32(max_h) * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
        h += _uniform(gen, max_h - h + 1)
    w = _rint(f32(h) * aspect)
    area = f32(w * h)
    if area < min_area:
        h += 1
        w = _rint(f32(h) * aspect)
        area = f32(w * h)
    if area > max_area:
        h -= 1
        w = _rint(f32(h) * aspect)
        area = f32(w * h)
    if not (min_area <= area <= max_area and 0 < w <= width and 0 < h <= height):
        return None
    y = _uniform(gen, height - h) if h < height else 0
    x = _uniform(gen, width - w) if w < width else 0
    return y, x, h, w


def distorted_box(
    height: int,
    width: int,
    seed: tuple[int, int],
    *,
    min_covered=0.1,
    aspect_range=(3 / 4, 4 / 3),
    area_range=(0.25, 1.0),
    attempts=10,
) -> tuple[int, int, int, int]:
    """(y, x, h, w) of `tf.image.stateless_sample_distorted_bounding_box` with
    the whole image as the only box (use_image_if_no_bounding_boxes)."""
    gen = Philox(*seed)
    lo, hi = np.float32(aspect_range[0]), np.float32(aspect_range[1])
    image_area = np.float32(width * height)
    for _ in range(attempts):
        aspect = _uint32_to_float(gen.uint32()) * (hi - lo) + lo
        rect = _crop_rect(width, height, aspect, gen, area_range)
        if rect is None or rect[2] * rect[3] < 1:
            continue
        # Overlap with the whole image: the crop's own area over the image's.
        if np.float32(rect[2] * rect[3]) / image_area >= np.float32(min_covered):
            return rect
    return 0, 0, height, width

"""The official input pipeline of `vit_jax/input_pipeline.py`, in NumPy.

Train: an Inception-style random crop drawn as TensorFlow's `tf.image.sample_distorted_bounding_box`
draws it (area 5%-100% of the image, aspect ratio 0.75-1.33, up to 100 attempts, else the whole
image), a bilinear resize to `image_size` x `image_size`, a random horizontal flip.
Eval: a bilinear resize of the whole image (no centre crop). Both end with `(x - 127.5) / 127.5`.

The resize is a NumPy port of `tf.image.resize(method="bilinear", antialias=False)` (half-pixel
centres, no antialiasing, float32 output without rounding), not Pillow's resize: Pillow antialiases
when it shrinks and rounds to uint8, the official pipeline does neither.
"""

from __future__ import annotations

import numpy as np

AREA_RANGE = (0.05, 1.0)  # official `area_range` of sample_distorted_bounding_box
ASPECT_RANGE = (0.75, 1.33)  # TF's default `aspect_ratio_range`, which the official code keeps
MAX_ATTEMPTS = 100  # TF's default `max_attempts`

_F32 = np.float32


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 image as (H, W, 3): grey (H, W) or (H, W, 1) is repeated into 3 channels.

    Shapes: (H, W) | (H, W, 1) | (H, W, 3) -> (H, W, 3)
    """
    if image.ndim == 2:
        image = image[:, :, None]  # (H, W, 1)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)  # (H, W, 3)
    return image


def _crop_size(rng: np.random.Generator, height: int, width: int, aspect: np.float32):
    """One attempt of TF's GenerateRandomCrop: (h, w) of a crop with this aspect, or None.

    Heights are drawn uniformly between the smallest and largest height whose area fits the range.
    """
    min_area = _F32(AREA_RANGE[0]) * _F32(width) * _F32(height)
    max_area = _F32(AREA_RANGE[1]) * _F32(width) * _F32(height)
    h = int(np.rint(np.sqrt(min_area / aspect)))
    max_h = int(np.rint(np.sqrt(max_area / aspect)))
    if int(np.rint(_F32(max_h) * aspect)) > width:  # the tallest crop whose width still fits
        max_h = int((width + 0.5 - 1e-7) / float(aspect))
        if int(np.rint(_F32(max_h) * aspect)) > width:
            max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
        h += int(rng.integers(0, max_h - h + 1))
    w = int(np.rint(_F32(h) * aspect))
    if w * h < min_area:  # rounding fell below the range: one step up, as TF does
        h += 1
        w = int(np.rint(_F32(h) * aspect))
    if not (min_area <= w * h <= max_area and 0 < w <= width and 0 < h <= height):
        return None
    return h, w


def sample_crop(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """Draw a crop box as `tf.image.sample_distorted_bounding_box` does in the official pipeline.

    Shapes: image (height, width) -> (top, left, h, w) of the crop

    No bounding boxes and `min_object_covered=0`, so every crop that fits the area and aspect
    ranges is accepted; after MAX_ATTEMPTS failures the whole image is used. The offsets follow
    TF's `Uniform(size - crop)`, which never reaches the last position.
    """
    for _ in range(MAX_ATTEMPTS):
        aspect = _F32(rng.random() * (ASPECT_RANGE[1] - ASPECT_RANGE[0]) + ASPECT_RANGE[0])
        size = _crop_size(rng, height, width, aspect)
        if size is not None:
            h, w = size
            top = int(rng.integers(0, height - h)) if h < height else 0
            left = int(rng.integers(0, width - w)) if w < width else 0
            return top, left, h, w
    return 0, 0, height, width


def _axis_weights(n_in: int, n_out: int):
    """Source rows (lower, upper) and weights of TF's half-pixel bilinear resize along one axis.

    Shapes: -> lower (n_out,), upper (n_out,), frac (n_out,) float32
    """
    scale = _F32(n_in / n_out)
    src = (np.arange(n_out, dtype=_F32) + _F32(0.5)) * scale - _F32(0.5)  # (n_out,)
    floor = np.floor(src)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(src), n_in - 1).astype(np.intp)
    return lower, upper, (src - floor).astype(_F32)


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to `size` x `size` like `tf.image.resize(..., "bilinear")`: float32, not rounded.

    Shapes: image (H, W, C) uint8 or float -> (size, size, C) float32
    """
    y_lo, y_hi, y_frac = _axis_weights(image.shape[0], size)
    x_lo, x_hi, x_frac = _axis_weights(image.shape[1], size)
    x_frac = x_frac[None, :, None]  # (1, size, 1)
    top_rows = image[y_lo].astype(_F32)  # (size, W, C)
    bottom_rows = image[y_hi].astype(_F32)  # (size, W, C)
    top = top_rows[:, x_lo] + (top_rows[:, x_hi] - top_rows[:, x_lo]) * x_frac  # (size, size, C)
    bottom = bottom_rows[:, x_lo] + (bottom_rows[:, x_hi] - bottom_rows[:, x_lo]) * x_frac
    return top + (bottom - top) * y_frac[:, None, None]  # (size, size, C)


def normalize(x: np.ndarray) -> np.ndarray:
    """Pixel values 0..255 to [-1, 1]: `(x - 127.5) / 127.5` in float32.

    Shapes: any -> same, float32
    """
    return ((x.astype(_F32) - _F32(127.5)) / _F32(127.5)).astype(_F32)


def train_transform(image: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Official training augmentation: random crop, bilinear resize, random flip, normalise.

    Shapes: image (H, W, C) uint8 -> (image_size, image_size, 3) float32 in [-1, 1]
    """
    image = as_rgb(image)
    top, left, h, w = sample_crop(rng, image.shape[0], image.shape[1])
    x = resize_bilinear(image[top : top + h, left : left + w], image_size)  # (S, S, 3)
    if rng.random() < 0.5:
        x = x[:, ::-1]  # horizontal flip
    return normalize(x)


def eval_transform(image: np.ndarray, image_size: int) -> np.ndarray:
    """Official evaluation preprocessing: bilinear resize of the whole image, normalise.

    Shapes: image (H, W, C) uint8 -> (image_size, image_size, 3) float32 in [-1, 1]
    """
    return normalize(resize_bilinear(as_rgb(image), image_size))

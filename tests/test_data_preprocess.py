"""The official preprocessing: crop statistics, the TF-style bilinear resize, value range."""

from __future__ import annotations

import numpy as np
import pytest

from minivit.data.preprocess import (
    eval_transform,
    normalize,
    resize_bilinear,
    sample_crop,
    train_transform,
)


def test_eval_of_a_constant_image_is_that_constant_normalised():
    for shape, value in [((13, 7, 3), 200), ((8, 8), 0), ((40, 50, 1), 255)]:
        image = np.full(shape, value, np.uint8)
        x = eval_transform(image, 24)
        assert x.shape == (24, 24, 3) and x.dtype == np.float32
        np.testing.assert_array_equal(x, np.float32((value - 127.5) / 127.5))


def test_values_stay_in_minus_one_to_one():
    rng = np.random.default_rng(0)
    for _ in range(20):
        image = rng.integers(
            0, 256, (int(rng.integers(5, 60)), int(rng.integers(5, 60)), 3), dtype=np.uint8
        )
        for x in (eval_transform(image, 16), train_transform(image, 16, rng)):
            assert x.min() >= -1.0 and x.max() <= 1.0
    assert normalize(np.uint8([0, 255])).tolist() == [-1.0, 1.0]


def test_resize_matches_half_pixel_bilinear_by_hand():
    image = np.array([[0, 100], [40, 200]], np.float32)[:, :, None]  # (2, 2, 1)
    # output index i samples input coordinate (i + 0.5) / 2 - 0.5, clamped at the edges
    weights = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], np.float32)  # (4, 2)
    expected = weights @ image[:, :, 0] @ weights.T  # (4, 4)
    np.testing.assert_allclose(resize_bilinear(image, 4)[:, :, 0], expected, atol=1e-5)


def test_resize_keeps_a_linear_ramp_and_same_size_images():
    ramp = np.tile(np.arange(10, dtype=np.float32) * 10, (10, 1))[:, :, None]  # (10, 10, 1)
    down = resize_bilinear(ramp, 5)[0, :, 0]  # samples at input columns 0.5, 2.5, ..., 8.5
    np.testing.assert_allclose(down, [5, 25, 45, 65, 85], atol=1e-4)
    image = np.random.default_rng(0).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bilinear(image, 9), image.astype(np.float32))


def test_upsampling_agrees_with_pillow_bilinear():
    image_module = pytest.importorskip("PIL.Image")
    image = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    ours = resize_bilinear(image, 18)
    pillow = np.asarray(image_module.fromarray(image).resize((18, 18), image_module.BILINEAR))
    assert np.abs(ours - pillow).max() <= 1.0  # Pillow rounds to uint8


def test_crop_boxes_follow_the_official_area_and_aspect_ranges():
    rng = np.random.default_rng(0)
    height, width = 120, 90
    boxes = np.array([sample_crop(rng, height, width) for _ in range(4000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    assert area.min() >= 0.05 and area.max() <= 1.0
    aspect = w / h
    assert (aspect >= 0.75 - 1 / h).all() and (aspect <= 1.33 + 1 / h).all()  # w = round(h * a)
    assert area.min() < 0.07 and area.max() > 0.75  # the whole range is used
    assert 0.3 < np.mean(area < 0.4) < 0.9  # heights are uniform, so small crops are common
    assert len(np.unique(top)) > 50 and len(np.unique(left)) > 30


def test_crop_of_tiny_or_thin_images_is_valid():
    rng = np.random.default_rng(0)
    for height, width in [(1, 1), (1, 50), (50, 1), (2, 3)]:
        for _ in range(50):
            top, left, h, w = sample_crop(rng, height, width)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            assert h >= 1 and w >= 1


def test_train_transform_flips_about_half_of_the_time():
    image = np.zeros((32, 32), np.uint8)
    image[:, :16] = 255  # left half white
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(400):
        x = train_transform(image, 8, rng)
        if x[:, 0].mean() != x[:, -1].mean():  # crops inside one half show no side
            sides.append(x[:, 0].mean() > x[:, -1].mean())
    assert len(sides) > 200 and 0.4 < np.mean(sides) < 0.6

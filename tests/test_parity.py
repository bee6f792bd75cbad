"""Golden parity: every tiny fixture (and the full Ti_16 / R_Ti_16 when present) against the
outputs of the official JAX code (`tests/data/golden/*`, produced by google-research/
vision_transformer, see ../shared/golden/README.md).

The configs are built from each fixture's `config.json` directly, so these tests depend only on
the models, not on the checkpoint reader or the registry.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from golden import MODEL_FIXTURES, fixture_config

from minivit.models import build_model, vit

TINY = MODEL_FIXTURES
FULL = ["Ti_16", "R_Ti_16"]
# Gradients that are zero in exact arithmetic: softmax ignores a key shift shared by all keys, and
# a per-token shift equal across channels is removed by the LayerNorms that follow.
ZERO_GRAD_SUFFIXES = ("MultiHeadDotProductAttention_1/key/bias", "token_mixing/Dense_1/bias")


@functools.cache
def load_fixture(directory: Path):
    """(model with model.npz loaded, inputs, expected) for one fixture directory; cached."""
    config, num_classes, image_size = fixture_config(directory / "config.json")
    model = build_model(config, num_classes, image_size)
    with np.load(directory / "model.npz") as params:
        model.load_params(dict(params))
    inputs = dict(np.load(directory / "inputs.npz"))
    expected = dict(np.load(directory / "expected.npz"))
    return model, inputs, expected


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("name", TINY)
def test_logits_and_pre_logits(golden_tiny, name):
    model, inputs, expected = load_fixture(golden_tiny / name)
    assert max_abs(model.predict(inputs["images"]), expected["logits"]) < 1e-5
    assert max_abs(model.features(inputs["images"]), expected["pre_logits"]) < 1e-5


@pytest.mark.parametrize("packed", [False, True], ids=["default", "packed-qkv"])
@pytest.mark.parametrize("name", TINY)
def test_loss_and_every_gradient(golden_tiny, name, packed, monkeypatch):
    if packed:  # training projects q, k, v as one op from PACK_ROWS rows; the fixtures have fewer
        monkeypatch.setattr(vit, "PACK_ROWS", 1)
    model, inputs, expected = load_fixture(golden_tiny / name)
    loss, grads = model.loss_and_grads(inputs["images"], inputs["labels"])
    assert abs(loss - float(expected["loss"])) < 2e-6
    expected_keys = {key.removeprefix("grad/") for key in expected if key.startswith("grad/")}
    assert set(grads) == expected_keys
    for key, grad in grads.items():
        reference = expected[f"grad/{key}"]
        assert grad.shape == reference.shape, key
        if key.endswith(ZERO_GRAD_SUFFIXES):
            tolerance = 1e-6
        else:
            tolerance = 1e-4 * float(np.max(np.abs(reference))) + 1e-6
        assert max_abs(grad, reference) <= tolerance, (key, max_abs(grad, reference), tolerance)


@pytest.mark.parametrize("name", TINY)
def test_intermediates(golden_tiny, name):
    model, inputs, _ = load_fixture(golden_tiny / name)
    ours = model.intermediates(inputs["images"])
    with np.load(golden_tiny / name / "intermediates.npz") as reference:
        for key in reference:
            path = key.removeprefix("act/")
            assert path in ours, path
            assert ours[path].shape == reference[key].shape, path
            assert max_abs(ours[path], reference[key]) < 1e-4, path


@pytest.mark.parametrize("name", FULL)
def test_full_logits_and_pre_logits(golden_full, name):
    model, inputs, expected = load_fixture(golden_full / name)
    assert max_abs(model.predict(inputs["images"]), expected["logits"]) < 1e-5
    assert max_abs(model.features(inputs["images"]), expected["pre_logits"]) < 1e-5

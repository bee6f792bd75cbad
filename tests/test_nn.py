"""Module / Parameter trees: keys are scope paths, strict loading, modes, capture, initialisers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minivit import nn
from minivit.autograd import Tensor


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.Dense_0 = nn.Dense(4, 3)
        self.LayerNorm_0 = nn.LayerNorm(3)

    def forward(self, x):
        return self.LayerNorm_0(self.Dense_0(x))


class Flat(nn.Module):
    """Children live in the parent's scope, like the ResNet body of a hybrid."""

    inline = True

    def __init__(self):
        super().__init__()
        self.gn_root = nn.GroupNorm(32)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Flat()
        self.block = Inner()
        self.cls = nn.Parameter((1, 1, 4), nn.zeros)

    def forward(self, x):
        return self.block(x)


def test_state_dict_keys_are_scope_paths():
    shapes = {key: value.shape for key, value in Outer().state_dict().items()}
    assert shapes == {
        "gn_root/scale": (1, 1, 1, 32),
        "gn_root/bias": (1, 1, 1, 32),
        "block/Dense_0/kernel": (4, 3),
        "block/Dense_0/bias": (3,),
        "block/LayerNorm_0/scale": (3,),
        "block/LayerNorm_0/bias": (3,),
        "cls": (1, 1, 4),
    }


def test_parameters_are_float32_tensors_that_require_grad():
    for _, param in Outer().named_parameters():
        assert isinstance(param, Tensor)
        assert param.requires_grad
        assert param.dtype == np.float32


def test_state_dict_is_the_models_storage_and_loading_copies():
    model = Outer()
    params = {
        key: np.full(value.shape, 0.5, np.float64) for key, value in model.state_dict().items()
    }
    model.load_state_dict(params)
    assert model.block.Dense_0.kernel.data.dtype == np.float32
    params["cls"][...] = 7.0  # the caller's array is not the model's
    assert np.all(model.cls.data == 0.5)
    model.state_dict()["cls"][...] = 3.0  # state_dict hands out the model's own array
    assert np.all(model.cls.data == 3.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.pop("block/Dense_0/bias"), "no key 'block/Dense_0/bias'"),
        (lambda p: p.update(extra=np.zeros(1)), "key 'extra' that this model does not have"),
        (
            lambda p: p.update({"gn_root/scale": np.zeros(32)}),
            r"'gn_root/scale' has shape \(32,\) but this model expects \(1, 1, 1, 32\)",
        ),
    ],
)
def test_strict_loading_names_the_key_and_changes_nothing(change, message):
    model = Outer()
    params = {key: np.ones(value.shape, np.float32) for key, value in model.state_dict().items()}
    change(params)
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(params)
    assert all(np.all(value == 0) for value in model.state_dict().values())


def test_train_and_eval_reach_every_module():
    model = Outer()
    rng = np.random.default_rng(0)
    model.train(True, rng)
    assert model.block.Dense_0.training and model.body.gn_root.training
    assert model.block.LayerNorm_0.rng is rng
    model.eval()
    assert not model.block.Dense_0.training and model.block.Dense_0.rng is None


def test_dropout_is_identity_in_eval_mode():
    layer = nn.MlpBlock(4, 8, dropout_rate=0.5)
    x = Tensor(np.ones((2, 4), np.float32))
    assert layer.dropout(x, 0.5) is x
    layer.train(True, np.random.default_rng(0))
    y = layer.dropout(x, 0.5).data
    assert set(np.unique(y)) <= {0.0, 2.0}  # inverted dropout: kept units scaled by 1 / (1 - rate)


def test_capture_records_named_module_outputs():
    model = Outer()
    model.initialize(np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    with nn.capture(model) as outputs:
        y = model(x)
    assert set(outputs) == {"block", "block/Dense_0", "block/LayerNorm_0"}
    dense = x @ model.block.Dense_0.kernel.data + model.block.Dense_0.bias.data
    np.testing.assert_allclose(outputs["block/Dense_0"], dense, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(outputs["block"], y.data)


def test_default_fans_follow_flax():
    assert nn.default_fans((5, 7)) == (5, 7)
    assert nn.default_fans((3, 3, 4, 8)) == (36, 72)  # receptive field 9 times in / out


def test_lecun_normal_is_truncated_with_variance_one_over_fan_in():
    rng = np.random.default_rng(0)
    fan_in = 50
    values = nn.lecun_normal(rng, (200_000,), fan_in, 1)
    stddev = math.sqrt(1.0 / fan_in)
    assert values.dtype == np.float32
    assert np.max(np.abs(values)) <= 2.0 * stddev / 0.87962566103423978 + 1e-7
    assert abs(values.std() - stddev) < 0.01 * stddev


def test_xavier_uniform_bounds_and_variance():
    rng = np.random.default_rng(0)
    values = nn.xavier_uniform(rng, (400, 500), 400, 500)
    limit = math.sqrt(6.0 / 900)
    assert np.max(np.abs(values)) <= limit
    assert abs(values.var() - limit**2 / 3) < 0.01 * limit**2 / 3


def test_initialize_uses_each_parameters_initialiser():
    model = Outer()
    model.initialize(np.random.default_rng(0))
    assert np.all(model.block.LayerNorm_0.scale.data == 1.0)
    assert np.all(model.block.Dense_0.bias.data == 0.0)
    assert np.all(model.cls.data == 0.0)
    assert np.std(model.block.Dense_0.kernel.data) > 0.1

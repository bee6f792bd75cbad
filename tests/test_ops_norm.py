"""LayerNorm, GroupNorm and StdConv weight standardisation: values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_grad

from minivit import ops

RNG = np.random.default_rng(5)


def randn(*shape):
    return RNG.standard_normal(shape)


def test_layer_norm_values():
    """Against the textbook two-pass formula, eps 1e-6, and in float32 against float64."""
    x = 3.0 * randn(4, 5, 33) + 1.5
    scale, bias = randn(33), randn(33)
    centred = x - x.mean(-1, keepdims=True)
    expected = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6) * scale + bias
    np.testing.assert_allclose(
        ops.layer_norm(x, scale, bias).data, expected, rtol=1e-12, atol=1e-12
    )
    y32 = ops.layer_norm(*(a.astype(np.float32) for a in (x, scale, bias))).data
    np.testing.assert_allclose(y32, expected, atol=2e-5)
    np.testing.assert_allclose(
        ops.layer_norm(x, scale, bias, eps=0.5).data[0, 0, 0],
        centred[0, 0, 0] / np.sqrt(centred[0, 0].var() + 0.5) * scale[0] + bias[0],
        rtol=1e-12,
    )


def test_layer_norm_constant_rows_are_finite():
    y = ops.layer_norm(np.full((2, 8), 3.0, np.float32), np.ones(8), np.zeros(8)).data
    np.testing.assert_array_equal(y, 0.0)


@pytest.mark.parametrize("x_shape", [(3, 7), (2, 3, 5), (1, 1, 4), (6,)])
def test_layer_norm_grad(x_shape):
    d = x_shape[-1]
    check_grad(ops.layer_norm, randn(*x_shape), randn(d), randn(d))


def test_layer_norm_grad_non_contiguous():
    x = randn(6, 3, 4).transpose(1, 0, 2)  # (3, 6, 4)
    check_grad(ops.layer_norm, x, randn(8)[::2], randn(4))
    check_grad(lambda v, s, b: ops.layer_norm(v, s, b, eps=1e-3), randn(5, 2).T, randn(5), randn(5))


def _group_norm_loop(x, scale, bias, groups, eps):
    """Per sample and contiguous channel block: normalise over (H, W, C/G) with np.var."""
    y = np.empty_like(x)
    width = x.shape[-1] // groups
    for b in range(x.shape[0]):
        for g in range(groups):
            block = x[b, ..., g * width : (g + 1) * width]
            y[b, ..., g * width : (g + 1) * width] = (block - block.mean()) / np.sqrt(
                block.var() + eps
            )
    return y * scale.reshape(-1) + bias.reshape(-1)


@pytest.mark.parametrize("param_shape", ["(C,)", "(1,1,1,C)"])
def test_group_norm_values(param_shape):
    x = 2.0 * randn(2, 3, 5, 64) - 0.7
    shape = (64,) if param_shape == "(C,)" else (1, 1, 1, 64)
    scale, bias = randn(*shape), randn(*shape)
    expected = _group_norm_loop(x, scale, bias, 32, 1e-6)
    np.testing.assert_allclose(
        ops.group_norm(x, scale, bias).data, expected, rtol=1e-11, atol=1e-11
    )
    y4 = ops.group_norm(x, scale, bias, num_groups=4, eps=1e-2).data
    np.testing.assert_allclose(
        y4, _group_norm_loop(x, scale, bias, 4, 1e-2), rtol=1e-11, atol=1e-11
    )


@pytest.mark.parametrize("param_shape", [(6,), (1, 1, 1, 6)])
@pytest.mark.parametrize(
    "x_shape, groups", [((2, 3, 3, 6), 3), ((1, 1, 5, 6), 2), ((3, 2, 1, 6), 6)]
)
def test_group_norm_grad(param_shape, x_shape, groups):
    x, scale, bias = randn(*x_shape), randn(*param_shape), randn(*param_shape)
    grads = check_grad(lambda v, s, b: ops.group_norm(v, s, b, num_groups=groups), x, scale, bias)
    assert grads[1].shape == param_shape and grads[2].shape == param_shape


def test_group_norm_relu_is_relu_of_group_norm_and_grad():
    x, scale, bias = randn(2, 3, 4, 8), randn(8), randn(8)
    want = np.maximum(ops.group_norm(x, scale, bias, num_groups=4).data, 0)
    np.testing.assert_array_equal(
        ops.group_norm(x, scale, bias, num_groups=4, relu=True).data, want
    )
    check_grad(lambda v, s, b: ops.group_norm(v, s, b, num_groups=4, relu=True), x, scale, bias)


def test_group_norm_grad_32_groups_non_contiguous():
    x = randn(2, 64, 3, 2).transpose(0, 2, 3, 1)  # (2, 3, 2, 64) channels last, not contiguous
    check_grad(ops.group_norm, x, randn(1, 1, 1, 64), randn(64))


def test_weight_standardize_values():
    w = randn(3, 3, 4, 5) * 0.2 + 0.1
    axes = (0, 1, 2)
    expected = (w - w.mean(axes)) / (w.std(axes) + 1e-5)  # population std, eps on the std
    np.testing.assert_allclose(ops.weight_standardize(w).data, expected, rtol=1e-12)
    std = ops.weight_standardize(w).data.std(axis=axes)
    np.testing.assert_allclose(std, w.std(axes) / (w.std(axes) + 1e-5), rtol=1e-12)


@pytest.mark.parametrize("shape", [(3, 3, 2, 4), (1, 1, 5, 3), (7, 7, 1, 2), (2, 1)])
def test_weight_standardize_grad(shape):
    check_grad(ops.weight_standardize, randn(*shape))
    check_grad(lambda w: ops.weight_standardize(w, eps=0.3), randn(*shape[::-1]).T)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"LayerNorm.*\(5,\).*\(2, 4\)"):
        ops.layer_norm(randn(2, 4), randn(5), randn(5))
    with pytest.raises(ValueError, match=r"GroupNorm.*\(1, 2, 2, 48\).*num_groups=32"):
        ops.group_norm(randn(1, 2, 2, 48), randn(48), randn(48))
    with pytest.raises(ValueError, match=r"GroupNorm.*\(1, 64\)"):
        ops.group_norm(randn(1, 2, 2, 64), randn(1, 64), randn(64))
    with pytest.raises(ValueError, match=r"WeightStandardize.*\(4,\)"):
        ops.weight_standardize(randn(4))

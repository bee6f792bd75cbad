"""Every public op has a gradient check, and every op keeps float32 in float32.

`GRADIENT_CHECKS` names, for each op in `minivit.ops.__all__`, the test that gradient-checks it;
a new op without an entry fails `test_every_op_has_a_gradient_check`, and an entry whose test
does not call both the op and `check_grad` fails `test_registered_checks_exist`.
"""

from __future__ import annotations

import importlib
import inspect
import re

import numpy as np
import pytest

from minivit import Tensor, ops

GRADIENT_CHECKS = {
    "matmul": "test_ops_linalg::test_matmul_grad",
    "dense": "test_ops_linalg::test_dense_grad",
    "dense_gelu": "test_ops_linalg::test_dense_gelu_grad",
    "heads_projections": "test_ops_linalg::test_heads_projections_values_and_grad",
    "add": "test_ops_elementwise::test_binary_grad",
    "add_relu": "test_ops_elementwise::test_add_relu_values_grad_and_separate_leaf_gradients",
    "sub": "test_ops_elementwise::test_binary_grad",
    "mul": "test_ops_elementwise::test_binary_grad",
    "div": "test_ops_elementwise::test_binary_grad",
    "neg": "test_ops_elementwise::test_unary_grad",
    "exp": "test_ops_elementwise::test_unary_grad",
    "log": "test_ops_elementwise::test_unary_grad",
    "tanh": "test_ops_elementwise::test_unary_grad",
    "relu": "test_ops_elementwise::test_unary_grad",
    "sqrt": "test_ops_elementwise::test_unary_grad",
    "gelu": "test_ops_elementwise::test_gelu_grad",
    "dropout": "test_ops_elementwise::test_dropout_grad",
    "sum": "test_ops_reduce::test_reduction_grad",
    "mean": "test_ops_reduce::test_reduction_grad",
    "max": "test_ops_reduce::test_reduction_grad",
    "softmax": "test_ops_reduce::test_softmax_family_grad",
    "log_softmax": "test_ops_reduce::test_softmax_family_grad",
    "reshape": "test_ops_shape::test_reshape_grad",
    "transpose": "test_ops_shape::test_transpose_grad",
    "concat": "test_ops_shape::test_concat_grad",
    "index": "test_ops_shape::test_index_grad",
    "pad": "test_ops_shape::test_pad_grad",
    "broadcast_to": "test_ops_shape::test_broadcast_to_grad",
    "layer_norm": "test_ops_norm::test_layer_norm_grad",
    "group_norm": "test_ops_norm::test_group_norm_grad",
    "weight_standardize": "test_ops_norm::test_weight_standardize_grad",
    "dot_product_attention": "test_ops_attention::test_attention_values_and_grad",
    "packed_attention": "test_ops_attention::test_packed_attention_values_and_grad",
    "conv2d": "test_ops_conv::test_conv2d_values_and_grad",
    "max_pool": "test_ops_conv::test_max_pool_values_and_grad",
    "global_avg_pool": "test_ops_conv::test_global_avg_pool_grad",
    "softmax_cross_entropy": "test_ops_loss::test_integer_and_one_hot_labels",
}


def test_every_op_has_a_gradient_check():
    public = {name for name in ops.__all__ if callable(getattr(ops, name))}
    assert public == set(ops.__all__)
    assert sorted(public - set(GRADIENT_CHECKS)) == [], "ops without a gradient check"
    assert sorted(set(GRADIENT_CHECKS) - public) == [], "checks of ops that are not public"


@pytest.mark.parametrize("name", sorted(GRADIENT_CHECKS))
def test_registered_checks_exist(name):
    module, function = GRADIENT_CHECKS[name].split("::")
    source = inspect.getsource(getattr(importlib.import_module(module), function))
    assert "check_grad(" in source
    assert re.search(rf"\bops\.{name}\b", source), f"{function} never calls ops.{name}"


def _f32(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


FLOAT32_CASES = {  # op name -> (function of Tensors, float32 inputs)
    "matmul": (ops.matmul, (_f32(2, 3, 4), _f32(4, 5))),
    "add_relu": (ops.add_relu, (_f32(2, 3, 4), _f32(2, 3, 4))),
    "dense": (ops.dense, (_f32(2, 3, 4), _f32(4, 5), _f32(5))),
    "dense_gelu": (ops.dense_gelu, (_f32(2, 3, 4), _f32(4, 5), _f32(5))),
    "add": (ops.add, (_f32(3, 4), _f32(4))),
    "sub": (lambda a: 1.0 - ops.sub(a, 2), (_f32(3, 4),)),
    "mul": (lambda a, b: ops.mul(a, b) * 0.5, (_f32(3, 1), _f32(4))),
    "div": (lambda a, b: ops.div(a, b) / 3, (_f32(3, 4), np.abs(_f32(4)) + 1)),
    "neg": (ops.neg, (_f32(3),)),
    "exp": (ops.exp, (_f32(3),)),
    "log": (ops.log, (np.abs(_f32(3)) + 1,)),
    "tanh": (ops.tanh, (_f32(3),)),
    "relu": (ops.relu, (_f32(3),)),
    "sqrt": (ops.sqrt, (np.abs(_f32(3)) + 1,)),
    "gelu": (lambda x: ops.gelu(x) + ops.gelu(x, approximate=False), (_f32(3, 4),)),
    "dropout": (lambda x: ops.dropout(x, 0.5, np.random.default_rng(0)), (_f32(3, 4),)),
    "sum": (lambda x: ops.sum(x, axis=1), (_f32(3, 4),)),
    "mean": (ops.mean, (_f32(3, 4),)),
    "max": (lambda x: ops.max(x, axis=0), (_f32(3, 4),)),
    "softmax": (ops.softmax, (_f32(3, 4),)),
    "log_softmax": (ops.log_softmax, (_f32(3, 4),)),
    "reshape": (lambda x: ops.reshape(x, (4, 3)), (_f32(3, 4),)),
    "transpose": (ops.transpose, (_f32(3, 4),)),
    "concat": (lambda a, b: ops.concat([a, b], 0), (_f32(3, 4), _f32(2, 4))),
    "index": (lambda x: ops.index(x, (slice(None), np.array([0, 0, 2]))), (_f32(3, 4),)),
    "pad": (lambda x: ops.pad(x, 1, -np.inf) * 1.0, (_f32(3, 4),)),
    "broadcast_to": (lambda x: ops.broadcast_to(x, (2, 4)), (_f32(4),)),
    "layer_norm": (ops.layer_norm, (_f32(3, 8), _f32(8), _f32(8))),
    "group_norm": (ops.group_norm, (_f32(2, 2, 3, 64), _f32(1, 1, 1, 64), _f32(64))),
    "weight_standardize": (ops.weight_standardize, (_f32(3, 3, 2, 4),)),
    "dot_product_attention": (ops.dot_product_attention, (_f32(2, 3, 2, 4),) * 3),
    "packed_attention": (ops.packed_attention, (_f32(2, 3, 3, 2, 4),)),
    "heads_projections": (
        lambda x, *p: ops.heads_projections(x, p[:3], p[3:]),
        (_f32(2, 3, 4), *[_f32(4, 2, 3)] * 3, *[_f32(2, 3)] * 3),
    ),
    "conv2d": (
        lambda x, w, b: ops.conv2d(x, w, b, 2),
        (_f32(1, 5, 5, 2), _f32(3, 3, 2, 3), _f32(3)),
    ),
    "max_pool": (ops.max_pool, (_f32(1, 5, 5, 2),)),
    "global_avg_pool": (ops.global_avg_pool, (_f32(2, 3, 3, 4),)),
    "softmax_cross_entropy": (
        ops.softmax_cross_entropy,
        (_f32(3, 5), np.eye(5, dtype=np.float32)[:3]),
    ),
}


def test_float32_cases_cover_every_op():
    assert sorted(FLOAT32_CASES) == sorted(ops.__all__)


@pytest.mark.parametrize("name", sorted(FLOAT32_CASES))
def test_float32_in_float32_out_and_float32_grads(name):
    fn, arrays = FLOAT32_CASES[name]
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    assert out.dtype == np.float32, f"{name} returned {out.dtype}"
    out.backward(np.ones(out.shape, dtype=np.float32))
    for t in tensors:
        assert t.grad is not None and t.grad.dtype == np.float32, f"{name}: grad {t.grad}"

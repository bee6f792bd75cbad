"""Differentiable ops: each a `Function` with forward and backward side by side, on raw arrays.

Every function takes Tensors or arrays and returns a Tensor; float32 in gives float32 out and
float32 gradients. Grouped by kind: linear algebra, elementwise, reductions, shapes,
normalisation, attention, convolution and pooling, losses.
"""

from __future__ import annotations

from minivit.ops.attention import dot_product_attention, packed_attention
from minivit.ops.conv import conv2d, global_avg_pool, max_pool
from minivit.ops.elementwise import (
    add,
    add_relu,
    div,
    dropout,
    exp,
    gelu,
    log,
    mul,
    neg,
    relu,
    sqrt,
    sub,
    tanh,
)
from minivit.ops.linalg import dense, dense_gelu, heads_projections, matmul
from minivit.ops.loss import softmax_cross_entropy
from minivit.ops.norm import group_norm, layer_norm, weight_standardize
from minivit.ops.reduce import log_softmax, max, mean, softmax, sum
from minivit.ops.shape import broadcast_to, concat, index, pad, reshape, transpose

__all__ = [
    "add",
    "add_relu",
    "broadcast_to",
    "concat",
    "conv2d",
    "dense",
    "dense_gelu",
    "div",
    "dot_product_attention",
    "dropout",
    "exp",
    "gelu",
    "global_avg_pool",
    "group_norm",
    "heads_projections",
    "index",
    "layer_norm",
    "log",
    "log_softmax",
    "matmul",
    "max",
    "max_pool",
    "mean",
    "mul",
    "neg",
    "packed_attention",
    "pad",
    "relu",
    "reshape",
    "softmax",
    "softmax_cross_entropy",
    "sqrt",
    "sub",
    "sum",
    "tanh",
    "transpose",
    "weight_standardize",
]

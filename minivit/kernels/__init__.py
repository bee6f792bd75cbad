"""Fused hot paths of a step: the matrix products (one sgemm call on strided operands),
LayerNorm, GroupNorm, StdConv weight standardisation, GELU, attention, softmax cross-entropy, the
bias add and bias gradient of Dense / Conv layers, the residual relu(a + b) of BiT units, and the
window sweeps of convolutions and max pooling (im2col, col2im).

Each kernel is one public function over raw arrays (no autograd) with three bodies: `*_ref`
(plain NumPy, the spec), a Numba CPU body and a Numba CUDA body for CuPy arrays. The array type
picks the body; `body="ref"|"cpu"|"gpu"` or `MINIVIT_KERNEL_BODY` forces one (see `_dispatch`).
All take and return float32.
"""

from __future__ import annotations

from minivit.kernels._dispatch import drop_stale_cache, fusable
from minivit.kernels.add_relu import (
    add_relu_backward,
    add_relu_backward_ref,
    add_relu_forward,
    add_relu_forward_ref,
)
from minivit.kernels.attention import (
    attention_backward,
    attention_backward_ref,
    attention_forward,
    attention_forward_ref,
)
from minivit.kernels.bias import bias_grad, bias_grad_ref
from minivit.kernels.gelu import gelu_backward, gelu_backward_ref, gelu_forward, gelu_forward_ref
from minivit.kernels.gemm import matmul, matmul_ref
from minivit.kernels.groupnorm import (
    groupnorm_backward,
    groupnorm_backward_ref,
    groupnorm_forward,
    groupnorm_forward_ref,
)
from minivit.kernels.layernorm import (
    layernorm_backward,
    layernorm_backward_ref,
    layernorm_forward,
    layernorm_forward_ref,
)
from minivit.kernels.standardize import (
    standardize_backward,
    standardize_backward_ref,
    standardize_forward,
    standardize_forward_ref,
)
from minivit.kernels.window import (
    col2im,
    im2col,
    max_pool_backward,
    max_pool_forward,
)
from minivit.kernels.xent import (
    softmax_xent_backward,
    softmax_xent_backward_ref,
    softmax_xent_forward,
    softmax_xent_forward_ref,
)

drop_stale_cache()  # Numba reads a body's cache on its first call, not at import

__all__ = [
    "fusable",
    "bias_grad",
    "bias_grad_ref",
    "add_relu_backward",
    "add_relu_backward_ref",
    "add_relu_forward",
    "add_relu_forward_ref",
    "attention_backward",
    "attention_backward_ref",
    "attention_forward",
    "attention_forward_ref",
    "col2im",
    "gelu_backward",
    "gelu_backward_ref",
    "gelu_forward",
    "gelu_forward_ref",
    "groupnorm_backward",
    "groupnorm_backward_ref",
    "groupnorm_forward",
    "groupnorm_forward_ref",
    "im2col",
    "layernorm_backward",
    "layernorm_backward_ref",
    "layernorm_forward",
    "layernorm_forward_ref",
    "matmul",
    "matmul_ref",
    "max_pool_backward",
    "max_pool_forward",
    "softmax_xent_backward",
    "softmax_xent_backward_ref",
    "softmax_xent_forward",
    "softmax_xent_forward_ref",
    "standardize_backward",
    "standardize_backward_ref",
    "standardize_forward",
    "standardize_forward_ref",
]

"""Normalisation: LayerNorm and GroupNorm (flax defaults), and StdConv weight standardisation.

Both norms use flax's fast variance, `mean(x^2) - mean(x)^2` clipped at 0, with epsilon 1e-6,
and `y = (x - mean) * rsqrt(var + eps) * scale + bias`. GroupNorm splits the channels into 32
contiguous groups (channel c in group c // (C / 32)). Weight standardisation is the official
StdConv: `(w - mean) / (std + 1e-5)` per output channel, population std over (kh, kw, in).
"""

from __future__ import annotations

from minivit import backend, kernels
from minivit.autograd import Function, Tensor


def _normalize_backward(gxhat, xhat, rstd, axes):
    """d(loss)/dx of xhat = (x - mean(x)) * rstd, with mean and variance over `axes`."""
    return rstd * (
        gxhat
        - gxhat.mean(axis=axes, keepdims=True)
        - xhat * (gxhat * xhat).mean(axis=axes, keepdims=True)
    )


def _statistics(xp, x, axes, eps: float):
    """Mean and rsqrt(fast variance + eps) over `axes`, kept as size-1 axes."""
    mean = x.mean(axis=axes, keepdims=True)
    var = xp.maximum((x * x).mean(axis=axes, keepdims=True) - mean * mean, 0)
    return mean, 1.0 / xp.sqrt(var + eps)


class LayerNorm(Function):
    """LayerNorm over the last axis (flax `nn.LayerNorm`).

    Shapes: x (..., D), scale (D,), bias (D,) -> y (..., D)
    """

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def forward(self, xp, x, scale, bias):
        d = x.shape[-1] if x.ndim else 0
        if scale.shape != (d,) or bias.shape != (d,):
            raise self.shape_error(
                f"scale {scale.shape} and bias {bias.shape} must both be ({d},) "
                f"for an input of shape {x.shape}"
            )
        rows = x.reshape(-1, d)  # (R, D)
        self.fused = kernels.fusable(x, scale, bias)
        if self.fused:
            y, mean, rstd = kernels.layernorm_forward(rows, scale, bias, self.eps)  # (R, D), (R,)
            self.save(rows, mean, rstd, scale)
            return y.reshape(x.shape)
        mean, rstd = _statistics(xp, rows, 1, self.eps)  # (R, 1) each
        self.save(rows, mean, rstd, scale)
        y = (rows - mean) * (rstd * scale) + bias  # (R, D)
        return y.reshape(x.shape)

    def backward(self, xp, gy):
        rows, mean, rstd, scale = self.saved
        g = gy.reshape(rows.shape)  # (R, D)
        if self.fused:
            gx, gscale, gbias = kernels.layernorm_backward(g, rows, mean, rstd, scale)
            return gx.reshape(gy.shape), gscale, gbias
        xhat = (rows - mean) * rstd  # (R, D)
        gx = None
        if self.needs_grad[0]:
            gx = _normalize_backward(g * scale, xhat, rstd, 1).reshape(gy.shape)
        gscale = (g * xhat).sum(axis=0) if self.needs_grad[1] else None
        gbias = g.sum(axis=0) if self.needs_grad[2] else None
        return gx, gscale, gbias


class GroupNorm(Function):
    """GroupNorm over channels-last input (flax `nn.GroupNorm`, the BiT ResNet norm).

    Shapes: x (B, H, W, C), scale and bias (C,) or (1, 1, 1, C) -> y (B, H, W, C); statistics per
    sample and group over (H, W, C / groups)
    """

    def __init__(self, num_groups: int = 32, eps: float = 1e-6, relu: bool = False):
        self.num_groups = num_groups
        self.eps = eps
        self.relu = relu

    def _check(self, x, scale, bias):
        c = x.shape[-1] if x.ndim >= 2 else 0
        if c == 0 or c % self.num_groups:
            raise self.shape_error(
                f"input of shape {x.shape} must be (B, ..., C) with C divisible by "
                f"num_groups={self.num_groups}"
            )
        allowed = ((c,), (1,) * (x.ndim - 1) + (c,))
        if scale.shape not in allowed or bias.shape not in allowed:
            raise self.shape_error(
                f"scale {scale.shape} and bias {bias.shape} must be ({c},) or "
                f"{allowed[1]} for an input of shape {x.shape}"
            )

    def forward(self, xp, x, scale, bias):
        self._check(x, scale, bias)
        b, c = x.shape[0], x.shape[-1]
        self.fused = kernels.fusable(x, scale, bias)
        if self.fused:
            rows = x.reshape(b, -1, c)  # (B, H*W, C)
            y, mean, rstd = kernels.groupnorm_forward(
                rows, scale.reshape(c), bias.reshape(c), self.num_groups, self.eps, self.relu
            )  # (B, H*W, C), (B, G), (B, G)
            self.save(rows, mean, rstd, scale.reshape(c), y if self.relu else None)
            return y.reshape(x.shape)
        xg = x.reshape(b, -1, self.num_groups, c // self.num_groups)  # (B, H*W, G, C/G)
        mean, rstd = _statistics(xp, xg, (1, 3), self.eps)  # (B, 1, G, 1) each
        xhat = ((xg - mean) * rstd).reshape(x.shape)  # (B, H, W, C)
        y = xhat * scale.reshape(c) + bias.reshape(c)
        y = xp.maximum(y, 0) if self.relu else y
        self.save(xhat, rstd, scale.reshape(c), y if self.relu else None)
        return y

    def backward(self, xp, gy):
        if self.fused:
            rows, mean, rstd, scale, relu_out = self.saved
            gx, gscale, gbias = kernels.groupnorm_backward(
                gy.reshape(rows.shape), rows, mean, rstd, scale, self.num_groups, relu_out
            )
            return (
                gx.reshape(gy.shape),
                gscale.reshape(self.inputs[1].shape),
                gbias.reshape(self.inputs[2].shape),
            )
        xhat, rstd, scale, relu_out = self.saved
        if relu_out is not None:
            gy = gy * (relu_out > 0)
        b, c = gy.shape[0], gy.shape[-1]
        gx = None
        if self.needs_grad[0]:
            groups = (b, -1, self.num_groups, c // self.num_groups)
            gxhat = (gy * scale).reshape(groups)  # (B, H*W, G, C/G)
            gx = _normalize_backward(gxhat, xhat.reshape(groups), rstd, (1, 3)).reshape(gy.shape)
        rows = gy.reshape(-1, c)  # (B*H*W, C)
        gscale = gbias = None
        if self.needs_grad[1]:
            gscale = (rows * xhat.reshape(-1, c)).sum(axis=0).reshape(self.inputs[1].shape)
        if self.needs_grad[2]:
            gbias = rows.sum(axis=0).reshape(self.inputs[2].shape)
        return gx, gscale, gbias


class WeightStandardize(Function):
    """StdConv weight standardisation: `(w - mean) / (std + eps)` per output channel.

    Shapes: kernel (kh, kw, I, O) (any rank; statistics over all axes but the last) -> same
    """

    def __init__(self, eps: float = 1e-5):
        self.eps = eps

    def forward(self, xp, w):
        if w.ndim < 2:
            raise self.shape_error(f"kernel of shape {w.shape} needs at least two axes (..., O)")
        self.fused = kernels.fusable(w) and not backend.on_gpu(w)
        if self.fused:  # the threaded kernel on the (kh*kw*I, O) rows, float32
            y, mean, std = kernels.standardize_forward(w.reshape(-1, w.shape[-1]), self.eps)
            self.save(w, mean, std)
            return y.reshape(w.shape)
        axes = tuple(range(w.ndim - 1))
        centred = w - w.mean(axis=axes, keepdims=True)  # (kh, kw, I, O)
        std = xp.sqrt((centred * centred).mean(axis=axes, keepdims=True))  # (1, 1, 1, O)
        self.save(centred, std)
        return centred / (std + self.eps)

    def backward(self, xp, gy):
        if self.fused:
            w, mean, std = self.saved
            rows = (-1, w.shape[-1])
            return kernels.standardize_backward(
                gy.reshape(rows), w.reshape(rows), mean, std, self.eps
            ).reshape(w.shape)
        centred, std = self.saved
        axes = tuple(range(gy.ndim - 1))
        n = centred.size // centred.shape[-1]
        denom = std + self.eps
        inv_std = xp.where(std > 0, 1.0 / xp.where(std > 0, std, 1.0), 0.0)  # constant w: 0
        along = (gy * centred).sum(axis=axes, keepdims=True) * inv_std / (n * denom * denom)
        gc = gy / denom - centred * along  # d/d(centred)
        return gc - gc.mean(axis=axes, keepdims=True)


def layer_norm(x, scale, bias, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last axis, flax defaults. Shapes: x (..., D), scale, bias (D,) -> x"""
    return LayerNorm(eps)(x, scale, bias)


def group_norm(x, scale, bias, num_groups: int = 32, eps: float = 1e-6, relu: bool = False):
    """GroupNorm, channels last; `relu=True` is relu(group_norm(...)) as one op.

    Shapes: x (B, H, W, C), scale, bias (C,) or (1,1,1,C) -> x
    """
    return GroupNorm(num_groups, eps, relu)(x, scale, bias)


def weight_standardize(kernel, eps: float = 1e-5) -> Tensor:
    """StdConv kernel standardisation. Shapes: kernel (kh, kw, I, O) -> same"""
    return WeightStandardize(eps)(kernel)

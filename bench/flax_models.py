"""Small Flax (linen) versions of the benchmarked networks, for the JAX column of bench/step.py.

Written for the benchmark only: the same layer shapes and arithmetic as minivit's ViT, MLP-Mixer
and BiT-ResNet hybrid (pre-LN blocks, tanh GELU, StdConv + 32-group GroupNorm), with flax's
default initialisers. They are timed, never compared number by number. Imported only when flax
is installed.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class MlpBlock(nn.Module):
    """Dense -> GELU (tanh form) -> Dense back to the input width. Shapes: (..., D) -> (..., D)."""

    hidden: int

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.hidden)(x))  # (..., M)
        return nn.Dense(x.shape[-1])(y)


class EncoderBlock(nn.Module):
    """x + MHA(LN(x)), then x + MLP(LN(x)). Shapes: (B, N, D) -> (B, N, D)."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y)
        return x + MlpBlock(self.mlp_dim)(nn.LayerNorm()(x))


class StdConv(nn.Module):
    """Weight-standardised conv without bias, TF 'SAME' padding. Shapes: NHWC -> NHWC."""

    features: int
    size: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        shape = (self.size, self.size, x.shape[-1], self.features)
        w = self.param("kernel", nn.initializers.lecun_normal(), shape)  # (kh, kw, I, O)
        mean = w.mean(axis=(0, 1, 2))
        w = (w - mean) / (jnp.sqrt(((w - mean) ** 2).mean(axis=(0, 1, 2))) + 1e-5)
        dims = ("NHWC", "HWIO", "NHWC")
        strides = (self.stride, self.stride)
        return lax.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=dims)


class Bottleneck(nn.Module):
    """BiT ResNetV2 unit: 1x1, 3x3 (stride), 1x1 (4f), each StdConv + GroupNorm; plus residual.

    Shapes: (B, H, W, Cin) -> (B, H/s, W/s, 4f).
    """

    features: int
    stride: int

    @nn.compact
    def __call__(self, x):
        residual = x
        if x.shape[-1] != 4 * self.features or self.stride != 1:
            residual = StdConv(4 * self.features, 1, self.stride)(x)
            residual = nn.GroupNorm(num_groups=32)(residual)
        y = nn.relu(nn.GroupNorm(num_groups=32)(StdConv(self.features, 1)(x)))
        y = nn.relu(nn.GroupNorm(num_groups=32)(StdConv(self.features, 3, self.stride)(y)))
        y = nn.GroupNorm(num_groups=32)(StdConv(4 * self.features, 1)(y))
        return nn.relu(residual + y)


class ResNetRoot(nn.Module):
    """7x7/2 StdConv, GroupNorm, ReLU, 3x3/2 max pool, then the stages.

    Shapes: (B, S, S, 3) -> (B, S/32, S/32, 32 w) for four stages of width w = 64.
    """

    num_layers: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=32)(StdConv(64, 7, 2)(x)))  # (B, S/2, S/2, 64)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")  # (B, S/4, S/4, 64)
        for i, units in enumerate(self.num_layers):
            for j in range(units):
                x = Bottleneck(64 * 2**i, 1 if i == 0 or j > 0 else 2)(x)
        return x


class ViT(nn.Module):
    """ViT classifier (cls token), optionally on a ResNet map. Shapes: (B, S, S, 3) -> (B, C)."""

    patch: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_classes: int
    resnet: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x):
        if self.resnet is not None:
            x = ResNetRoot(self.resnet)(x)
        p = (self.patch, self.patch)
        x = nn.Conv(self.width, p, strides=p, padding="VALID")(x)  # (B, h, w, D)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)  # (B, N, D)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)  # (B, 1+N, D)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, 1 + h * w, d))
        for _ in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim)(x)
        return nn.Dense(self.num_classes)(nn.LayerNorm()(x)[:, 0])


class Mixer(nn.Module):
    """MLP-Mixer classifier. Shapes: (B, S, S, 3) -> (B, classes)."""

    patch: int
    width: int
    depth: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    num_classes: int

    @nn.compact
    def __call__(self, x):
        p = (self.patch, self.patch)
        x = nn.Conv(self.width, p, strides=p, padding="VALID")(x)  # (B, h, w, C)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)  # (B, S, C)
        for _ in range(self.depth):
            y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)  # (B, C, S)
            x = x + jnp.swapaxes(MlpBlock(self.tokens_mlp_dim)(y), 1, 2)  # (B, S, C)
            x = x + MlpBlock(self.channels_mlp_dim)(nn.LayerNorm()(x))
        return nn.Dense(self.num_classes)(nn.LayerNorm()(x).mean(axis=1))

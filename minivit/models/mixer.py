"""MLP-Mixer (Tolstikhin et al. 2021, "MLP-Mixer: An all-MLP Architecture for Vision").

Mirrors `vit_jax/models_mixer.py`: a patch `stem` conv, `MixerBlock_i` blocks that mix across
tokens (`token_mixing`, on the transposed (B, C, T) tensor) and then across channels
(`channel_mixing`), each behind a LayerNorm with a residual, then `pre_head_layer_norm`, a mean
over tokens and the `head`. No class token, no position embedding, no dropout.
"""

from __future__ import annotations

import math

from minivit import nn, ops
from minivit.autograd import Tensor
from minivit.models.config import MixerConfig
from minivit.nn import Module


class MixerBlock(Module):
    """x + token_mixing(LN_0(x)^T)^T, then x + channel_mixing(LN_1(x)).

    Shapes: x (B, T, C) -> (B, T, C); token_mixing T -> Dt -> T, channel_mixing C -> Dc -> C.
    """

    def __init__(self, num_tokens: int, config: MixerConfig):
        super().__init__()
        c = config.hidden_dim
        self.LayerNorm_0 = nn.LayerNorm(c)
        self.token_mixing = nn.MlpBlock(num_tokens, config.tokens_mlp_dim)
        self.LayerNorm_1 = nn.LayerNorm(c)
        self.channel_mixing = nn.MlpBlock(c, config.channels_mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        y = ops.transpose(self.LayerNorm_0(x), (0, 2, 1))  # (B, C, T)
        y = ops.transpose(self.token_mixing(y), (0, 2, 1))  # (B, T, C)
        x = x + y
        return x + self.channel_mixing(self.LayerNorm_1(x))


class MlpMixer(Module):
    """Mixer classifier.

    Shapes: images (B, S, S, 3) in [-1, 1] -> logits (B, classes); features (B, C).
    """

    def __init__(self, config: MixerConfig, num_classes: int, image_size: int):
        super().__init__()
        self.config = config
        patch, c = config.patches[0], config.hidden_dim
        num_tokens = math.ceil(image_size / patch) ** 2  # 'SAME' stem: a partial patch counts
        self.stem = nn.Conv(3, c, patch, stride=patch, padding="SAME")
        for i in range(config.num_blocks):
            setattr(self, f"MixerBlock_{i}", MixerBlock(num_tokens, config))
        self.pre_head_layer_norm = nn.LayerNorm(c)
        self.head = nn.Dense(c, num_classes, kernel_init=nn.zeros, bias_init=nn.zeros)

    def features(self, images: Tensor) -> Tensor:
        """The representation the head reads: the token mean of `pre_head_layer_norm`."""
        x = self.stem(images)  # (B, h, w, C)
        b, h, w, c = x.shape
        x = ops.reshape(x, (b, h * w, c))  # (B, T, C), row-major (h, w) order
        for i in range(self.config.num_blocks):
            x = getattr(self, f"MixerBlock_{i}")(x)
        return ops.mean(self.pre_head_layer_norm(x), axis=1)  # (B, C)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))  # (B, classes)

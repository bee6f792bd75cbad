"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") and its
ResNet hybrids.

Mirrors `vit_jax/models_vit.py`: patch embedding (a P x P conv with stride P), a `cls` token or
global average pooling, learned position embeddings, pre-LN encoder blocks, the final
`encoder_norm`, an optional `pre_logits` Dense + tanh and the `head`. Attribute names are the
scope names of the released checkpoints, including the pre-Linen block children `LayerNorm_0`,
`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`, and attention kernels keep the
flax `DenseGeneral` layouts (D, NH, K) and (NH, K, D).
"""

from __future__ import annotations

import math

import numpy as np

from minivit import nn, ops
from minivit.autograd import Tensor, is_grad_enabled
from minivit.models.config import ViTConfig
from minivit.models.resnet import ResNet
from minivit.nn import Module, Parameter

PACK_ROWS = 1024  # rows (batch x tokens) from which training projects q, k, v as one op


class HeadsProjection(Module):
    """`DenseGeneral` from D features to NH heads of K features (`query`, `key`, `value`).

    Shapes: x (B, N, D) -> (B, N, NH, K); kernel (D, NH, K), bias (NH, K).
    """

    def __init__(self, features: int, num_heads: int, head_dim: int):
        super().__init__()
        fans = (features, num_heads * head_dim)  # flax initialises the flattened (D, NH*K) kernel
        self.kernel = Parameter((features, num_heads, head_dim), nn.xavier_uniform, fans)
        self.bias = Parameter((num_heads, head_dim), nn.zeros)

    def forward(self, x: Tensor) -> Tensor:
        return ops.dense(x, self.kernel, self.bias)  # (B, N, NH, K)


class OutputProjection(Module):
    """`DenseGeneral` from NH heads of K features back to D features (`out`).

    Shapes: x (B, N, NH, K) -> (B, N, D); kernel (NH, K, D), bias (D,).
    """

    def __init__(self, num_heads: int, head_dim: int, features: int):
        super().__init__()
        fans = (num_heads * head_dim, features)
        self.kernel = Parameter((num_heads, head_dim, features), nn.xavier_uniform, fans)
        self.bias = Parameter((features,), nn.zeros)

    def forward(self, x: Tensor) -> Tensor:
        return ops.dense(x, self.kernel, self.bias, in_axes=2)  # (B, N, D)


class MultiHeadDotProductAttention(Module):
    """Self-attention: softmax(q k^T / sqrt(K)) v per head, then the output projection.

    Shapes: x (B, N, D) -> (B, N, D).
    """

    def __init__(self, features: int, num_heads: int, dropout_rate: float):
        super().__init__()
        head_dim = features // num_heads
        self.dropout_rate = dropout_rate
        self.query = HeadsProjection(features, num_heads, head_dim)
        self.key = HeadsProjection(features, num_heads, head_dim)
        self.value = HeadsProjection(features, num_heads, head_dim)
        self.out = OutputProjection(num_heads, head_dim, features)

    def forward(self, x: Tensor) -> Tensor:
        rate = self.dropout_rate if self.training else 0.0
        projections = self.query, self.key, self.value
        if self._packs(x):  # one GEMM for the three projections, their gradients in one buffer
            qkv = ops.heads_projections(
                x, [p.kernel for p in projections], [p.bias for p in projections]
            )  # (B, N, 3, NH, K)
            o = ops.packed_attention(qkv, dropout_rate=rate, rng=self.rng)  # (B, N, NH, K)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)  # (B, N, NH, K) each
            o = ops.dot_product_attention(q, k, v, dropout_rate=rate, rng=self.rng)
        return self.out(o)

    def _packs(self, x: Tensor) -> bool:
        """Project q, k and v as one packed op: when their gradients will be taken over at least
        `PACK_ROWS` rows and no `capture` records the projections one by one.

        The packed op copies the three kernels side by side, O(D^2) per call, and repays it in
        the backward, whose input gradient becomes one product with a 3x longer inner axis and
        whose kernel gradient one product 3x wider, O(rows D^2). `python bench/qkv.py` on 2
        cores, forward+backward, three products / packed: 1.05-1.19x at 1576 and 6304 rows for
        D = 192, 384, 768, 0.86-0.96x at 197 rows; the forward alone 0.84-1.10x, so inference
        keeps the three products.
        """
        if x.size < PACK_ROWS * x.shape[-1] or not is_grad_enabled():  # parameters: trained
            return False
        return not any(nn.capturing(p) for p in (self.query, self.key, self.value))


class Encoder1DBlock(Module):
    """Pre-LN block: x + MHA(LN_0(x)), then x + MLP(LN_2(x)).

    Shapes: x (B, N, D) -> (B, N, D).
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        d = config.hidden_size
        self.dropout_rate = config.dropout_rate
        self.LayerNorm_0 = nn.LayerNorm(d)
        self.MultiHeadDotProductAttention_1 = MultiHeadDotProductAttention(
            d, config.num_heads, config.attention_dropout_rate
        )
        self.LayerNorm_2 = nn.LayerNorm(d)
        self.MlpBlock_3 = nn.MlpBlock(
            d, config.mlp_dim, config.dropout_rate, nn.xavier_uniform, nn.normal(1e-6)
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.MultiHeadDotProductAttention_1(self.LayerNorm_0(x))
        x = x + self.dropout(y, self.dropout_rate)
        return x + self.MlpBlock_3(self.LayerNorm_2(x))


class AddPositionEmbs(Module):
    """Adds the learned position embedding; row 0 is the `cls` position for classifier token.

    Shapes: x (B, N, D) -> (B, N, D); pos_embedding (1, N, D).
    """

    def __init__(self, num_tokens: int, features: int):
        super().__init__()
        self.pos_embedding = Parameter((1, num_tokens, features), nn.normal(0.02))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pos_embedding


class Encoder(Module):
    """`Transformer`: position embeddings, dropout, `encoderblock_0..L-1`, `encoder_norm`.

    Shapes: x (B, N, D) -> (B, N, D).
    """

    def __init__(self, config: ViTConfig, num_tokens: int):
        super().__init__()
        self.num_layers = config.num_layers
        self.dropout_rate = config.dropout_rate
        self.posembed_input = AddPositionEmbs(num_tokens, config.hidden_size)
        for i in range(config.num_layers):
            setattr(self, f"encoderblock_{i}", Encoder1DBlock(config))
        self.encoder_norm = nn.LayerNorm(config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(self.posembed_input(x), self.dropout_rate)
        for i in range(self.num_layers):
            x = getattr(self, f"encoderblock_{i}")(x)
        return self.encoder_norm(x)


def token_grid(config: ViTConfig, image_size: int) -> int:
    """Side of the token grid: the ResNet's TF 'SAME' strides (ceil), then the VALID patch conv."""
    side = image_size
    if config.resnet is not None:
        num_halvings = 2 + max(len(config.resnet.num_layers) - 1, 0)  # root conv, pool, stages 2..
        for _ in range(num_halvings):
            side = math.ceil(side / 2)
    return side // config.patches[0]


class VisionTransformer(Module):
    """ViT or hybrid classifier.

    Shapes: images (B, S, S, 3) in [-1, 1] -> logits (B, classes); features (B, R or D).
    """

    def __init__(self, config: ViTConfig, num_classes: int, image_size: int):
        super().__init__()
        if config.classifier not in ("token", "gap"):
            raise ValueError(f"classifier must be 'token' or 'gap', got {config.classifier!r}")
        self.config = config
        in_features = 3
        self.resnet = None
        if config.resnet is not None:
            self.resnet = ResNet(config.resnet)
            in_features = self.resnet.out_features
        patch, d = config.patches[0], config.hidden_size
        self.embedding = nn.Conv(in_features, d, patch, stride=patch, padding="VALID")
        num_tokens = token_grid(config, image_size) ** 2
        if config.classifier == "token":
            self.cls = Parameter((1, 1, d), nn.zeros)
            num_tokens += 1
        self.Transformer = Encoder(config, num_tokens)
        features = d
        if config.representation_size is not None:
            self.pre_logits = nn.Dense(d, config.representation_size)
            features = config.representation_size
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Dense(features, num_classes, kernel_init=nn.zeros, bias_init=nn.zeros)

    def features(self, images: Tensor) -> Tensor:
        """The representation the head reads: pooled `encoder_norm` output, after `pre_logits`."""
        x = images if self.resnet is None else self.resnet(images)  # (B, H', W', C)
        x = self.embedding(x)  # (B, h, w, D)
        b, h, w, d = x.shape
        x = ops.reshape(x, (b, h * w, d))  # (B, N, D), row-major (h, w) order
        if self.config.classifier == "token":
            cls = ops.broadcast_to(self.cls, (b, 1, d))  # (B, 1, D)
            x = ops.concat([cls, x], axis=1)  # (B, 1+N, D)
        x = self.Transformer(x)
        if self.config.classifier == "token":
            x = ops.index(x, (slice(None), 0))  # (B, D): the cls token
        else:
            x = ops.mean(x, axis=1)  # (B, D)
        x = self.pre_logits(x)
        return ops.tanh(x) if self.config.representation_size is not None else x

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))  # (B, classes)


def attention_maps(outputs: dict[str, np.ndarray], num_layers: int) -> list[np.ndarray]:
    """Per-layer attention probabilities from the captured `query` and `key` projections.

    Shapes: query, key (B, N, NH, K) -> one (B, NH, N, N) array per layer, rows summing to 1.
    """
    maps = []
    for i in range(num_layers):
        scope = f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1"
        q, k = outputs[f"{scope}/query"], outputs[f"{scope}/key"]
        q = q / np.sqrt(np.float32(q.shape[-1]))  # scaled before the product, as flax does
        logits = np.einsum("bqhd,bkhd->bhqk", q, k)  # (B, NH, N, N)
        logits = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        maps.append(probs / probs.sum(axis=-1, keepdims=True))
    return maps

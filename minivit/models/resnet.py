"""BiT ResNetV2 body of the ResNet+ViT hybrids (Kolesnikov et al. 2020, "Big Transfer").

Mirrors `vit_jax/models_resnet.py` and the ResNet part of `vit_jax/models_vit.py`: every
convolution is a weight-standardised `StdConv` without bias, every normalisation a 32-group
GroupNorm, the root is a 7x7/2 conv + GroupNorm + ReLU + 3x3/2 max pool (TF 'SAME' padding), and
each stage is a run of bottleneck units whose first unit carries the stride (on its 3x3 conv and
its projection). Parameter names and the (1, 1, 1, C) GroupNorm shapes are those of the released
hybrid checkpoints (`conv_root/kernel`, `block1/unit1/gn_proj/scale`, ...).
"""

from __future__ import annotations

from minivit import nn, ops
from minivit.autograd import Tensor
from minivit.models.config import ResNetConfig
from minivit.nn import Module


class StdConv(nn.Conv):
    """Conv without bias whose kernel is standardised at every call:
    `(w - mean) / (std + 1e-5)` per output channel over (kh, kw, in).

    Shapes: x (B, H, W, I) -> (B, H', W', O); kernel (kh, kw, I, O), stored raw.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int = 1):
        super().__init__(in_features, out_features, kernel_size, stride, "SAME", use_bias=False)

    def forward(self, x: Tensor) -> Tensor:
        kernel = ops.weight_standardize(self.kernel, eps=1e-5)
        return ops.conv2d(x, kernel, None, stride=self.stride, padding=self.padding)


class ResidualUnit(Module):
    """Bottleneck unit: 1x1 -> 3x3 (stride) -> 1x1 (4f channels), each StdConv + GroupNorm,
    added to the input or to its projection.

    Shapes: x (B, H, W, Cin) -> (B, H/s, W/s, 4f).
    """

    def __init__(self, in_features: int, features: int, stride: int):
        super().__init__()
        self.needs_projection = in_features != 4 * features or stride != 1
        if self.needs_projection:
            self.conv_proj = StdConv(in_features, 4 * features, 1, stride)
            self.gn_proj = nn.GroupNorm(4 * features)
        self.conv1 = StdConv(in_features, features, 1)
        self.gn1 = nn.GroupNorm(features)
        self.conv2 = StdConv(features, features, 3, stride)
        self.gn2 = nn.GroupNorm(features)
        self.conv3 = StdConv(features, 4 * features, 1)
        self.gn3 = nn.GroupNorm(4 * features, scale_init=nn.zeros)  # officially zero-initialised

    def forward(self, x: Tensor) -> Tensor:
        residual = self.gn_proj(self.conv_proj(x)) if self.needs_projection else x
        y = self.gn1.relu(self.conv1(x))  # (B, H, W, f)
        y = self.gn2.relu(self.conv2(y))  # (B, H/s, W/s, f)
        y = self.gn3(self.conv3(y))  # (B, H/s, W/s, 4f)
        return ops.add_relu(residual, y)


class ResNetStage(Module):
    """`unit1..unitN`; only `unit1` strides.

    Shapes: x (B, H, W, Cin) -> (B, H/s, W/s, 4f).
    """

    def __init__(self, in_features: int, features: int, num_units: int, stride: int):
        super().__init__()
        self.num_units = num_units
        for i in range(1, num_units + 1):
            unit_in = in_features if i == 1 else 4 * features
            setattr(self, f"unit{i}", ResidualUnit(unit_in, features, stride if i == 1 else 1))

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.num_units + 1):
            x = getattr(self, f"unit{i}")(x)
        return x


class ResNet(Module):
    """Root (`conv_root`, `gn_root`, ReLU, max pool) and stages `block1..`; its parameters live at
    the top scope of the hybrid, as in the official checkpoints.

    Shapes: images (B, H, W, 3) -> (B, H/4, W/4, w) for the root alone (num_layers ()), else
    (B, H/2^(1+S), W/2^(1+S), 4w*2^(S-1)) after S stages; w = int(64 * width_factor).
    """

    inline = True

    def __init__(self, config: ResNetConfig):
        super().__init__()
        width = int(64 * config.width_factor)
        self.num_stages = len(config.num_layers)
        self.conv_root = StdConv(3, width, 7, stride=2)
        self.gn_root = nn.GroupNorm(width)
        in_features = width
        for i, num_units in enumerate(config.num_layers):
            features = width * 2**i
            stage = ResNetStage(in_features, features, num_units, stride=1 if i == 0 else 2)
            setattr(self, f"block{i + 1}", stage)
            in_features = 4 * features
        self.out_features = in_features  # channels of the feature map the ViT embedding reads

    def forward(self, images: Tensor) -> Tensor:
        x = self.gn_root.relu(self.conv_root(images))  # (B, H/2, W/2, w)
        x = ops.max_pool(x, window=3, stride=2, padding="SAME")  # (B, H/4, W/4, w)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"block{i}")(x)
        return x

"""The model families (ViT, ResNet+ViT hybrids, MLP-Mixer) and the calls that make them.

`build_model(config, num_classes, image_size)` builds a network for a config and
`create_model(name, ...)` adds the official initialisation; reading a released checkpoint is
`minivit.load` (`minivit.checkpoint.load`, the layer above this one).
"""

from __future__ import annotations

from minivit.models.config import MixerConfig, ResNetConfig, ViTConfig
from minivit.models.model import Model, build_model, create_model

__all__ = [
    "MixerConfig",
    "Model",
    "ResNetConfig",
    "ViTConfig",
    "build_model",
    "create_model",
]

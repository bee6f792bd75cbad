"""The model families (ViT, ResNet+ViT hybrids, MLP-Mixer) and the calls that make them.

`build_model(config, num_classes, image_size)` builds a network for a config,
`create_model(name, ...)` adds the official initialisation, and `load(path, ...)` reads a released
checkpoint (architecture inferred from the file) through `minivit.checkpoint`.
"""

from __future__ import annotations

import os

from minivit.models.config import MixerConfig, ResNetConfig, ViTConfig
from minivit.models.model import Model, build_model, create_model

__all__ = [
    "MixerConfig",
    "Model",
    "ResNetConfig",
    "ViTConfig",
    "build_model",
    "create_model",
    "load",
]


def load(
    path_or_url: str | os.PathLike,
    num_classes: int | None = None,
    image_size: int | None = None,
    representation_size: int | None = None,
    model: str | None = None,
) -> Model:
    """A model with the weights of a released checkpoint (local path, `https://` or `gs://`).

    With `num_classes` / `image_size` it is prepared for fine-tuning as the official
    `load_pretrained` does; see `minivit.checkpoint.load`.
    """
    from minivit import checkpoint  # noqa: PLC0415  (checkpoint is the layer above models)

    return checkpoint.load(
        path_or_url,
        num_classes=num_classes,
        image_size=image_size,
        representation_size=representation_size,
        model=model,
    )

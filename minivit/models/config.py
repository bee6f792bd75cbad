"""Architecture configs, one frozen dataclass per family, fields named as in the official configs.

Mirrors `vit_jax/configs/models.py` of google-research/vision_transformer: the field names are the
official ones so a config reads the same here and there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResNetConfig:
    """The BiT ResNetV2 stem and stages of a hybrid (`config.resnet`)."""

    num_layers: tuple[int, ...]  # bottleneck units per stage; () = root only (R+ViT-Ti_16)
    width_factor: float  # root width = int(64 * width_factor)


@dataclass(frozen=True)
class ViTConfig:
    """A Vision Transformer, optionally fed by a ResNet (hybrid)."""

    name: str  # official name, e.g. "ViT-B_16" ("custom" when inferred from an unknown file)
    patches: tuple[int, int]  # (P, P) of the embedding conv (on the ResNet map for hybrids)
    hidden_size: int  # D
    mlp_dim: int  # M
    num_heads: int  # NH
    num_layers: int  # encoder blocks
    classifier: str = "token"  # "token" (cls token) or "gap" (mean of the encoder_norm output)
    representation_size: int | None = None  # R: pre_logits Dense + tanh, None = identity
    dropout_rate: float = 0.0  # after the MLP dense layers and the position embedding
    attention_dropout_rate: float = 0.0  # on attention probabilities
    resnet: ResNetConfig | None = None  # set for hybrids

    family = "vit"


@dataclass(frozen=True)
class MixerConfig:
    """An MLP-Mixer."""

    name: str  # official name, e.g. "Mixer-B_16"
    patches: tuple[int, int]  # stem patch size
    hidden_dim: int  # C
    num_blocks: int  # mixer blocks
    tokens_mlp_dim: int  # Dt
    channels_mlp_dim: int  # Dc

    family = "mixer"

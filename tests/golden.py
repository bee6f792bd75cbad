"""Reading the golden fixtures: their names and the minivit config of their official config.json."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from minivit.models.config import MixerConfig, ResNetConfig, ViTConfig

MODEL_FIXTURES = [
    "vit_tiny_token",
    "vit_tiny_prelogits",
    "vit_tiny_gap",
    "hybrid_tiny",
    "hybrid_stem_tiny",
    "mixer_tiny",
]


def config_from_json(model_config: dict) -> ViTConfig | MixerConfig:
    """A minivit config (named "custom", as inference names it) from an official `model_config`."""
    patches = tuple(model_config["patches"]["size"])
    if "hidden_dim" in model_config:
        return MixerConfig(
            "custom",
            patches,
            model_config["hidden_dim"],
            model_config["num_blocks"],
            model_config["tokens_mlp_dim"],
            model_config["channels_mlp_dim"],
        )
    t, resnet = model_config["transformer"], model_config.get("resnet")
    return ViTConfig(
        "custom",
        patches,
        model_config["hidden_size"],
        t["mlp_dim"],
        t["num_heads"],
        t["num_layers"],
        model_config["classifier"],
        model_config["representation_size"],
        t["dropout_rate"],
        t["attention_dropout_rate"],
        None
        if resnet is None
        else ResNetConfig(tuple(resnet["num_layers"]), resnet["width_factor"]),
    )


def fixture_config(path: Path) -> tuple[ViTConfig | MixerConfig, int, int]:
    """(config under its official model name, num_classes, image_size) of a config.json file."""
    meta = json.loads(path.read_text())
    config = replace(
        config_from_json(meta["model_config"]), name=meta["model_config"]["model_name"]
    )
    return config, meta["num_classes"], meta["image_size"]

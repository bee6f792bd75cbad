"""The registry: official names and configs, parameter counts, spellings, AugReg file names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden import MODEL_FIXTURES, config_from_json

from minivit.models.config import MixerConfig, ResNetConfig
from minivit.models.registry import (
    MODELS,
    AugRegName,
    feature_grid,
    param_count,
    param_shapes,
    parse_augreg,
    resolve,
)

# Parameter counts at 1000 classes and 224x224 from the official test
# google-research/vision_transformer vit_jax/models_test.py, MODEL_SIZES (commit c6de1e53,
# the commit the golden fixtures were generated from); LiT and `testing` entries left out.
OFFICIAL_PARAM_COUNTS = {
    "Mixer-B_16": 59_880_472,
    "Mixer-B_32": 60_293_428,
    "Mixer-L_16": 208_196_168,
    "R+ViT-Ti_16": 6_337_704,
    "R26+ViT-B_32": 101_383_976,
    "R26+ViT-S_32": 36_431_912,
    "R50+ViT-B_16": 98_659_112,
    "R50+ViT-L_32": 328_994_856,
    "ViT-B_8": 86_576_872,
    "ViT-B_16": 86_567_656,
    "ViT-B_16-gap-norep": 86_566_120,
    "ViT-B_32": 88_224_232,
    "ViT-B_32-gap-norep": 88_222_696,
    "ViT-H_14": 632_045_800,
    "ViT-L_16": 304_326_632,
    "ViT-L_32": 306_535_400,
    "ViT-S_16": 22_050_664,
    "ViT-S_16-gap-norep": 22_049_896,
    "ViT-S_32": 22_878_952,
    "ViT-S_32-gap-norep": 22_878_184,
    "ViT-Ti_16": 5_717_416,
}


def test_registry_holds_every_official_image_model():
    assert set(MODELS) == set(OFFICIAL_PARAM_COUNTS)
    assert all(config.name == name for name, config in MODELS.items())


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_param_count_matches_official(name):
    assert (
        param_count(MODELS[name], num_classes=1000, image_size=224) == (OFFICIAL_PARAM_COUNTS[name])
    )


def test_configs_match_official_fields():
    # Values as written in vit_jax/configs/models.py.
    assert MODELS["ViT-L_16"].dropout_rate == 0.1
    assert MODELS["ViT-L_32"].dropout_rate == 0.0
    assert MODELS["ViT-H_14"].dropout_rate == 0.1 and MODELS["ViT-H_14"].patches == (14, 14)
    assert MODELS["ViT-B_8"].patches == (8, 8)
    r50 = MODELS["R50+ViT-B_16"]
    assert (r50.resnet, r50.patches, r50.dropout_rate) == (ResNetConfig((3, 4, 9), 1), (1, 1), 0.1)
    r26 = MODELS["R26+ViT-S_32"]
    assert (r26.resnet, r26.hidden_size, r26.num_heads) == (ResNetConfig((2, 2, 2, 2), 1), 384, 6)
    rti = MODELS["R+ViT-Ti_16"]
    assert (rti.resnet, rti.patches, rti.hidden_size) == (ResNetConfig((), 1), (8, 8), 192)
    assert MODELS["R50+ViT-L_32"].resnet == ResNetConfig((3, 4, 6, 3), 1)
    assert MODELS["Mixer-L_16"] == MixerConfig("Mixer-L_16", (16, 16), 1024, 24, 512, 4096)
    assert all(getattr(c, "attention_dropout_rate", 0.0) == 0.0 for c in MODELS.values())


@pytest.mark.parametrize("fixture", MODEL_FIXTURES)
def test_param_shapes_match_golden_files(golden_tiny, fixture):
    meta = json.loads((golden_tiny / fixture / "config.json").read_text())
    config = config_from_json(meta["model_config"])
    shapes = param_shapes(config, meta["num_classes"], meta["image_size"])
    with np.load(golden_tiny / fixture / "model.npz") as npz:
        assert {key: npz[key].shape for key in npz.files} == shapes
    assert param_count(config, meta["num_classes"], meta["image_size"]) == meta["param_count"]


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("ViT-B_16", "ViT-B_16"),
        ("ViT-B/16", "ViT-B_16"),
        ("B/16", "ViT-B_16"),
        ("B_16", "ViT-B_16"),
        ("b_16", "ViT-B_16"),
        ("ViT-B_16.npz", "ViT-B_16"),
        ("R50+ViT-B_16", "R50+ViT-B_16"),
        ("R50-ViT-B_16", "R50+ViT-B_16"),
        ("R50_B_16", "R50+ViT-B_16"),
        ("R_Ti_16", "R+ViT-Ti_16"),
        ("R26_S_32", "R26+ViT-S_32"),
        ("R50_L_32", "R50+ViT-L_32"),
        ("Mixer-B_16", "Mixer-B_16"),
        ("Mixer-L/16", "Mixer-L_16"),
        ("ViT-H/14", "ViT-H_14"),
        ("S_16-gap-norep", "ViT-S_16-gap-norep"),
    ],
)
def test_resolve_spellings(spelling, name):
    config, augreg = resolve(spelling)
    assert config == MODELS[name]
    assert augreg is None


AUGREG_FILE = (
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"
    "--imagenet2012-steps_20k-lr_0.03-res_384"
)


@pytest.mark.parametrize(
    "spelling",
    [AUGREG_FILE, AUGREG_FILE + ".npz", "gs://vit_models/augreg/" + AUGREG_FILE + ".npz"],
)
def test_resolve_augreg_file_name(spelling):
    config, augreg = resolve(spelling)
    assert augreg == AugRegName(
        model="ViT-B_16",
        upstream="i21k",
        epochs=300,
        lr=0.001,
        aug="medium1",
        wd=0.1,
        do=0.0,
        sd=0.0,
        downstream="imagenet2012",
        steps=20_000,
        downstream_lr=0.03,
        res=384,
    )
    assert config == MODELS["ViT-B_16"]


def test_augreg_upstream_file_and_dropout_reset():
    name = "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.1-sd_0.1.npz"
    augreg = parse_augreg(name)
    assert (augreg.model, augreg.aug, augreg.wd, augreg.do, augreg.sd) == (
        "R+ViT-Ti_16",
        "none",
        0.03,
        0.1,
        0.1,
    )
    assert augreg.downstream is None and augreg.res is None and augreg.steps is None
    # Like vit_jax/configs/augreg.py: no dropout when fine-tuning an AugReg checkpoint.
    config, _ = resolve("L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1")
    assert config.dropout_rate == 0.0 and MODELS["ViT-L_16"].dropout_rate == 0.1


def test_parse_augreg_rejects_plain_names():
    assert parse_augreg("ViT-B_16.npz") is None
    assert parse_augreg("X_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0") is None


@pytest.mark.parametrize(
    ("typo", "suggested"),
    [("ViT-B_17", "ViT-B_16"), ("R50+ViT-B_61", "R50+ViT-B_16"), ("Mixer-B_15", "Mixer-B_16")],
)
def test_unknown_name_lists_closest(typo, suggested):
    with pytest.raises(ValueError, match="closest valid names") as error:
        resolve(typo)
    message = str(error.value)
    assert suggested in message and typo in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "image_size", "grid"),
    [
        ("ViT-B_16", 224, (14, 14)),
        ("ViT-B_16", 384, (24, 24)),
        ("ViT-H_14", 518, (37, 37)),
        ("R50+ViT-B_16", 384, (24, 24)),
        ("R+ViT-Ti_16", 224, (7, 7)),
        ("R26+ViT-S_32", 224, (7, 7)),
        ("Mixer-B_16", 224, (14, 14)),
    ],
)
def test_feature_grid(name, image_size, grid):
    assert feature_grid(MODELS[name], image_size) == grid

"""Checkpoint files: reading, atomic writing, architecture inference, fine-tune preparation,
position-embedding resizing against the official code, loading and inspection."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from golden import MODEL_FIXTURES, config_from_json

from minivit import checkpoint
from minivit.checkpoint import (
    POSEMB,
    CheckpointError,
    infer_config,
    prepare_finetune,
    read_npz,
    resize_posemb,
    write_npz,
)

BLOCK0 = "Transformer/encoderblock_0/"


def fixture_params(golden: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(golden / name / "model.npz") as npz:
        return {key: npz[key] for key in npz.files}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def needs_models():
    """`minivit.models.build_model`, or skip while the models layer is not there yet."""
    models = pytest.importorskip("minivit.models", reason="minivit.models not built yet")
    if not hasattr(models, "build_model"):
        pytest.skip("minivit.models.build_model does not exist yet")
    return models


# ---- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", [*MODEL_FIXTURES, "posemb_resize", "trainer_trajectory"])
def test_read_npz_returns_file_arrays(golden_tiny, fixture):
    params = read_npz(golden_tiny / fixture / "model.npz")
    reference = fixture_params(golden_tiny, fixture)
    assert params.keys() == reference.keys()
    for key, value in params.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, reference[key])


def test_read_npz_strips_prefixes_and_linen_names(golden_tiny, tmp_path):
    reference = fixture_params(golden_tiny, "vit_tiny_token")
    old = {f"opt/target/{k}": v for k, v in reference.items()}
    old["opt/state/step"] = np.zeros(())  # optimizer state beside the target: dropped
    np.savez(tmp_path / "old.npz", **old)
    linen = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
             "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}  # fmt: skip
    big_vision = {}
    for key, value in reference.items():
        for released, linen_name in linen.items():
            key = key.replace(f"/{released}/", f"/{linen_name}/")
        big_vision["params/" + key.replace(POSEMB, "pos_embedding")] = value
    np.savez(tmp_path / "big_vision.npz", **big_vision)
    for name in ("old.npz", "big_vision.npz"):
        params = read_npz(tmp_path / name)
        assert params.keys() == reference.keys()
        assert all(np.array_equal(params[k], reference[k]) for k in reference)


def test_read_npz_widens_bfloat16_and_float16(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16: top 16 bits
    expected_bf16 = (bits.astype(np.uint32) << 16).view(np.float32)
    np.savez(
        tmp_path / "mixed.npz",
        void=bits.view("V2"),  # how a bfloat16 array reads without ml_dtypes
        bits=bits,
        half=values.astype(np.float16),
        double=values.astype(np.float64),
    )
    params = read_npz(tmp_path / "mixed.npz")
    assert all(v.dtype == np.float32 for v in params.values())
    np.testing.assert_array_equal(params["void"], expected_bf16)
    np.testing.assert_array_equal(params["bits"], expected_bf16)
    np.testing.assert_array_equal(params["half"], values.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(params["double"], values)


def truncated_zip(golden: Path) -> bytes:
    data = (golden / "vit_tiny_token" / "model.npz").read_bytes()
    return data[: len(data) // 2]


def pytorch_like_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return buffer.getvalue()


BAD_FILES = {
    "flax_msgpack": (lambda g: b"\x82\xa6params\x81\xa3cls\xc4\x00\xa4step\x00", "Flax msgpack"),
    "html_error": (lambda g: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "HTML"),
    "gcs_xml_error": (lambda g: b"<?xml version='1.0'?><Error><Code>AccessDenied</Code>", "HTML"),
    "git_lfs": (
        lambda g: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 3\n",
        "Git LFS pointer",
    ),
    "truncated_zip": (truncated_zip, "truncated or damaged"),
    "npy": (lambda g: b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'", "single .npy array"),
    "pytorch_zip": (lambda g: pytorch_like_zip(), "not an .npz of arrays"),
    "text": (lambda g: b"hello", "not an .npz checkpoint"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_get_one_sentence_and_nothing_written(golden_tiny, tmp_path, monkeypatch, kind):
    make, phrase = BAD_FILES[kind]
    path = tmp_path / "in" / "ViT-B_16.npz"
    path.parent.mkdir()
    path.write_bytes(make(golden_tiny))
    monkeypatch.setenv("MINIVIT_CACHE", str(tmp_path / "cache"))
    before = files_under(tmp_path)
    with pytest.raises(CheckpointError, match=phrase) as error:
        read_npz(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(CheckpointError, match=phrase):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match=phrase):
        checkpoint.convert(path, tmp_path / "out.safetensors")
    assert files_under(tmp_path) == before


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_npz(tmp_path / "nope.npz")


# ---- writing -------------------------------------------------------------------------------------


def test_write_npz_is_plain_savez_layout(golden_tiny, tmp_path):
    params = fixture_params(golden_tiny, "hybrid_tiny")
    write_npz(tmp_path / "out.npz", params)
    with zipfile.ZipFile(tmp_path / "out.npz") as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == [f"{k}.npy" for k in params]
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    with np.load(tmp_path / "out.npz") as npz:
        assert all(np.array_equal(npz[k], v) and npz[k].dtype == v.dtype for k, v in params.items())
    assert files_under(tmp_path) == {tmp_path / "out.npz"}


class Exploding:
    """An array-like that fails when written: a write interrupted half way."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("disk full")


def test_write_npz_failure_keeps_old_file(golden_tiny, tmp_path):
    target = tmp_path / "model.npz"
    target.write_bytes(b"previous contents")
    params = {**fixture_params(golden_tiny, "vit_tiny_token"), "zzz": Exploding()}
    with pytest.raises(RuntimeError, match="disk full"):
        write_npz(target, params)
    assert target.read_bytes() == b"previous contents"
    assert files_under(tmp_path) == {target}


def test_write_npz_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        write_npz(tmp_path / "no" / "dir.npz", {"a": np.zeros(1)})


# ---- architecture inference ----------------------------------------------------------------------


@pytest.mark.parametrize("fixture", MODEL_FIXTURES)
def test_infer_config_reproduces_official_config(golden_tiny, fixture):
    meta = json.loads((golden_tiny / fixture / "config.json").read_text())
    config, info = infer_config(read_npz(golden_tiny / fixture / "model.npz"))
    assert config == config_from_json(meta["model_config"])
    assert (info.name, info.image_size, info.num_classes) == ("custom", meta["image_size"], 10)
    assert info.param_count == meta["param_count"]
    assert info.family == ("mixer" if "mixer" in fixture else "hybrid" if "hybrid" in fixture
                           else "vit")  # fmt: skip
    assert not info.head_is_zero


@pytest.mark.parametrize(("fixture", "name"), [("Ti_16", "ViT-Ti_16"), ("R_Ti_16", "R+ViT-Ti_16")])
def test_infer_config_names_official_models(golden_full, fixture, name):
    meta = json.loads((golden_full / fixture / "config.json").read_text())
    config, info = infer_config(read_npz(golden_full / fixture / "model.npz"))
    assert replace(config, name="custom") == config_from_json(meta["model_config"])
    assert config.name == info.name == name == meta["model_config"]["model_name"]
    assert (info.image_size, info.num_classes, info.param_count) == (224, 1000, meta["param_count"])


def test_infer_config_accepts_flat_group_norm(golden_tiny):
    params = fixture_params(golden_tiny, "hybrid_tiny")
    flat = {k: v.reshape(-1) if "/gn" in k or k.startswith("gn_") else v for k, v in params.items()}
    assert flat["gn_root/scale"].shape == (32,)
    assert infer_config(flat)[0] == infer_config(params)[0]


def test_infer_config_keeps_representation_with_registry_name():
    from minivit.models.registry import MODELS, param_shapes

    shapes = param_shapes(replace(MODELS["ViT-S_32"], representation_size=384), 21843, 224)
    params = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
    config, info = infer_config(params)
    assert config == replace(MODELS["ViT-S_32"], representation_size=384)
    assert info.head_is_zero and info.num_classes == 21843 and info.grid == (7, 7)


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda p: p.pop(BLOCK0 + "LayerNorm_2/bias"), "lacks key 'Transformer/encoderblock_0/La"),
        (lambda p: p.update({"extra/kernel": np.zeros(3)}), "has key 'extra/kernel'"),
        (
            lambda p: p.update({BLOCK0 + "MlpBlock_3/Dense_1/kernel": np.zeros((65, 32))}),
            "fits no known architecture",
        ),
        (lambda p: p.update({"embedding/kernel": np.zeros((8, 8, 32))}), "4-dimensional"),
        (lambda p: p.pop("head/kernel"), "no key 'head/kernel'"),
        (lambda p: p.clear(), "neither 'embedding/kernel'"),
    ],
)
def test_infer_config_bad_params(golden_tiny, edit, phrase):
    params = fixture_params(golden_tiny, "vit_tiny_token")
    edit(params)
    with pytest.raises(CheckpointError, match=phrase) as error:
        infer_config(params)
    assert "\n" not in str(error.value)


def test_non_square_grid_needs_image_size(golden_tiny, tmp_path):
    params = fixture_params(golden_tiny, "vit_tiny_token")
    params[POSEMB] = params[POSEMB][:, :13]  # cls + 12 grid rows: 3 x 4 patches of 8 pixels
    with pytest.raises(CheckpointError, match="not a square grid.*pass image_size"):
        infer_config(params)
    assert infer_config(params, image_size=24)[1].grid == (3, 4)
    np.savez(tmp_path / "wide.npz", **params)
    with pytest.raises(CheckpointError, match="not a square grid.*pass image_size"):
        checkpoint.load(tmp_path / "wide.npz")


# ---- fine-tune preparation -----------------------------------------------------------------------


def test_prepare_finetune_reproduces_official_load_pretrained(golden_tiny):
    source = read_npz(golden_tiny / "posemb_resize" / "model.npz")
    loaded = read_npz(golden_tiny / "posemb_resize" / "loaded.npz")
    config, _ = infer_config(source)
    prepared = prepare_finetune(source, config, num_classes=5, image_size=48)
    assert prepared.keys() == loaded.keys()
    for key in loaded:
        assert prepared[key].shape == loaded[key].shape and prepared[key].dtype == np.float32
        np.testing.assert_allclose(prepared[key], loaded[key], rtol=0, atol=1e-7, err_msg=key)
    expected = np.load(golden_tiny / "posemb_resize" / "expected.npz")
    np.testing.assert_allclose(prepared[POSEMB], expected["posemb_resized"], rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("old", "new", "classifier"),
    [((4, 4), (6, 6), "token"), ((7, 7), (12, 12), "gap"), ((5, 5), (3, 3), "token"),
     ((3, 4), (5, 5), "token"), ((4, 4), (1, 1), "gap")],
)  # fmt: skip
def test_resize_posemb_matches_scipy_zoom(old, new, classifier):
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    tokens = classifier == "token"
    posemb = rng.standard_normal((1, tokens + old[0] * old[1], 16)).astype(np.float32)
    grid = posemb[0, tokens:].reshape(*old, 16)
    zoom = (new[0] / old[0], new[1] / old[1], 1)
    reference = ndimage.zoom(grid, zoom, order=1).reshape(1, -1, 16)
    resized = resize_posemb(posemb, new, classifier, old_grid=old)
    assert resized.shape == (1, tokens + new[0] * new[1], 16) and resized.dtype == np.float32
    np.testing.assert_allclose(resized[:, tokens:], reference, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(resized[:, :tokens], posemb[:, :tokens])


def test_prepare_finetune_representation_layer(golden_tiny):
    params = read_npz(golden_tiny / "vit_tiny_prelogits" / "model.npz")
    config, _ = infer_config(params)
    dropped = prepare_finetune(params, config, num_classes=3, image_size=32)
    assert "pre_logits/kernel" not in dropped and dropped["head/kernel"].shape == (32, 3)
    kept = prepare_finetune(params, config, 3, 32, representation_size=24)
    np.testing.assert_array_equal(kept["pre_logits/kernel"], params["pre_logits/kernel"])
    assert kept["head/kernel"].shape == (24, 3) and not np.any(kept["head/kernel"])
    assert not np.any(kept["head/bias"])
    with pytest.raises(CheckpointError, match="representation size is 24"):
        prepare_finetune(params, config, 3, 32, representation_size=16)


def test_mixer_cannot_change_resolution(golden_tiny):
    params = read_npz(golden_tiny / "mixer_tiny" / "model.npz")
    config, _ = infer_config(params)
    assert prepare_finetune(params, config, 4, 32)["head/kernel"].shape == (32, 4)
    with pytest.raises(CheckpointError, match="token-mixing"):
        prepare_finetune(params, config, 4, 48)


# ---- loading, saving, inspecting -----------------------------------------------------------------


@pytest.mark.parametrize("fixture", MODEL_FIXTURES)
def test_load_save_load_round_trip(golden_tiny, tmp_path, fixture):
    needs_models()
    inputs = np.load(golden_tiny / fixture / "inputs.npz")["images"]
    expected = np.load(golden_tiny / fixture / "expected.npz")["logits"]
    model = checkpoint.load(golden_tiny / fixture / "model.npz")
    logits = model.predict(inputs)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    model.save(tmp_path / "saved.npz")
    saved, source = read_npz(tmp_path / "saved.npz"), fixture_params(golden_tiny, fixture)
    assert saved.keys() == source.keys()
    assert all(np.array_equal(saved[k], source[k]) for k in source)
    np.testing.assert_array_equal(checkpoint.load(tmp_path / "saved.npz").predict(inputs), logits)


def test_load_for_finetuning_matches_official(golden_tiny):
    needs_models()
    directory = golden_tiny / "posemb_resize"
    model = checkpoint.load(directory / "model.npz", num_classes=5, image_size=48)
    assert (model.num_classes, model.image_size) == (5, 48)
    expected = np.load(directory / "expected.npz")
    images = np.load(directory / "inputs.npz")["images"]
    np.testing.assert_allclose(model.features(images), expected["pre_logits"], rtol=0, atol=1e-5)
    assert not np.any(model.predict(images))


def test_load_flat_group_norm_and_resolution_only(golden_tiny, tmp_path):
    needs_models()
    params = fixture_params(golden_tiny, "hybrid_tiny")
    flat = {k: v.reshape(-1) if "/gn" in k or k.startswith("gn_") else v for k, v in params.items()}
    np.savez(tmp_path / "flat.npz", **flat)
    model = checkpoint.load(tmp_path / "flat.npz")
    assert model.params["gn_root/scale"].shape == (1, 1, 1, 32)
    images = np.load(golden_tiny / "hybrid_tiny" / "inputs.npz")["images"]
    expected = np.load(golden_tiny / "hybrid_tiny" / "expected.npz")["logits"]
    np.testing.assert_allclose(model.predict(images), expected, rtol=0, atol=1e-5)
    bigger = checkpoint.load(tmp_path / "flat.npz", image_size=64)
    assert bigger.params[POSEMB].shape == (1, 65, 32) and bigger.num_classes == 10
    np.testing.assert_array_equal(bigger.params["head/kernel"], params["head/kernel"])


def test_load_model_name_must_match(golden_tiny):
    needs_models()
    with pytest.raises(CheckpointError, match="contradicts model='B_16'") as error:
        checkpoint.load(golden_tiny / "vit_tiny_token" / "model.npz", model="B_16")
    assert "\n" not in str(error.value)


def test_load_model_name_matching_file(golden_full):
    needs_models()
    model = checkpoint.load(golden_full / "Ti_16" / "model.npz", model="ViT-Ti/16")
    assert model.config.name == "ViT-Ti_16"


def test_inspect_report(golden_tiny, tmp_path):
    report = checkpoint.inspect(golden_tiny / "vit_tiny_prelogits" / "model.npz")
    for text in ("architecture: custom", "parameters: 24,946", "cls token", "24-wide pre_logits",
                 "native resolution: 32x32 (4x4 tokens)", "classes: 10", "float32"):  # fmt: skip
        assert text in report
    assert "fine-tune before predicting" not in report
    params = read_npz(golden_tiny / "hybrid_tiny" / "model.npz")
    config, _ = infer_config(params)
    name = "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"
    name += "--cifar100-steps_2k-lr_0.01-res_64"
    write_npz(tmp_path / f"{name}.npz", prepare_finetune(params, config, 100, 64))
    report = checkpoint.inspect(tmp_path / f"{name}.npz")
    for text in ("pre-training file: fine-tune before predicting", "ResNet (units 1/1, width x0.5)",
                 "native resolution: 64x64 (8x8 tokens)", "AugReg: upstream i21k, 300 epochs",
                 "aug", "fine-tuned on cifar100, 2000 steps, lr 0.01, resolution 64"):  # fmt: skip
        assert text in report

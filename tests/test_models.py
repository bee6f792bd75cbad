"""Model structure and the Model wrapper: parameter counts, gradients reach every parameter,
save/load round trips, input errors, attention maps, dropout, official initialisation."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from golden import fixture_config
from test_parity import TINY, ZERO_GRAD_SUFFIXES, load_fixture, max_abs

from minivit import backend
from minivit.checkpoint import load
from minivit.models import build_model, create_model
from minivit.models.config import ResNetConfig, ViTConfig
from minivit.models.registry import MODELS, param_shapes

TINY_VIT = ViTConfig("tiny", (8, 8), hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2)


@pytest.mark.parametrize("name", TINY)
def test_keys_shapes_and_count_match_the_official_model(golden_tiny, name):
    directory = golden_tiny / name
    config, num_classes, image_size = fixture_config(directory / "config.json")
    model = build_model(config, num_classes, image_size)
    with np.load(directory / "model.npz") as reference:
        shapes = {key: reference[key].shape for key in reference}
    assert {key: value.shape for key, value in model.params.items()} == shapes
    assert model.num_params == json.loads((directory / "config.json").read_text())["param_count"]


@pytest.mark.parametrize("name", ["Ti_16", "R_Ti_16"])
def test_full_parameter_counts(golden_full, name):
    config, num_classes, image_size = fixture_config(golden_full / name / "config.json")
    model = build_model(config, num_classes, image_size)
    assert model.num_params == {"Ti_16": 5_717_416, "R_Ti_16": 6_337_704}[name]  # models_test.py


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_gets_a_finite_nonzero_gradient(golden_tiny, name):
    model, inputs, _ = load_fixture(golden_tiny / name)
    _, grads = model.loss_and_grads(inputs["images"], inputs["labels"])
    for key, param in model.params.items():
        assert grads[key].shape == param.shape and grads[key].dtype == np.float32, key
        assert np.all(np.isfinite(grads[key])), key
        if not key.endswith(ZERO_GRAD_SUFFIXES):
            assert np.any(grads[key] != 0), key


def test_one_hot_labels_give_the_same_loss_and_gradients(golden_tiny):
    model, inputs, _ = load_fixture(golden_tiny / "vit_tiny_token")
    loss_int, grads_int = model.loss_and_grads(inputs["images"], inputs["labels"])
    one_hot = np.eye(model.num_classes, dtype=np.float32)[inputs["labels"]]
    loss_hot, grads_hot = model.loss_and_grads(inputs["images"], one_hot)
    assert abs(loss_int - loss_hot) < 1e-6
    for key in grads_int:
        np.testing.assert_allclose(grads_hot[key], grads_int[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["vit_tiny_gap", "hybrid_tiny", "mixer_tiny"])
def test_save_then_load_is_bit_exact(golden_tiny, tmp_path, name):
    model, inputs, _ = load_fixture(golden_tiny / name)
    model.save(tmp_path / "model.npz")
    with np.load(tmp_path / "model.npz") as saved:
        assert set(saved) == set(model.params)
        for key, value in model.params.items():
            assert saved[key].dtype == np.float32 and np.array_equal(saved[key], value), key
        copy = build_model(model.config, model.num_classes, model.image_size)
        copy.load_params(dict(saved))
    np.testing.assert_array_equal(copy.predict(inputs["images"]), model.predict(inputs["images"]))
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary left behind


@pytest.mark.parametrize(
    "shape, got",
    [
        ((2, 48, 48, 3), r"\(2, 48, 48, 3\)"),
        ((2, 32, 32, 1), r"\(2, 32, 32, 1\)"),
        ((32, 32, 3), ""),
    ],
)
def test_wrong_image_shape_is_one_sentence(shape, got):
    model = build_model(TINY_VIT, 10, 32)
    with pytest.raises(ValueError, match=rf"must be NHWC of shape \(B, 32, 32, 3\).*got {got}"):
        model.predict(np.zeros(shape, np.float32))


def test_integer_images_are_refused():
    model = build_model(TINY_VIT, 10, 32)
    with pytest.raises(ValueError, match="float32 in \\[-1, 1\\], got dtype uint8"):
        model.predict(np.zeros((1, 32, 32, 3), np.uint8))


def test_bad_labels_are_one_sentence(golden_tiny):
    model, inputs, _ = load_fixture(golden_tiny / "vit_tiny_token")
    with pytest.raises(ValueError, match=r"labels must be \(B,\) integer classes or \(B, 10\)"):
        model.loss_and_grads(inputs["images"], np.zeros((3, 4), np.float32))


@pytest.mark.parametrize("name", ["vit_tiny_token", "vit_tiny_gap", "hybrid_stem_tiny"])
def test_attention_maps_are_distributions_that_rebuild_the_attention_output(golden_tiny, name):
    model, inputs, _ = load_fixture(golden_tiny / name)
    maps = model.attention_maps(inputs["images"])
    tokens = model.net.Transformer.posembed_input.pos_embedding.shape[1]
    assert len(maps) == model.config.num_layers
    for probs in maps:
        assert probs.shape == (len(inputs["images"]), model.config.num_heads, tokens, tokens)
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-6)
    # Independent check on block 0: probabilities x the official values, projected by `out`,
    # give the official attention output.
    scope = "act/Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
    with np.load(golden_tiny / name / "intermediates.npz") as reference:
        v, expected = reference[f"{scope}/value"], reference[scope]
    params = model.params
    key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out"
    o = np.einsum("bhqk,bkhd->bqhd", maps[0], v)  # (B, N, NH, K)
    out = np.einsum("bqhd,hdD->bqD", o, params[f"{key}/kernel"]) + params[f"{key}/bias"]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_mixer_has_no_attention_maps(golden_tiny):
    model, inputs, _ = load_fixture(golden_tiny / "mixer_tiny")
    with pytest.raises(ValueError, match="Mixer, which has no attention"):
        model.attention_maps(inputs["images"])


def test_dropout_only_in_training_and_reproducible_by_seed(golden_tiny):
    loaded, inputs, _ = load_fixture(golden_tiny / "vit_tiny_token")
    images = inputs["images"]
    assert np.array_equal(loaded.forward(images, train=True).data, loaded.predict(images))
    config = dataclasses.replace(loaded.config, dropout_rate=0.1, attention_dropout_rate=0.1)
    model = build_model(config, loaded.num_classes, loaded.image_size)
    model.load_params(loaded.params)
    np.testing.assert_array_equal(model.predict(images), loaded.predict(images))
    first = model.forward(images, train=True, rng=np.random.default_rng(3)).data
    again = model.forward(images, train=True, rng=np.random.default_rng(3)).data
    other = model.forward(images, train=True, rng=np.random.default_rng(4)).data
    assert np.array_equal(first, again)
    assert np.max(np.abs(first - loaded.predict(images))) > 1e-3
    assert np.max(np.abs(first - other)) > 1e-3
    np.testing.assert_array_equal(model.predict(images), loaded.predict(images))  # back to eval


def test_official_initialisation():
    config = dataclasses.replace(TINY_VIT, representation_size=24, resnet=ResNetConfig((1,), 0.5))
    model = build_model(config, 10, 32).initialize(seed=0)
    p = model.params
    for key in ("cls", "head/kernel", "head/bias", "block1/unit1/gn3/scale", "embedding/bias"):
        assert np.all(p[key] == 0), key
    assert np.all(p["block1/unit1/gn1/scale"] == 1)
    assert abs(p["Transformer/posembed_input/pos_embedding"].std() - 0.02) < 0.004
    mlp = "Transformer/encoderblock_0/MlpBlock_3"
    assert 0 < p[f"{mlp}/Dense_0/bias"].std() < 3e-6  # N(0, 1e-6)
    assert np.max(np.abs(p[f"{mlp}/Dense_0/kernel"])) <= math.sqrt(6 / (32 + 64))
    query = p["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
    limit = math.sqrt(6 / (32 + 32))  # xavier on the flattened (D, NH*K) kernel
    assert limit * 0.9 < np.max(np.abs(query)) <= limit
    root = p["conv_root/kernel"]  # LeCun normal, fan_in 7*7*3
    assert abs(root.std() - math.sqrt(1 / 147)) < 0.1 * math.sqrt(1 / 147)
    again = build_model(config, 10, 32).initialize(seed=0).params
    assert all(np.array_equal(again[key], value) for key, value in p.items())  # seeded


def test_create_model_by_official_name():
    model = create_model("ViT-Ti_16", num_classes=10)
    assert (model.num_classes, model.image_size) == (10, 224)
    assert model.num_params == 5_717_416 - 990 * 192 - 990  # official count has a 1000-way head
    assert np.all(model.params["head/kernel"] == 0)
    assert model.params["embedding/kernel"].std() > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_architecture_has_the_registry_shapes(name):
    """Two independent descriptions of each architecture: the module tree and the registry's
    shape table (which the checkpoint reader checks files against)."""
    config = MODELS[name]
    model = build_model(config, 1000, 224)  # parameters are lazily allocated zeros
    expected = param_shapes(config, 1000, 224)
    assert {key: value.shape for key, value in model.params.items()} == expected


def test_load_reads_a_released_file(golden_tiny):
    model = load(golden_tiny / "hybrid_tiny" / "model.npz")
    inputs = np.load(golden_tiny / "hybrid_tiny" / "inputs.npz")
    expected = np.load(golden_tiny / "hybrid_tiny" / "expected.npz")
    assert max_abs(model.predict(inputs["images"]), expected["logits"]) < 1e-5


@pytest.mark.skipif(backend.cupy_module() is None, reason="needs CuPy and a GPU")
def test_gpu_matches_cpu(golden_tiny):
    model, inputs, expected = load_fixture(golden_tiny / "hybrid_tiny")
    gpu = build_model(model.config, model.num_classes, model.image_size).to("cuda:0")
    gpu.load_params(model.params)
    np.testing.assert_allclose(gpu.predict(inputs["images"]), expected["logits"], atol=1e-5)
    _, grads = gpu.loss_and_grads(inputs["images"], inputs["labels"])
    assert all(backend.on_gpu(g) for g in grads.values())

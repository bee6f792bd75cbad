"""timm / Hugging Face layouts: key and layout mapping both ways, checked against the layer math
of each layout, file conversion, and identical logits through the converted files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from golden import MODEL_FIXTURES

from minivit import checkpoint
from minivit.checkpoint import CheckpointError, read_npz
from minivit.timm_layout import convert, from_official, read_state_dict, read_timm, to_official

ATTENTION = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/"
NUM_HEADS = {"Ti_16": 3, "R_Ti_16": 3}  # the tiny fixtures have 2


def official(golden: Path, fixture: str) -> dict[str, np.ndarray]:
    return read_npz(golden / fixture / "model.npz")


@pytest.mark.parametrize("fixture", MODEL_FIXTURES)
def test_round_trip_recovers_identical_arrays(golden_tiny, fixture):
    params = official(golden_tiny, fixture)
    back = to_official(from_official(params), num_heads=2)
    assert back.keys() == params.keys()
    for key, value in params.items():
        assert back[key].dtype == np.float32
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("fixture", ["Ti_16", "R_Ti_16"])
def test_round_trip_full_models_without_num_heads(golden_full, fixture):
    params = official(golden_full, fixture)
    back = to_official(from_official(params))  # heads from the official model of width 192
    assert (
        all(np.array_equal(back[k], v) for k, v in params.items()) and back.keys() == params.keys()
    )


def test_timm_key_names_and_shapes(golden_tiny):
    vit = from_official(official(golden_tiny, "vit_tiny_prelogits"))
    assert vit["cls_token"].shape == (1, 1, 32) and vit["pos_embed"].shape == (1, 17, 32)
    assert vit["patch_embed.proj.weight"].shape == (32, 3, 8, 8)
    assert vit["blocks.1.attn.qkv.weight"].shape == (96, 32)
    assert vit["blocks.1.attn.qkv.bias"].shape == (96,)
    assert vit["blocks.1.attn.proj.weight"].shape == (32, 32)
    assert vit["blocks.0.mlp.fc1.weight"].shape == (64, 32)
    assert vit["pre_logits.fc.weight"].shape == (24, 32) and vit["head.weight"].shape == (10, 24)
    assert {"norm.weight", "blocks.1.norm2.bias"} <= vit.keys()
    hybrid = from_official(official(golden_tiny, "hybrid_tiny"))
    unit = "patch_embed.backbone.stages.1.blocks.0."
    assert hybrid["patch_embed.backbone.stem.conv.weight"].shape == (32, 3, 7, 7)
    assert hybrid["patch_embed.backbone.stem.norm.weight"].shape == (32,)
    assert hybrid[unit + "downsample.conv.weight"].shape == (256, 128, 1, 1)
    assert hybrid[unit + "norm3.bias"].shape == (256,)
    stem = from_official(official(golden_tiny, "hybrid_stem_tiny"))
    assert stem["patch_embed.backbone.conv.weight"].shape == (32, 3, 7, 7)  # no `stem.` level
    mixer = from_official(official(golden_tiny, "mixer_tiny"))
    assert mixer["stem.proj.weight"].shape == (32, 3, 8, 8)
    assert mixer["blocks.1.mlp_tokens.fc1.weight"].shape == (16, 16)
    assert mixer["blocks.1.mlp_channels.fc2.weight"].shape == (32, 64)
    assert {"norm.bias", "head.bias"} <= mixer.keys()


def test_attention_layouts_compute_the_same_function(golden_tiny):
    """timm's fused-qkv attention on the timm arrays == flax's attention on the official ones."""
    params = official(golden_tiny, "vit_tiny_token")
    state = from_official(params)
    x = np.random.default_rng(0).standard_normal((2, 5, 32))  # (B, N, D)
    # timm Attention: qkv Linear, reshape (B, N, 3, NH, K), softmax(q k^T * K^-0.5) v, proj.
    qkv = x @ state["blocks.1.attn.qkv.weight"].T + state["blocks.1.attn.qkv.bias"]
    q, k, v = qkv.reshape(2, 5, 3, 2, 16).transpose(2, 0, 3, 1, 4)  # (B, NH, N, K) each
    a = q @ k.transpose(0, 1, 3, 2) / 4.0
    a = np.exp(a - a.max(-1, keepdims=True))
    o = (a / a.sum(-1, keepdims=True)) @ v  # (B, NH, N, K)
    timm_out = o.transpose(0, 2, 1, 3).reshape(2, 5, 32) @ state["blocks.1.attn.proj.weight"].T
    timm_out += state["blocks.1.attn.proj.bias"]
    # flax MultiHeadDotProductAttention with DenseGeneral kernels (D, NH, K) and (NH, K, D).
    q, k, v = (
        np.einsum("bnd,dhk->bnhk", x, params[f"{ATTENTION}{n}/kernel"])
        + params[f"{ATTENTION}{n}/bias"]
        for n in ("query", "key", "value")
    )
    a = np.einsum("bqhk,bthk->bhqt", q / 4.0, k)
    a = np.exp(a - a.max(-1, keepdims=True))
    o = np.einsum("bhqt,bthk->bqhk", a / a.sum(-1, keepdims=True), v)
    flax_out = np.einsum("bqhk,hkd->bqd", o, params[ATTENTION + "out/kernel"])
    flax_out += params[ATTENTION + "out/bias"]
    np.testing.assert_allclose(timm_out, flax_out, rtol=1e-10, atol=1e-10)


def test_conv_and_dense_layouts_compute_the_same_function(golden_tiny):
    params = official(golden_tiny, "vit_tiny_token")
    state = from_official(params)
    images = np.load(golden_tiny / "vit_tiny_token" / "inputs.npz")["images"].astype(np.float64)
    patches = images[:, :8, 8:16, :]  # one 8x8 patch (B, H, W, C)
    torch_conv = np.einsum("bhwc,ochw->bo", patches, state["patch_embed.proj.weight"])
    flax_conv = np.einsum("bhwc,hwco->bo", patches, params["embedding/kernel"])
    np.testing.assert_allclose(torch_conv, flax_conv, rtol=1e-12)
    x = images.reshape(-1, 3)[:, :1] * np.ones((1, 32))  # (R, D)
    np.testing.assert_allclose(
        x @ state["blocks.0.mlp.fc1.weight"].T,
        x @ params["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"],
        rtol=1e-12,
    )


def test_unknown_keys_and_missing_head_count(golden_tiny):
    state = from_official(official(golden_tiny, "vit_tiny_token"))
    with pytest.raises(CheckpointError, match="unknown; pass num_heads"):
        to_official(state)
    with pytest.raises(CheckpointError, match="'blocks.0.ls1.gamma' has no counterpart"):
        to_official({**state, "blocks.0.ls1.gamma": np.ones(32)}, num_heads=2)
    wrapped = {f"module.{k}": v for k, v in state.items()}  # DistributedDataParallel prefix
    assert (
        to_official(wrapped, num_heads=2).keys() == official(golden_tiny, "vit_tiny_token").keys()
    )


@pytest.mark.parametrize("fixture", MODEL_FIXTURES)
def test_convert_safetensors_both_ways(golden_tiny, tmp_path, fixture):
    pytest.importorskip("safetensors")
    convert(golden_tiny / fixture / "model.npz", tmp_path / "timm.safetensors")
    state, metadata = read_state_dict(tmp_path / "timm.safetensors")
    assert metadata["num_heads"] in ("2", "0")  # 0: a Mixer has no heads
    assert "pos_embed" in state or "stem.proj.weight" in state
    convert(tmp_path / "timm.safetensors", tmp_path / "back.npz")
    params, back = official(golden_tiny, fixture), read_npz(tmp_path / "back.npz")
    assert back.keys() == params.keys()
    assert all(np.array_equal(back[k], v) for k, v in params.items())


def test_convert_torch_bin(golden_tiny, tmp_path):
    pytest.importorskip("torch")
    convert(golden_tiny / "hybrid_tiny" / "model.npz", tmp_path / "pytorch_model.bin")
    params = read_timm(tmp_path / "pytorch_model.bin", num_heads=2)
    assert all(
        np.array_equal(params[k], v) for k, v in official(golden_tiny, "hybrid_tiny").items()
    )


def test_read_bfloat16_safetensors(golden_tiny, tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from safetensors.numpy import save_file

    state = from_official(official(golden_tiny, "mixer_tiny"))
    save_file(
        {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}, tmp_path / "bf16.safetensors"
    )
    params = read_timm(tmp_path / "bf16.safetensors")
    reference = official(golden_tiny, "mixer_tiny")
    for key, value in params.items():
        assert value.dtype == np.float32
        expected = reference[key].astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(value, expected)


def test_convert_bad_requests_write_nothing(golden_tiny, tmp_path):
    source = golden_tiny / "vit_tiny_token" / "model.npz"
    with pytest.raises(CheckpointError, match="convert goes from .npz"):
        convert(source, tmp_path / "out.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a valid .safetensors file"):
        convert(tmp_path / "junk.safetensors", tmp_path / "out.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(source, tmp_path / "missing" / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors"]


@pytest.mark.parametrize("fixture", MODEL_FIXTURES)
def test_converted_timm_file_gives_identical_logits(golden_tiny, tmp_path, fixture):
    models = pytest.importorskip("minivit.models", reason="minivit.models not built yet")
    if not hasattr(models, "build_model"):
        pytest.skip("minivit.models.build_model does not exist yet")
    from safetensors.numpy import save_file

    state = from_official(official(golden_tiny, fixture))  # a timm-layout file built by hand
    save_file(state, tmp_path / "model.safetensors")
    images = np.load(golden_tiny / fixture / "inputs.npz")["images"]
    reference = checkpoint.load(golden_tiny / fixture / "model.npz").predict(images)
    convert(tmp_path / "model.safetensors", tmp_path / "converted.npz", num_heads=2)
    np.testing.assert_array_equal(
        checkpoint.load(tmp_path / "converted.npz").predict(images), reference
    )
    expected = np.load(golden_tiny / fixture / "expected.npz")["logits"]
    np.testing.assert_allclose(reference, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("fixture", "timm_name"),
    [("Ti_16", "vit_tiny_patch16_224"), ("R_Ti_16", "vit_tiny_r_s16_p8_224")],
)
def test_state_dict_loads_into_timm(golden_full, fixture, timm_name):
    """The mapped state dict fills timm's own model strictly and gives the timm oracle logits."""
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    model = timm.create_model(timm_name, pretrained=False).eval()
    state = from_official(official(golden_full, fixture))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    images = np.load(golden_full / fixture / "inputs.npz")["images"]
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    expected = np.load(golden_full / fixture / "expected.npz")["timm_logits"]
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)

"""bench/profile_step.py: every op has a kind, the recorded products add up to the model's
arithmetic, and the bounds it prints follow from the times it measured."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import profile_step  # noqa: E402
import step  # noqa: E402

from minivit.models import vit  # noqa: E402

# ViT-Ti/16 at 224: 197 tokens of width 192, MLP 768, 12 blocks, 1000 classes, 16x16x3 patches.
N, D, MLP, LAYERS, CLASSES, PATCH_IN = 197, 192, 768, 12, 1000, 16 * 16 * 3
BLOCK_PRODUCTS = 2 * N * D * (3 * D) + 2 * N * D * D + 2 * N * D * MLP + 2 * N * MLP * D
PRODUCTS = LAYERS * BLOCK_PRODUCTS + 2 * D * CLASSES  # q/k/v, out, MLP; the head on the token
ATTENTION = LAYERS * 2 * (2 * N * N * D)  # q k^T and p v over all heads
PATCHES = 2 * (N - 1) * PATCH_IN * D  # the patch embedding, one GEMM-sized conv


def test_every_op_has_a_kind():
    unclassified = [
        cls.__name__
        for cls in profile_step._function_classes()
        if cls.__module__.startswith("minivit.")  # not the tests' own
        and profile_step.kind_of(cls.__name__).startswith("other")
    ]
    assert unclassified == []


def test_forward_flops_of_vit_ti_16_counted_by_hand():
    config = vit_ti_config()
    assert step.forward_flops(config) == PRODUCTS + ATTENTION + PATCHES


def vit_ti_config():
    from minivit.models.registry import resolve  # noqa: PLC0415

    return resolve("ViT-Ti_16")[0]


@pytest.fixture(scope="module")
def inference():
    return profile_step.profile_config("ViT-Ti/16", 1, 1, "inference")


def test_inference_products_are_the_models_products(inference):
    assert inference["gemm_flops"] == PRODUCTS  # the recorded shapes, replayed
    assert inference["sgemm_flops"] == PRODUCTS  # the kernels.matmul calls the ops made
    assert 0 < inference["sgemm_ms"] < inference["gemm_ms"]
    assert inference["model_flops"] == PRODUCTS + ATTENTION + PATCHES
    assert not any(kind.startswith("other") for kind in inference["kinds"])
    assert inference["attention_ms"] > 0 and inference["blas_ms"] > 0


def test_training_replays_both_gradient_products_of_every_product(monkeypatch):
    monkeypatch.setattr(vit, "PACK_ROWS", 1)  # q/k/v through HeadsProjections at batch 1 too
    timer = profile_step.OpTimer()
    run, _ = profile_step._step("ViT-Ti/16", 1, "train")
    with profile_step.timed_functions(timer):
        run()
    names = {name for name, *_ in timer.products}
    assert "HeadsProjections" in names and "DenseGelu" in names
    assert all(needs == (True, True) for *_, needs in timer.products)
    flops = sum(count * f for key, count in timer.products.items() for _, f in calls(key))
    assert flops == 3 * PRODUCTS  # forward, input gradient, kernel gradient
    assert timer.sgemm_flops == 3 * PRODUCTS  # and the ops made exactly those calls


def calls(key):
    import numpy as np  # noqa: PLC0415

    from minivit import kernels  # noqa: PLC0415

    _, a_shape, b_shape, needs = key
    return profile_step._product_calls(np, kernels, a_shape, b_shape, needs)


def test_bounds_follow_from_the_times():
    result = dict(model_flops=8e9, profiled_ms=100.0, gemm_ms=60.0, blas_ms=40.0)
    result.update(attention_ms=15.0, conv_ms=5.0)
    got = profile_step.bounds(result, gemm_rate=100.0)  # 8 GFLOP at 100 GFLOP/s: 80 ms
    assert got["of_gemm"] == pytest.approx(0.8)  # in 100 ms
    assert got["of_gemm_products_replayed"] == pytest.approx(1.0)  # 100 - 60 + 40 ms
    assert got["of_gemm_products_attention_conv"] == pytest.approx(80 / 60)  # 40 + 15 + 5 ms
    lines = profile_step.report(
        {
            **result,
            "model": "m",
            "mode": "train",
            "batch": 2,
            "step_ms": 100.0,
            "kinds": {},
            "gemm_flops": 6e9,
            "sgemm_ms": 50.0,
            "sgemm_flops": 6e9,
        },
        100.0,
    )
    assert "profiled 80%; every product at its replayed rate 100%" in "\n".join(lines)

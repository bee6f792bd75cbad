"""Eight steps of the official fine-tuning update against the official JAX trainer.

`golden/trainer_trajectory`: vit_tiny_token, batch 8 split into 2 contiguous micro-batches,
warmup 2 + cosine over 8 steps at base_lr 0.03, global-norm clipping at 1, SGD momentum 0.9 with
the bfloat16 buffer (effective beta 0.8984375). See the golden README for every convention.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from minivit.optim import SGDMomentum, clip_by_global_norm, learning_rate

models = pytest.importorskip("minivit.models")
if not hasattr(models, "build_model"):
    pytest.skip("minivit.models.build_model does not exist yet", allow_module_level=True)

from minivit.models.config import ViTConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("each_cpu_body")  # threaded and serial bodies

ACCUM_STEPS = 2


def _model(fixture):
    spec = json.loads((fixture / "config.json").read_text())
    mc = spec["model_config"]
    config = ViTConfig(
        name=mc["model_name"],
        patches=tuple(mc["patches"]["size"]),
        hidden_size=mc["hidden_size"],
        mlp_dim=mc["transformer"]["mlp_dim"],
        num_heads=mc["transformer"]["num_heads"],
        num_layers=mc["transformer"]["num_layers"],
        classifier=mc["classifier"],
        representation_size=mc["representation_size"],
    )
    model = models.build_model(config, spec["num_classes"], spec["image_size"])
    with np.load(fixture / "model.npz") as npz:
        model.load_params({k: npz[k] for k in npz.files})
    return model, spec["train_config"]


def _accumulated(model, images, labels):
    """Mean loss and gradient over contiguous micro-batches (official accumulate_gradient)."""
    total_loss, total = 0.0, None
    for part_images, part_labels in zip(
        np.split(images, ACCUM_STEPS), np.split(labels, ACCUM_STEPS)
    ):
        loss, grads = model.loss_and_grads(part_images, part_labels)
        total_loss += loss
        total = grads if total is None else {k: total[k] + grads[k] for k in total}
    return total_loss / ACCUM_STEPS, {
        k: (g / np.float32(ACCUM_STEPS)).astype(np.float32) for k, g in total.items()
    }


def _run(fixture, momentum_dtype):
    model, tc = _model(fixture)
    inputs = np.load(fixture / "inputs.npz")
    opt = SGDMomentum(model.params, momentum=tc["momentum"], accumulator_dtype=momentum_dtype)
    losses, lrs, norms = [], [], []
    for k, b in enumerate(inputs["batch_index"]):
        loss, grads = _accumulated(model, inputs["images"][b], inputs["labels"][b])
        norms.append(clip_by_global_norm(grads, tc["grad_norm_clip"]))
        lr = learning_rate(
            k, tc["base_lr"], tc["total_steps"], tc["warmup_steps"], tc["decay_type"]
        )
        opt.update(model.params, grads, lr)
        losses.append(loss)
        lrs.append(lr)
    return model, opt, np.array(losses), np.array(lrs), np.array(norms)


def test_eight_official_steps_with_the_bfloat16_momentum(golden_tiny):
    fixture = golden_tiny / "trainer_trajectory"
    expected = np.load(fixture / "expected.npz")
    model, opt, losses, lrs, norms = _run(fixture, "bfloat16")
    np.testing.assert_allclose(losses, expected["loss"], atol=2e-6, rtol=0)
    np.testing.assert_allclose(lrs, expected["lr"], atol=1e-8, rtol=0)
    np.testing.assert_allclose(norms, expected["grad_norm"], rtol=1e-5)
    final = np.load(fixture / "final_params.npz")
    for key in final.files:
        np.testing.assert_allclose(model.params[key], final[key], atol=2e-5, rtol=0, err_msg=key)
    assert _momentum_off_by_more_than_one_step(opt.state_dict(), fixture) == []


def _momentum_off_by_more_than_one_step(state: dict, fixture) -> list[str]:
    """Keys whose momentum differs from the official one by more than one bfloat16 step.

    One step is taken at the key's largest |momentum| (rounding flips propagate from step to
    step, so a small entry may move by the step of a larger one), at least 1e-6 for the
    attention `key/bias`, whose gradient is zero in exact arithmetic (golden README).
    """
    momentum = np.load(fixture / "final_momentum.npz")
    off = []
    for key in momentum.files:
        ref = momentum[key]
        one_step = max(2.0 ** (np.floor(np.log2(np.abs(ref).max())) - 7), 1e-6)
        if np.abs(state[key] - ref).max() > one_step:
            off.append(key)
    return off


def test_float32_momentum_point_nine_misses_the_official_trajectory(golden_tiny):
    fixture = golden_tiny / "trainer_trajectory"
    model, opt, _, _, _ = _run(fixture, "float32")
    final = np.load(fixture / "final_params.npz")
    worst = max(float(np.abs(model.params[k] - final[k]).max()) for k in final.files)
    assert worst > 1e-4  # the bfloat16 run is within 2e-5: the fixture tells the two apart
    assert _momentum_off_by_more_than_one_step(opt.state_dict(), fixture) != []

"""The optimiser pieces: schedule, clipping, bfloat16 rounding, SGD with momentum, state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minivit.optim import (
    SGDMomentum,
    clip_by_global_norm,
    from_bfloat16_bits,
    learning_rate,
    to_bfloat16_bits,
)

pytestmark = pytest.mark.usefixtures("each_cpu_body")  # threaded and serial bodies


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """bfloat16 rounding by float64 reasoning: of the two bfloat16 neighbours of each value, the
    closer one; on a tie the one with an even last mantissa bit. Finite values only."""
    out = np.empty(x.shape, np.float64)
    for i, v in enumerate(np.asarray(x, np.float64).ravel()):
        if v == 0:
            out.flat[i] = v
            continue
        exponent = max(math.frexp(abs(v))[1] - 1, -126)  # bfloat16 keeps float32's exponent range
        ulp = 2.0 ** (exponent - 7)  # 7 stored mantissa bits
        low = math.floor(v / ulp) * ulp
        high = low + ulp
        if v - low != high - v:
            out.flat[i] = low if v - low < high - v else high
        else:
            out.flat[i] = low if round(low / ulp) % 2 == 0 else high
    return out.astype(np.float32)


# ---- learning rate ------------------------------------------------------------------------------


def test_learning_rate_matches_the_official_schedule_of_the_golden_trajectory(golden_tiny):
    expected = np.load(golden_tiny / "trainer_trajectory" / "expected.npz")
    applied = [learning_rate(k, 0.03, 8, 2, "cosine") for k in range(8)]
    logged = [learning_rate(k + 1, 0.03, 8, 2, "cosine") for k in range(8)]
    np.testing.assert_allclose(applied, expected["lr"], atol=1e-8, rtol=0)
    np.testing.assert_allclose(logged, expected["lr_logged"], atol=1e-8, rtol=0)
    assert applied[0] == 0.0  # the first update after a warmup start only fills the momentum


@pytest.mark.parametrize("decay_type", ["cosine", "linear"])
def test_learning_rate_against_the_formula_in_float64(decay_type):
    base, total, warmup, end = 0.03, 1000, 100, 1e-5
    for step in [0, 1, 50, 99, 100, 101, 333, 550, 999, 1000, 1200]:
        progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
        if decay_type == "cosine":
            lr = base * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            lr = end + (base - end) * (1 - progress)
        lr *= min(1.0, step / warmup)
        got = learning_rate(step, base, total, warmup, decay_type, linear_end=end)
        assert abs(got - lr) <= 1e-6 * base, (step, got, lr)


def test_learning_rate_shape_of_warmup_and_decay():
    lrs = [learning_rate(s, 0.1, 20, 5, "cosine") for s in range(21)]
    assert lrs[:6] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.1], abs=1e-8)  # linear ramp
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # then never increases
    assert lrs[20] == pytest.approx(0.0, abs=1e-9)
    assert learning_rate(10, 0.1, 10, 0, "linear") == pytest.approx(1e-5, abs=1e-10)
    assert learning_rate(0, 0.1, 10, 0, "linear") == pytest.approx(0.1, abs=1e-8)  # no warmup


def test_learning_rate_rejects_bad_settings():
    with pytest.raises(ValueError, match="decay_type 'step'"):
        learning_rate(1, 0.1, 10, 2, "step")
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate(1, 0.1, 10, 10)


# ---- clipping -----------------------------------------------------------------------------------


def test_clip_by_global_norm_scales_every_gradient_when_the_norm_is_large():
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.float32([5.0, -7.0])}
    before = {k: v.copy() for k, v in grads.items()}
    flat = np.concatenate([v.ravel() for v in before.values()]).astype(np.float64)
    norm = clip_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(np.linalg.norm(flat), rel=1e-6)
    for k in grads:
        np.testing.assert_allclose(grads[k], before[k] / np.linalg.norm(flat), rtol=1e-6)
    after = np.concatenate([v.ravel() for v in grads.values()]).astype(np.float64)
    assert np.linalg.norm(after) == pytest.approx(1.0, rel=1e-6)


def test_clip_by_global_norm_leaves_small_gradients_alone():
    grads = {"a": np.float32([0.3, 0.4]), "b": np.float32([[0.1]])}
    norm = clip_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(math.sqrt(0.26), rel=1e-6)
    np.testing.assert_array_equal(grads["a"], np.float32([0.3, 0.4]))
    np.testing.assert_array_equal(grads["b"], np.float32([[0.1]]))


# ---- bfloat16 -----------------------------------------------------------------------------------


def _awkward_floats(n: int, seed: int = 0) -> np.ndarray:
    """Random float32 values over many binades, plus ties and values next to ties."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)
    bits = values.astype(np.float32).view(np.uint32)
    ties = (bits & 0xFFFF0000) | 0x8000  # exactly half-way between two bfloat16 values
    near = ties + rng.integers(-2, 3, n).astype(np.uint32)
    return np.concatenate([values.astype(np.float32), ties.view(np.float32), near.view(np.float32)])


def test_bfloat16_rounding_against_float64_reasoning():
    x = _awkward_floats(3000)
    np.testing.assert_array_equal(from_bfloat16_bits(to_bfloat16_bits(x)), bf16_reference(x))


def test_bfloat16_rounding_against_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.concatenate([_awkward_floats(30000, seed=1), np.float32([np.inf, -np.inf, 3.4e38])])
    expected = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(to_bfloat16_bits(x), expected)


def test_bfloat16_special_values():
    x = np.float32([0.9, 1 + 2**-8, 1 + 3 * 2**-8, -0.0, np.inf, 3.4e38, np.nan])
    got = from_bfloat16_bits(to_bfloat16_bits(x))
    assert got[0] == 0.8984375  # the official effective momentum
    assert got[1] == 1.0 and got[2] == 1 + 2**-6  # ties go to the even neighbour
    assert got[3] == 0 and np.signbit(got[3])
    assert np.isposinf(got[4]) and np.isposinf(got[5])  # beyond bfloat16's largest finite value
    assert np.isnan(got[6])


# ---- SGD with momentum --------------------------------------------------------------------------


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    grads = [
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(3)
    ]
    return params, grads


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sgd_momentum_follows_the_heavy_ball_recurrence(dtype):
    params, grads = _problem()
    expected = {k: v.astype(np.float64) for k, v in params.items()}
    buffer = {k: np.zeros(v.shape, np.float32) for k, v in params.items()}
    beta = 0.8984375 if dtype == "bfloat16" else np.float32(0.9)
    opt = SGDMomentum(params, momentum=0.9, accumulator_dtype=dtype)
    assert opt.beta == np.float32(beta)
    for lr, g in zip([0.0, 0.5, 0.25], grads):
        opt.update(params, g, lr)
        for k in params:
            m_new = g[k].astype(np.float64) + float(beta) * buffer[k]  # exact float32 operands
            expected[k] -= np.float32(lr) * m_new
            buffer[k] = bf16_reference(m_new) if dtype == "bfloat16" else m_new.astype(np.float32)
    for k in params:
        np.testing.assert_allclose(params[k], expected[k], atol=2e-6, rtol=0)
        np.testing.assert_array_equal(opt.state_dict()[k], buffer[k])


def test_sgd_momentum_state_round_trip_continues_identically():
    params, grads = _problem(1)
    opt = SGDMomentum(params)
    opt.update(params, grads[0], 0.1)
    copy = {k: v.copy() for k, v in params.items()}
    restored = SGDMomentum(copy)
    restored.load_state_dict(opt.state_dict())
    for g in grads[1:]:
        opt.update(params, g, 0.1)
        restored.update(copy, g, 0.1)
    for k in params:
        np.testing.assert_array_equal(params[k], copy[k])


def test_sgd_momentum_bad_input_names_the_key():
    params, grads = _problem()
    opt = SGDMomentum(params)
    with pytest.raises(KeyError, match="'b'"):
        opt.update(params, {"w": grads[0]["w"]}, 0.1)
    with pytest.raises(ValueError, match="'w' is shaped"):
        opt.load_state_dict({"w": np.zeros(3, np.float32), "b": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="accumulator_dtype 'float16'"):
        SGDMomentum(params, accumulator_dtype="float16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_one_pass_cpu_update_equals_the_array_spec(dtype):
    """The Numba body of update() gives bit-identical params and momentum to update_reference()."""
    rng = np.random.default_rng(7)
    shapes = {"a": (3, 5), "b": (7,), "c": (2, 3, 4)}
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    fast = {k: v.copy() for k, v in start.items()}
    spec = {k: v.copy() for k, v in start.items()}
    opt_fast = SGDMomentum(fast, accumulator_dtype=dtype)
    opt_spec = SGDMomentum(spec, accumulator_dtype=dtype)
    for step in range(4):
        grads = {k: rng.standard_normal(s).astype(np.float32) * 3 for k, s in shapes.items()}
        opt_fast.update(fast, {k: g.copy() for k, g in grads.items()}, 0.01 * (step + 1))
        opt_spec.update_reference(spec, grads, 0.01 * (step + 1))
    for key in shapes:
        np.testing.assert_array_equal(fast[key], spec[key])
    np.testing.assert_array_equal(opt_fast.momentum(), opt_spec.momentum())


def test_global_norm_uses_float64_accumulation():
    grads = {"a": np.full(1000, 1e-3, np.float32), "b": np.full((10, 10), 3.0, np.float32)}
    expected = math.sqrt(1000 * float(np.float32(1e-3)) ** 2 + 100 * 9.0)
    assert clip_by_global_norm(grads, 1e9) == pytest.approx(expected, rel=1e-7)

"""Finite-difference gradient checks for minivit ops (float64 central differences).

`check_grad(fn, *arrays)` runs `fn` (Tensors in, a Tensor out, built from minivit ops) forward
and backward, then compares the gradients with central differences of
`F(x) = <gy, fn(x)>` for a random output weighting `gy`: once along a random direction through
all inputs at once, and, for small inputs, element by element.
"""

from __future__ import annotations

import numpy as np

from minivit import Tensor, no_grad


def _is_float(a) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def _float64(a: np.ndarray) -> np.ndarray:
    """`a` in float64, kept as it is (strides included) when it already is."""
    return a if a.dtype == np.float64 else a.astype(np.float64)


def analytic_grads(fn, xs: list, gy: np.ndarray) -> list:
    """backward() of `<gy, fn(xs)>`: one gradient per float input (None for the others)."""
    tensors = [Tensor(x, requires_grad=_is_float(x)) for x in xs]
    out = fn(*tensors)
    assert out.requires_grad, "fn's output does not depend on any float input"
    out.backward(gy)
    return [t.grad if t.requires_grad else None for t in tensors]


def _weighted_output(fn, xs: list, gy: np.ndarray) -> float:
    """F(xs) = <gy, fn(xs)>, evaluated without recording a graph."""
    with no_grad():
        return float(np.vdot(gy, np.asarray(fn(*[Tensor(x) for x in xs]).data)))


def check_grad(
    fn, *arrays, eps: float = 1e-6, rtol: float = 1e-6, seed: int = 0, elementwise: int = 120
) -> list:
    """Assert that backward() agrees with float64 central differences; return the gradients.

    Float arrays are differentiated (converted to float64 unless they already are, so strided
    and transposed inputs stay as given); integer and boolean arrays pass through as constants.
    When the float inputs hold at most `elementwise` numbers in all, every element is also
    checked on its own.
    """
    rng = np.random.default_rng(seed)
    xs = [_float64(np.asarray(a)) if _is_float(np.asarray(a)) else a for a in arrays]
    with no_grad():
        out = fn(*[Tensor(x) for x in xs])
    assert out.dtype == np.float64, f"float64 inputs gave a {out.dtype} output"
    gy = rng.standard_normal(out.shape)
    grads = analytic_grads(fn, xs, gy)
    for x, g in zip(xs, grads):
        if _is_float(x):
            assert g is not None and g.shape == x.shape and g.dtype == np.float64, (
                f"gradient {None if g is None else (g.shape, g.dtype)} for input {x.shape}"
            )
    dirs = [rng.standard_normal(x.shape) if _is_float(x) else None for x in xs]

    def along(t: float) -> float:
        return _weighted_output(fn, [x if d is None else x + t * d for x, d in zip(xs, dirs)], gy)

    f_plus, f_minus = along(eps), along(-eps)
    numeric = (f_plus - f_minus) / (2 * eps)
    roundoff = np.finfo(np.float64).eps * (abs(f_plus) + abs(f_minus)) / eps
    pairs = [(g, d) for g, d in zip(grads, dirs) if d is not None]
    analytic = sum(float(np.vdot(g, d)) for g, d in pairs)
    scale = np.sqrt(sum(np.vdot(g, g) for g, _ in pairs) * sum(np.vdot(d, d) for _, d in pairs))
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=rtol * scale + roundoff)
    if sum(x.size for x in xs if _is_float(x)) <= elementwise:
        _check_elementwise(fn, xs, gy, grads, eps)
    return grads


def _check_elementwise(fn, xs: list, gy: np.ndarray, grads: list, eps: float) -> None:
    """Central differences of F one element at a time, against every gradient entry."""
    for i, (x, g) in enumerate(zip(xs, grads)):
        if g is None:
            continue
        numeric = np.empty(x.shape)
        for j in np.ndindex(x.shape):
            shifted = []
            for t in (eps, -eps):
                xj = x.copy()
                xj[j] += t
                shifted.append(_weighted_output(fn, xs[:i] + [xj] + xs[i + 1 :], gy))
            numeric[j] = (shifted[0] - shifted[1]) / (2 * eps)
        atol = 1e-6 * (np.abs(numeric).max() + 1.0)
        np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=atol, err_msg=f"input {i}")

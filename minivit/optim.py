"""The official fine-tuning optimiser: warmup + cosine/linear schedule, global-norm clipping, SGD
with heavy-ball momentum whose buffer is kept in bfloat16.

Mirrors `vit_jax/utils.py:create_learning_rate_schedule` and the optax chain built in
`vit_jax/train.py`: `clip_by_global_norm(grad_norm_clip)`, then
`sgd(lr_fn, momentum=0.9, accumulator_dtype='bfloat16')`. Two details of that chain matter for
parity (see the golden README): optax's step count starts at 0, so update k applies `lr_fn(k)`
(the first update after a warmup start has learning rate 0), and the bfloat16 buffer turns the
Python float 0.9 into the bfloat16 constant 0.8984375, while `m_new = g + beta * m` itself is
computed in float32 and only then rounded to bfloat16 for storage.
"""

from __future__ import annotations

import numpy as np

from minivit import backend

_F32 = np.float32


def learning_rate(
    step: int,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    decay_type: str = "cosine",
    linear_end: float = 1e-5,
) -> float:
    """The official schedule `lr_fn(step)`, in float32 arithmetic in the official order.

    Shapes: scalar -> scalar

    `progress = clip((step - warmup) / (total - warmup), 0, 1)`; cosine:
    `base * 0.5 * (1 + cos(pi * progress))`; linear: `end + (base - end) * (1 - progress)`; then,
    with a warmup, times `min(1, step / warmup)`.
    """
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    progress = _F32(step - warmup_steps) / _F32(total_steps - warmup_steps)
    progress = np.clip(progress, _F32(0), _F32(1))
    if decay_type == "cosine":
        lr = _F32(base_lr * 0.5) * (_F32(1) + np.cos(_F32(np.pi) * progress))
    elif decay_type == "linear":
        lr = _F32(linear_end) + _F32(base_lr - linear_end) * (_F32(1) - progress)
    else:
        raise ValueError(f"decay_type {decay_type!r} is unknown; use 'cosine' or 'linear'")
    if warmup_steps:
        lr = lr * np.minimum(_F32(1), _F32(step) / _F32(warmup_steps))
    return float(_F32(lr))


def clip_by_global_norm(grads: dict, max_norm: float) -> float:
    """Scale all gradients by `max_norm / norm` when their joint norm is at least `max_norm`.

    Shapes: grads key -> array (any shape), changed in place -> the norm before clipping

    As optax: `norm = sqrt(sum of all squares)`; below `max_norm` nothing changes, otherwise each
    gradient becomes `g / norm * max_norm` in float32.
    """
    total = sum(_sum_of_squares(g) for g in grads.values())
    norm = _F32(np.sqrt(total))
    if norm >= max_norm:
        for g in grads.values():
            g /= norm
            g *= _F32(max_norm)
    return float(norm)


def _sum_of_squares(g) -> float:
    """sum(g**2) in float64: one Numba pass on the CPU, array code elsewhere."""
    if _fast_cpu(g):
        from minivit.kernels import sgd  # noqa: PLC0415  (Numba compiles on first use)

        return float(sgd.sum_of_squares_cpu.body(g.size)(g.reshape(-1)))
    return float((g.astype(np.float64) ** 2).sum())


def _fast_cpu(*arrays) -> bool:
    """True when the one-pass Numba bodies apply: C-contiguous float32 NumPy arrays."""
    return all(
        isinstance(a, np.ndarray) and a.dtype == _F32 and a.flags.c_contiguous for a in arrays
    )


def to_bfloat16_bits(x) -> object:
    """Round float32 values to bfloat16, nearest-even, returned as their 16-bit patterns.

    Shapes: any float32 -> same, uint16

    bfloat16 is the upper half of a float32: add 0x7FFF plus the lowest kept bit, then drop the
    low 16 bits; NaN stays a (quiet) NaN instead of rounding into infinity.
    """
    xp = backend.xp_of(x)
    bits = xp.ascontiguousarray(x, dtype=_F32).view(xp.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return xp.where(nan, (bits >> 16) | 0x0040, rounded).astype(xp.uint16)


def from_bfloat16_bits(bits) -> object:
    """The float32 values of bfloat16 bit patterns (exact).

    Shapes: any uint16 -> same, float32
    """
    xp = backend.xp_of(bits)
    return (bits.astype(xp.uint32) << 16).view(_F32)


class SGDMomentum:
    """SGD with heavy-ball momentum, no Nesterov, no dampening, no weight decay (optax `sgd`).

    Shapes: params / grads key -> array; the momentum is one flat buffer of all sizes summed

    `m_new = g + beta * m` (float32), `params -= lr * m_new`; the stored `m` is `m_new` rounded to
    bfloat16 (beta = bfloat16(momentum) = 0.8984375 for 0.9) or kept in float32 (beta = momentum).
    The buffer starts at zero.
    """

    def __init__(self, params: dict, momentum: float = 0.9, accumulator_dtype: str = "bfloat16"):
        if accumulator_dtype not in ("bfloat16", "float32"):
            raise ValueError(
                f"accumulator_dtype {accumulator_dtype!r} is unknown; "
                "use 'bfloat16' (official) or 'float32'"
            )
        self.accumulator_dtype = accumulator_dtype
        self.shapes = {k: tuple(v.shape) for k, v in params.items()}
        self.offsets = np.cumsum([0] + [int(np.prod(s)) for s in self.shapes.values()])
        xp = backend.xp_of(next(iter(params.values())))
        size = int(self.offsets[-1])
        if accumulator_dtype == "bfloat16":
            self.beta = _F32(from_bfloat16_bits(to_bfloat16_bits(np.array([momentum], _F32)))[0])
            self.buffer = xp.zeros(size, xp.uint16)  # bfloat16 bit patterns
        else:
            self.beta = _F32(momentum)
            self.buffer = xp.zeros(size, _F32)

    def momentum(self) -> object:
        """The momentum buffer as float32 values (exact for bfloat16). Shapes: -> (P,)"""
        if self.accumulator_dtype == "bfloat16":
            return from_bfloat16_bits(self.buffer)
        return self.buffer

    def update(self, params: dict, grads: dict, lr: float) -> None:
        """One step, in place on `params` (the model's own arrays) and on the buffer.

        Shapes: params / grads key -> array of the shape given at construction
        """
        missing = [k for k in self.shapes if k not in grads]
        if missing:
            raise KeyError(f"gradient for {missing[0]!r} is missing; grads must cover every param")
        if isinstance(self.buffer, np.ndarray) and _fast_cpu(*params.values(), *grads.values()):
            self._update_cpu(params, grads, lr)
            return
        self.update_reference(params, grads, lr)

    def _update_cpu(self, params: dict, grads: dict, lr: float) -> None:
        """`update` as one Numba pass per parameter, in place (same arithmetic as the spec)."""
        from minivit.kernels import sgd  # noqa: PLC0415  (Numba compiles on first use)

        kernel = (
            sgd.sgd_momentum_bf16_cpu
            if self.accumulator_dtype == "bfloat16"
            else sgd.sgd_momentum_f32_cpu
        )
        for key, start, stop in zip(self.shapes, self.offsets, self.offsets[1:]):
            flat = params[key].reshape(-1)  # (P_key,) view of the model's own array
            kernel.body(flat.size)(
                flat, grads[key].reshape(-1), self.buffer[start:stop], self.beta, _F32(lr)
            )

    def update_reference(self, params: dict, grads: dict, lr: float) -> None:
        """The spec of `update` in array code (any array module; CuPy takes this path).

        Shapes: params / grads key -> array of the shape given at construction
        """
        xp = backend.xp_of(self.buffer)
        flat = xp.concatenate([xp.ravel(xp.asarray(grads[k], _F32)) for k in self.shapes])  # (P,)
        m_new = flat + self.beta * self.momentum()  # (P,) float32
        if self.accumulator_dtype == "bfloat16":
            self.buffer = to_bfloat16_bits(m_new)
        else:
            self.buffer = m_new
        step = _F32(lr) * m_new  # (P,)
        for (key, shape), start, stop in zip(self.shapes.items(), self.offsets, self.offsets[1:]):
            params[key] -= step[start:stop].reshape(shape)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The momentum per parameter key, float32 on the host (bfloat16 values upcast exactly)."""
        values = backend.to_host(self.momentum())
        return {
            k: values[a:b].reshape(s).copy()
            for (k, s), a, b in zip(self.shapes.items(), self.offsets, self.offsets[1:])
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the momentum written by `state_dict` (same keys and shapes)."""
        for key, shape in self.shapes.items():
            if key not in state or tuple(np.shape(state[key])) != shape:
                found = "missing" if key not in state else f"shaped {np.shape(state[key])}"
                raise ValueError(f"optimiser state for {key!r} is {found}; expected {shape}")
        xp = backend.xp_of(self.buffer)
        flat = xp.concatenate([xp.ravel(xp.asarray(state[k], _F32)) for k in self.shapes])
        self.buffer = to_bfloat16_bits(flat) if self.accumulator_dtype == "bfloat16" else flat

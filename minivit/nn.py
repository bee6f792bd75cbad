"""Module / Parameter trees whose names are the official checkpoint scopes, and the shared layers.

A `Module` registers every `Parameter` and child `Module` assigned to it as an attribute; the
attribute name is the Flax scope name of the official code, so the `/`-joined path of a parameter
IS its key in a released `.npz` file (`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`).
Loading and saving are therefore dict copies. Initialisers follow `flax.linen.initializers` (the
official models pick them per layer), so a fresh model starts where the official one does.

Layers here are the ones every family shares (Dense, Conv, LayerNorm, GroupNorm, MlpBlock); the
family-specific ones live in `minivit/models/`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

import numpy as np

from minivit import backend, ops
from minivit.autograd import Tensor

# An initialiser maps (rng, shape, fan_in, fan_out) to a float32 host array, as flax's do.
Initializer = Callable[[np.random.Generator, tuple, int, int], np.ndarray]


def zeros(rng: np.random.Generator, shape: tuple, fan_in: int, fan_out: int) -> np.ndarray:
    """All zeros (`flax.linen.initializers.zeros`)."""
    return np.zeros(shape, dtype=backend.DTYPE)


def ones(rng: np.random.Generator, shape: tuple, fan_in: int, fan_out: int) -> np.ndarray:
    """All ones (`flax.linen.initializers.ones`)."""
    return np.ones(shape, dtype=backend.DTYPE)


def normal(stddev: float) -> Initializer:
    """N(0, stddev^2) (`flax.linen.initializers.normal`)."""

    def init(rng: np.random.Generator, shape: tuple, fan_in: int, fan_out: int) -> np.ndarray:
        return (stddev * rng.standard_normal(shape)).astype(backend.DTYPE)

    return init


def lecun_normal(rng: np.random.Generator, shape: tuple, fan_in: int, fan_out: int) -> np.ndarray:
    """Truncated normal on [-2, 2] with variance 1 / fan_in (flax's default kernel init)."""
    # 0.8796... is the std of a unit normal truncated to [-2, 2]; jax divides it out the same way.
    stddev = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2.0
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2.0
    return (stddev * values).astype(backend.DTYPE)


def xavier_uniform(rng: np.random.Generator, shape: tuple, fan_in: int, fan_out: int) -> np.ndarray:
    """U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) (`xavier_uniform`, Glorot & Bengio 2010)."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(backend.DTYPE)


def default_fans(shape: tuple) -> tuple[int, int]:
    """Fan-in and fan-out as flax computes them: input axis -2, output axis -1, the rest receptive.

    Shapes: Dense (I, O) -> (I, O); Conv HWIO (kh, kw, I, O) -> (kh*kw*I, kh*kw*O).
    """
    if len(shape) < 2:
        return 1, 1
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


class Parameter(Tensor):
    """A trainable float32 array, created as zeros and filled by `initialize` or a checkpoint.

    Shapes: as given; `fans` overrides flax's fan computation where the official layer flattens
    the kernel first (DenseGeneral attention kernels (D, NH, K) initialise as (D, NH*K)).
    """

    def __init__(self, shape: tuple, init: Initializer, fans: tuple[int, int] | None = None):
        super().__init__(np.zeros(shape, dtype=backend.DTYPE), requires_grad=True)
        self.init = init
        self.fans = fans if fans is not None else default_fans(tuple(shape))

    def initialize(self, rng: np.random.Generator) -> None:
        """Replace the data with a fresh draw of the initialiser, on the current device."""
        values = self.init(rng, tuple(self.shape), *self.fans)
        self.data = self.xp.asarray(values, dtype=backend.DTYPE)


_capture = threading.local()  # the (paths, outputs) pair of an active `capture`, if any


@contextlib.contextmanager
def capture(root: Module) -> Iterator[dict[str, np.ndarray]]:
    """Record the output of every named module under `root` by its path, as flax's
    `capture_intermediates` does (`Transformer/encoderblock_0`, `head`, ...).

    Yields the dict that fills with host arrays while the body runs the model.
    """
    paths = {id(module): path for path, module in root.named_modules() if path}
    outputs: dict[str, np.ndarray] = {}
    previous = getattr(_capture, "active", None)
    _capture.active = (paths, outputs)
    try:
        yield outputs
    finally:
        _capture.active = previous


def capturing(module: Module) -> bool:
    """True while a `capture` records this module's output."""
    active = getattr(_capture, "active", None)
    return active is not None and id(module) in active[0]


class Module:
    """A node of the model tree; attribute names of children are the official scope names.

    `inline = True` marks a module whose children live in its parent's scope (the ResNet body of
    a hybrid: `conv_root` and `block1` are top-level keys in the released files).
    """

    inline = False

    def __init__(self):
        object.__setattr__(self, "_children", {})
        self.training = False
        self.rng: np.random.Generator | None = None

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, Parameter | Module):
            self._children[name] = value
        object.__setattr__(self, name, value)

    def __call__(self, *args, **kwargs) -> Tensor:
        out = self.forward(*args, **kwargs)
        active = getattr(_capture, "active", None)
        if active is not None and id(self) in active[0]:
            active[1][active[0][id(self)]] = backend.to_host(out.data)
        return out

    def forward(self, *args, **kwargs) -> Tensor:
        raise NotImplementedError

    # ---- the tree ----------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """(path, module) for this module and every descendant; inline modules are skipped."""
        if not self.inline:
            yield prefix, self
        for name, child in self._children.items():
            if isinstance(child, Module):
                path = prefix if child.inline else _join(prefix, name)
                yield from child.named_modules(path)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(checkpoint key, Parameter) for every parameter below this module, in order."""
        for name, child in self._children.items():
            if isinstance(child, Parameter):
                yield _join(prefix, name), child
            else:
                yield from child.named_parameters(prefix if child.inline else _join(prefix, name))

    def state_dict(self) -> dict[str, object]:
        """Checkpoint key -> the parameter's own array (no copy)."""
        return {key: param.data for key, param in self.named_parameters()}

    def load_state_dict(self, params: dict) -> None:
        """Copy `params` into the parameters; every key must be present with the exact shape.

        Everything is checked before anything is written, so a failed load changes nothing.
        """
        own = dict(self.named_parameters())
        missing = [key for key in own if key not in params]
        if missing:
            raise ValueError(
                f"params have no key {missing[0]!r} ({len(missing)} missing in all); "
                "were they saved from a different architecture?"
            )
        extra = [key for key in params if key not in own]
        if extra:
            raise ValueError(
                f"params have key {extra[0]!r} that this model does not have ({len(extra)} "
                "extra in all); were they saved from a different architecture?"
            )
        for key, param in own.items():
            if tuple(params[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"key {key!r} has shape {tuple(params[key].shape)} but this model expects "
                    f"{tuple(param.shape)}"
                )
        for key, param in own.items():
            param.data = param.xp.array(params[key], dtype=backend.DTYPE)

    def initialize(self, rng: np.random.Generator) -> None:
        """Draw every parameter from its official initialiser, in definition order."""
        for _, param in self.named_parameters():
            param.initialize(rng)

    def train(self, mode: bool = True, rng: np.random.Generator | None = None) -> Module:
        """Set training mode (dropout active) and the generator dropout draws from, recursively.

        `Model.forward` calls this on every step, so it walks the tree with a stack, no nested
        generators, and writes the two attributes straight into each module's `__dict__`
        (neither is a child): 31 instead of 130 us for ViT-Ti/16's 139 modules, side by side."""
        todo = [self]
        while todo:
            module = todo.pop()
            state = module.__dict__
            state["training"], state["rng"] = mode, rng
            for child in module._children.values():
                if isinstance(child, Module):
                    todo.append(child)
        return self

    def eval(self) -> Module:
        """Evaluation mode: dropout is the identity."""
        return self.train(False)

    def to(self, device: backend.Device | str) -> Module:
        """Move every parameter to `device` ("cpu" or "cuda:N")."""
        device = backend.Device.parse(device)
        for _, param in self.named_parameters():
            param.data = device.put(param.data)
        return self

    def zero_grad(self) -> None:
        for _, param in self.named_parameters():
            param.grad = None

    # ---- used by layers ----------------------------------------------------------------------
    def dropout(self, x: Tensor, rate: float) -> Tensor:
        """Dropout with `rate` in training mode, the identity in evaluation mode."""
        if not self.training or rate == 0.0:
            return x
        return ops.dropout(x, rate, self.rng)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


class Identity(Module):
    """A named no-op (`IdentityLayer` of the official code), kept so its output is captured."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Dense(Module):
    """Affine map over the last axis (`flax.linen.Dense`).

    Shapes: x (..., I) -> (..., O); kernel (I, O), bias (O,).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_init: Initializer = lecun_normal,
        bias_init: Initializer = zeros,
    ):
        super().__init__()
        self.kernel = Parameter((in_features, out_features), kernel_init)
        self.bias = Parameter((out_features,), bias_init)

    def forward(self, x: Tensor) -> Tensor:
        return ops.dense(x, self.kernel, self.bias)


class Conv(Module):
    """2-D convolution over NHWC with an HWIO kernel (`flax.linen.Conv`).

    Shapes: x (B, H, W, I) -> (B, H', W', O); kernel (kh, kw, I, O), bias (O,) when used.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        stride: int = 1,
        padding: str = "SAME",
        use_bias: bool = True,
    ):
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.kernel = Parameter((kernel_size, kernel_size, in_features, out_features), lecun_normal)
        self.bias = Parameter((out_features,), zeros) if use_bias else None

    def forward(self, x: Tensor) -> Tensor:
        return ops.conv2d(x, self.kernel, self.bias, stride=self.stride, padding=self.padding)


class LayerNorm(Module):
    """LayerNorm over the last axis, epsilon 1e-6, fast variance (`flax.linen.LayerNorm`).

    Shapes: x (..., D) -> (..., D); scale, bias (D,).
    """

    def __init__(self, features: int):
        super().__init__()
        self.scale = Parameter((features,), ones)
        self.bias = Parameter((features,), zeros)

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.scale, self.bias, eps=1e-6)


class GroupNorm(Module):
    """GroupNorm with 32 groups, epsilon 1e-6 (`flax.linen.GroupNorm`), parameters stored
    (1, 1, 1, C) as in the released hybrid checkpoints.

    Shapes: x (B, H, W, C) -> (B, H, W, C); scale, bias (1, 1, 1, C).
    """

    def __init__(self, features: int, scale_init: Initializer = ones):
        super().__init__()
        self.scale = Parameter((1, 1, 1, features), scale_init)
        self.bias = Parameter((1, 1, 1, features), zeros)

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm(x, self.scale, self.bias, num_groups=32, eps=1e-6)

    def relu(self, x: Tensor) -> Tensor:
        """relu(self(x)) as one fused op; the two steps when `capture` records this module."""
        if capturing(self):
            return ops.relu(self(x))
        return ops.group_norm(x, self.scale, self.bias, num_groups=32, eps=1e-6, relu=True)


class MlpBlock(Module):
    """Dense_0 -> GELU (tanh form) -> dropout -> Dense_1 -> dropout (`MlpBlock` of ViT and Mixer).

    Shapes: x (..., I) -> (..., I); Dense_0 (I, M), Dense_1 (M, I).
    """

    def __init__(
        self,
        features: int,
        mlp_dim: int,
        dropout_rate: float = 0.0,
        kernel_init: Initializer = lecun_normal,
        bias_init: Initializer = zeros,
    ):
        super().__init__()
        self.dropout_rate = dropout_rate
        self.Dense_0 = Dense(features, mlp_dim, kernel_init, bias_init)
        self.Dense_1 = Dense(mlp_dim, features, kernel_init, bias_init)

    def forward(self, x: Tensor) -> Tensor:
        if capturing(self.Dense_0):  # `capture` records Dense_0's own (pre-GELU) output
            y = ops.gelu(self.Dense_0(x), approximate=True)  # (..., M)
        else:  # one op: GEMM, then bias and GELU in one fused pass
            y = ops.dense_gelu(x, self.Dense_0.kernel, self.Dense_0.bias, approximate=True)
        y = self.dropout(y, self.dropout_rate)
        return self.dropout(self.Dense_1(y), self.dropout_rate)  # (..., I)

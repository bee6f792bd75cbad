"""A small reverse-mode autograd over NumPy (and, with the same code, CuPy) arrays.

A `Tensor` holds an array (`data`), its gradient (`grad`) and the `Function` that made it
(`creator`). Each `Function` subclass writes `forward(xp, *arrays)` and `backward(xp, gy)` side by
side on raw arrays; calling an instance records it in the graph when any input requires a
gradient and gradients are enabled. `backward()` walks the graph once in reverse topological
order, sums gradients of tensors used more than once, and frees the graph as it goes so memory
does not grow step after step.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from minivit import backend

_state = threading.local()


def is_grad_enabled() -> bool:
    """True unless inside `no_grad()`."""
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad():
    """Run the body without recording a graph (inference, evaluation, optimiser updates)."""
    previous = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = previous


class Tensor:
    """An array with an optional gradient and the function that created it.

    Shapes: whatever `data` has; `grad`, once set, has the same shape and dtype.
    """

    __array_priority__ = 100  # numpy_array + tensor defers to Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, name: str | None = None):
        if type(data) is not np.ndarray:  # the usual case skips the checks below
            if isinstance(data, Tensor):
                data = data.data
            if not hasattr(data, "shape") or not hasattr(data, "dtype"):
                data = np.asarray(data, dtype=backend.DTYPE)
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.creator: Function | None = None
        self.name = name

    # ---- array-like attributes -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def xp(self):
        return backend.xp_of(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{grad})"

    def numpy(self) -> np.ndarray:
        """The data as a host NumPy array."""
        return backend.to_host(self.data)

    def item(self) -> float:
        return float(self.numpy().reshape(-1)[0]) if self.size == 1 else self._not_scalar()

    def _not_scalar(self):
        raise ValueError(f"item() needs a tensor with one element, this one has shape {self.shape}")

    def detach(self) -> Tensor:
        """The same data with no graph and no gradient."""
        return Tensor(self.data)

    def zero_grad(self) -> None:
        self.grad = None

    def backward(self, grad=None) -> None:
        """Accumulate d(self)/d(leaf) into the `.grad` of every leaf that requires a gradient."""
        backward(self, grad)

    # ---- operators: thin calls into minivit.ops (imported late: ops sit on top of autograd) ----
    def __add__(self, other):
        from minivit import ops

        return ops.add(self, other)

    def __radd__(self, other):
        from minivit import ops

        return ops.add(other, self)

    def __sub__(self, other):
        from minivit import ops

        return ops.sub(self, other)

    def __rsub__(self, other):
        from minivit import ops

        return ops.sub(other, self)

    def __mul__(self, other):
        from minivit import ops

        return ops.mul(self, other)

    def __rmul__(self, other):
        from minivit import ops

        return ops.mul(other, self)

    def __truediv__(self, other):
        from minivit import ops

        return ops.div(self, other)

    def __rtruediv__(self, other):
        from minivit import ops

        return ops.div(other, self)

    def __neg__(self):
        from minivit import ops

        return ops.neg(self)

    def __matmul__(self, other):
        from minivit import ops

        return ops.matmul(self, other)

    def __rmatmul__(self, other):
        from minivit import ops

        return ops.matmul(other, self)

    def __getitem__(self, index):
        from minivit import ops

        return ops.index(self, index)

    def reshape(self, *shape):
        from minivit import ops

        return ops.reshape(self, shape[0] if len(shape) == 1 else shape)

    def transpose(self, *axes):
        from minivit import ops

        return ops.transpose(self, axes[0] if len(axes) == 1 else (axes or None))

    def sum(self, axis=None, keepdims=False):
        from minivit import ops

        return ops.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        from minivit import ops

        return ops.mean(self, axis=axis, keepdims=keepdims)


def as_tensor(value, like=None) -> Tensor:
    """Wrap an array or Python number as a constant Tensor (a Tensor is returned as it is).

    Python numbers take the float32 dtype and the array module of `like` (a Tensor), so
    `2.0 * x` stays float32 and on x's device.
    """
    if isinstance(value, Tensor):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return Tensor(value)
    xp = like.xp if like is not None else np
    return Tensor(xp.asarray(value, dtype=backend.DTYPE))


class Function:
    """One differentiable operation: subclasses define `forward` and `backward` on raw arrays.

    `forward(self, xp, *arrays)` returns the output array; it may call `self.save(...)` to keep
    what `backward` reads. `backward(self, xp, gy)` returns one gradient per input, in input order
    (a single array when there is one input); `None` stands for "no gradient" and is always
    allowed for inputs whose `self.needs_grad[i]` is False. Non-array settings (axes, strides,
    padding) are passed to `__init__`.
    """

    needs_grad: tuple[bool, ...] = ()
    saved: tuple = ()

    def __call__(self, *inputs) -> Tensor:
        tensors = inputs  # the usual case: every input a Tensor, nothing to wrap
        for x in inputs:  # a loop, not all(...) over a generator: this runs for every op
            if not isinstance(x, Tensor):
                like = next((x for x in inputs if isinstance(x, Tensor)), None)
                tensors = [as_tensor(x, like) for x in inputs]
                break
        self.needs_grad = needs = tuple([t.requires_grad for t in tensors])
        self._recording = any(needs) and is_grad_enabled()
        xp = backend.xp_of(tensors[0].data)
        out = Tensor(self.forward(xp, *[t.data for t in tensors]), requires_grad=self._recording)
        if self._recording:
            self.inputs = tensors
            out.creator = self
        return out

    def save(self, *arrays) -> None:
        """Keep arrays for backward; nothing is kept when no graph is being recorded."""
        if self._recording:
            self.saved = arrays

    def forward(self, xp, *arrays):
        raise NotImplementedError

    def backward(self, xp, gy):
        raise NotImplementedError

    def shape_error(self, message: str) -> ValueError:
        """A ValueError that names this op: `raise self.shape_error(f"... {a.shape} ...")`."""
        return ValueError(f"{type(self).__name__}: {message}")


def _topological_order(root: Tensor) -> list[Tensor]:
    """Tensors reachable from `root` through creators, each after all tensors computed from it."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        tensor, expanded = stack.pop()
        if expanded:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        if tensor.creator is not None:
            for parent in tensor.creator.inputs:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order[::-1]  # root first


def _own(gy, leaf_memory: set[int]):
    """`gy`, copied if its buffer already backs another leaf's gradient.

    Backward functions may hand one array (or views of it) to several inputs; leaf gradients are
    later scaled in place (clipping, all-reduce), so no two leaves may share memory.
    """
    base = gy
    while getattr(base, "base", None) is not None:
        base = base.base
    if id(base) in leaf_memory:
        return gy.copy()
    leaf_memory.add(id(base))
    return gy


def backward(root: Tensor, grad=None) -> None:
    """Reverse-mode sweep from `root`; leaves that require a gradient get it added to `.grad`.

    `grad` defaults to ones for a one-element root. The graph below `root` is freed: creators and
    saved arrays are dropped, so calling backward twice through the same graph is an error.
    """
    if not root.requires_grad:
        raise RuntimeError("backward() on a tensor that does not require a gradient")
    xp = root.xp
    if grad is None:
        if root.size != 1:
            raise ValueError(f"backward() without a gradient needs one element, got {root.shape}")
        grad = xp.ones(root.shape, dtype=root.dtype)
    pending = {id(root): grad}
    leaf_memory: set[int] = set()  # buffers already handed out as a leaf's .grad
    for tensor in _topological_order(root):
        gy = pending.pop(id(tensor), None)
        creator = tensor.creator
        if creator is None:
            if gy is not None:
                tensor.grad = _own(gy, leaf_memory) if tensor.grad is None else tensor.grad + gy
            continue
        tensor.creator = None
        if gy is None:
            continue
        grads = creator.backward(xp, gy)
        if not isinstance(grads, tuple | list):
            grads = (grads,)
        for parent, g, needed in zip(creator.inputs, grads, creator.needs_grad):
            if not needed or g is None:
                continue
            if g.shape != parent.shape:
                raise RuntimeError(
                    f"{type(creator).__name__}.backward returned a gradient of shape {g.shape} "
                    f"for an input of shape {parent.shape}"
                )
            if id(parent) in pending:
                pending[id(parent)] = pending[id(parent)] + g
            else:
                pending[id(parent)] = g
        creator.saved = ()
        creator.inputs = ()

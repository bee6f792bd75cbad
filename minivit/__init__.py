"""minivit: a NumPy/CuPy reference engine for ViT, MLP-Mixer and ResNet+ViT hybrids.

Loads the officially released `.npz` checkpoints as they are, fine-tunes them, and matches the
official JAX code number for number. Heavy dependencies (cupy, mpi4py, tensorflow-datasets,
torch) are imported only by the functions that need them, and the model stack itself is imported
on first use, so `import minivit` stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

from minivit.autograd import Tensor, no_grad  # noqa: E402

_LAZY = {
    "load": ("minivit.checkpoint", "load"),
    "create_model": ("minivit.models", "create_model"),
    "build_model": ("minivit.models", "build_model"),
    "Model": ("minivit.models", "Model"),
}

__all__ = ["Model", "Tensor", "__version__", "build_model", "create_model", "load", "no_grad"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'minivit' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value

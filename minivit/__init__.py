"""minivit: a NumPy/CuPy reference engine for ViT, MLP-Mixer and ResNet+ViT hybrids.

Loads the officially released `.npz` checkpoints as they are, fine-tunes them, and matches the
official JAX code number for number. Heavy dependencies (cupy, mpi4py, tensorflow-datasets,
torch) are imported only by the functions that need them, and the model stack itself is imported
on first use, so `import minivit` stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os
import sys

# After each call OpenBLAS's worker threads spin for 2^OPENBLAS_THREAD_TIMEOUT cycles before they
# sleep (default 2^28, about 0.1 s), and on a small machine they take the cores from the Numba
# kernel that runs next: attention ran 1.8x slower inside a ViT-S/16 training step than alone,
# and the step took 3.4 s instead of 2.95 s on 2 cores. 2^4 cycles makes them sleep at once.
# 2^17 (about 50 us, enough to span the gap between the back-to-back products of a batch-1
# forward) was tried: a ViT-S/16 batch-1 forward loop ran 69-72 instead of 80-82 ms, but in two
# full bench/step.py runs ViT-Ti/16 batch 1 read 25.8 and 15.6 img/s against 34.2 with 2^4 (2 AMD
# EPYC cores), so it was not kept. OpenBLAS reads this when NumPy loads it, so it only applies
# when minivit is imported before NumPy (the `minivit` command is); otherwise set
# OPENBLAS_THREAD_TIMEOUT=4 in the environment. BLAS_THREADS_SLEEP says whether it applies.
BLAS_THREAD_TIMEOUT = "4"
BLAS_THREADS_SLEEP = "numpy" not in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", BLAS_THREAD_TIMEOUT)

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

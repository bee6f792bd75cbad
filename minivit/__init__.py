"""minivit: a NumPy/CuPy reference engine for ViT, MLP-Mixer and ResNet+ViT hybrids.

Loads the officially released `.npz` checkpoints as they are, fine-tunes them, and matches the
official JAX code number for number. Heavy dependencies (cupy, mpi4py, tensorflow-datasets,
torch) are imported only by the functions that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from minivit.autograd import Tensor, no_grad  # noqa: E402

__all__ = ["Tensor", "__version__", "no_grad"]

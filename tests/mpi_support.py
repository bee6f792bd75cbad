"""What the MPI tests share: where mpiexec is, how long a launch may take, the skip marker."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

MPIEXEC = shutil.which("mpiexec")
LAUNCH_LIMIT_S = 60  # a launch that has not ended by then counts as a hang


def mpi_missing() -> str | None:
    """Why the MPI tests cannot run here, or None when they can."""
    if MPIEXEC is None:
        return "mpiexec not found; pip install 'minivit[mpi]'"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py not installed; pip install 'minivit[mpi]'"
    return None


needs_mpi = pytest.mark.skipif(mpi_missing() is not None, reason=str(mpi_missing()))

"""Minimal array operations so one solver serves NumPy/SciPy and torch.

The solver itself only uses operators and methods that NumPy arrays and torch tensors share
(``@``, ``*``, ``.clip(min=0)``, indexing); this module moves data in and out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

from .._backend import Backend, import_torch


class NumpyOps:
    """NumPy/SciPy arrays (the reference implementation)."""

    def __init__(self, dtype=np.float64):
        self.dtype = np.dtype(dtype)

    def array(self, x) -> np.ndarray:
        """Dense array on the backend (a copy)."""
        return np.array(x, dtype=self.dtype)

    def index(self, idx: np.ndarray) -> np.ndarray:
        """Integer index array on the backend."""
        return np.asarray(idx, dtype=np.int64)

    def sparse(self, m: sparse.spmatrix) -> sparse.csr_matrix:
        """Sparse CSR matrix on the backend."""
        return sparse.csr_matrix(m, dtype=self.dtype)

    def numpy(self, x) -> np.ndarray:
        """Back to a NumPy float64 array."""
        return np.asarray(x, dtype=np.float64)

    def transposed(self, x) -> np.ndarray:
        """Contiguous copy of ``xᵀ``."""
        return np.ascontiguousarray(x.T)

    def scalar(self, x) -> float:
        """Python float of a 0-d result."""
        return float(x)


class TorchOps:
    """torch tensors on a given device (``cpu`` or ``cuda:N``)."""

    def __init__(self, device: str, dtype: str = "float32"):
        self.torch = import_torch()
        self.device = self.torch.device(device)
        self.dtype = getattr(self.torch, dtype)

    def array(self, x) -> Any:
        """Dense tensor on the device (a copy)."""
        return self.torch.tensor(np.asarray(x), dtype=self.dtype, device=self.device)

    def index(self, idx: np.ndarray) -> Any:
        """Integer index tensor on the device."""
        return self.torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.device)

    def sparse(self, m: sparse.spmatrix) -> Any:
        """Sparse (COO, coalesced) tensor on the device."""
        m = sparse.csr_matrix(m)
        t = self.torch
        coo = m.tocoo()
        indices = t.as_tensor(np.vstack([coo.row, coo.col]).astype(np.int64))
        values = t.as_tensor(coo.data, dtype=self.dtype)
        out = t.sparse_coo_tensor(indices, values, size=m.shape, check_invariants=False)
        return out.coalesce().to(self.device)

    def numpy(self, x) -> np.ndarray:
        """Back to a NumPy float64 array."""
        return x.detach().to("cpu").double().numpy()

    def transposed(self, x) -> Any:
        """Contiguous copy of ``xᵀ``."""
        return x.T.contiguous()

    def scalar(self, x) -> float:
        """Python float of a 0-d result."""
        return float(x.item())


def get_ops(backend: Backend, dtype: str | None = None) -> NumpyOps | TorchOps:
    """Array operations for a resolved backend (float64 on NumPy, float32 on torch by default)."""
    if backend.is_torch:
        return TorchOps(backend.device, dtype or "float32")
    return NumpyOps(dtype or "float64")

"""Minimal array operations so one solver serves NumPy/SciPy and torch.

The solver itself only uses operators and methods that NumPy arrays and torch tensors share
(``@``, ``*``, ``.clip(min=0)``, indexing); this module moves data in and out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from scipy import sparse

from .._backend import Backend, import_torch

try:  # a dependency of scanpy, so normally present; callers fall back to NumPy/SciPy without
    import numba
except ImportError:  # pragma: no cover
    numba = None

#: Fewest rows (spots) per thread task: below that, threads cost more than they save.
MIN_TASK = 256


#: Floating-point liberties a kernel may take with ``jit(fn, reassociate=True)``: reorder sums
#: (so they vectorise), fuse multiply-adds and divide by reciprocals. Results move by rounding
#: only (~1e-16 relative); NaN and infinity keep their IEEE meaning.
REASSOCIATE = frozenset({"reassoc", "contract", "arcp"})


def jit(fn: Callable, *, reassociate: bool = False) -> Callable:
    """Compile ``fn`` with numba (no GIL, cached on disk); ``fn`` itself without numba.

    ``reassociate``: allow :data:`REASSOCIATE` (for inner products in hot loops).
    """
    if numba is None:
        return fn
    return numba.njit(nogil=True, cache=True, fastmath=set(REASSOCIATE) if reassociate else False)(fn)


def usable_threads(n_threads: int | None = None) -> int:
    """``n_threads``, or the number of cores this process may use when ``None``."""
    if n_threads is not None:
        return max(1, int(n_threads))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def row_ranges(n: int, n_threads: int | None = None) -> list[tuple[int, int]]:
    """Split ``range(n)`` into one contiguous ``(start, stop)`` per thread (at least 1)."""
    parts = min(usable_threads(n_threads), max(1, n // MIN_TASK))
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def map_threads(fn: Callable, tasks: list[tuple], pool: ThreadPoolExecutor | None = None) -> list:
    """``[fn(*task) for task in tasks]``, in threads when there are several tasks.

    ``fn`` should release the GIL (a compiled ``nogil`` kernel); results keep the task order.
    A new pool is made (and closed) when none is given.
    """
    if len(tasks) <= 1:
        return [fn(*t) for t in tasks]
    if pool is not None:
        return list(pool.map(lambda t: fn(*t), tasks))
    with ThreadPoolExecutor(len(tasks)) as own:
        return list(own.map(lambda t: fn(*t), tasks))


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

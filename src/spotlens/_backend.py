"""Device resolution and the optional torch import.

NumPy/SciPy is the reference implementation (``device="cpu"``); torch serves ``"cuda"``,
``"cuda:N"``, ``"torch"`` (torch on the CPU, used to test the torch path without a GPU) and
``"auto"`` (CUDA when torch sees one, else NumPy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._validation import InputError


class BackendError(RuntimeError):
    """Raised when the requested device cannot be used."""


@dataclass(frozen=True)
class Backend:
    """A resolved compute backend.

    Attributes
    ----------
    name
        ``"numpy"`` or ``"torch"``.
    device
        The device string (``"cpu"``, ``"cuda:0"``, ...).
    """

    name: str
    device: str

    @property
    def is_torch(self) -> bool:
        """Whether this backend runs on torch."""
        return self.name == "torch"


def import_torch() -> Any:
    """Import torch or raise a clear error saying how to install it."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise BackendError(
            "This needs PyTorch, which is not installed. Install it with "
            "`pip install torch==2.13.0` (CPU) or a CUDA build from pytorch.org, "
            "or use device='cpu'."
        ) from err
    return torch


def resolve_device(device: str = "cpu") -> Backend:
    """Resolve a user-facing device string.

    Parameters
    ----------
    device
        ``"cpu"`` (NumPy/SciPy), ``"torch"`` (torch on the CPU), ``"cuda"``, ``"cuda:N"`` or
        ``"auto"`` (CUDA when available, else NumPy).

    Returns
    -------
    The resolved :class:`Backend`.

    Raises
    ------
    InputError
        If ``device`` is not one of the forms above (a ``ValueError``).
    BackendError
        If torch is missing for a torch device, or CUDA is requested but not available.
    """
    if not isinstance(device, str):
        raise InputError(
            f"device must be a string such as 'cpu', 'cuda' or 'auto', got {device!r}."
        )
    dev = device.strip().lower()
    if dev == "cpu":
        return Backend("numpy", "cpu")
    if dev == "auto":
        try:
            import torch
        except ImportError:
            return Backend("numpy", "cpu")
        if torch.cuda.is_available():
            return Backend("torch", "cuda:0")
        return Backend("numpy", "cpu")
    if dev == "torch":
        import_torch()
        return Backend("torch", "cpu")
    if dev == "cuda" or dev.startswith("cuda:"):
        torch = import_torch()
        if not torch.cuda.is_available():
            raise BackendError(
                f"device={device!r} was requested but torch sees no CUDA GPU. "
                "Use device='cpu', or device='auto' to pick the GPU only when there is one."
            )
        index = 0 if dev == "cuda" else dev.split(":", 1)[1]
        try:
            index = int(index)
        except ValueError as err:
            raise InputError(f"device={device!r}: the GPU index must be an integer.") from err
        if index >= torch.cuda.device_count():
            raise BackendError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible."
            )
        return Backend("torch", f"cuda:{index}")
    raise InputError(
        f"Unknown device {device!r}. Use 'cpu', 'torch', 'cuda', 'cuda:N' or 'auto'."
    )


def resolve_client(client):
    """Return a ``distributed.Client`` for ``client`` (a Client or ``"default"``).

    Raises
    ------
    InputError
        If dask.distributed is not installed, ``client="default"`` and no client is running, or
        ``client`` is something else.
    """
    try:
        import distributed
    except ImportError as err:  # pragma: no cover - dask is in the test extra
        raise InputError("client= needs dask.distributed: pip install 'spotlens[dask]'.") from err
    if isinstance(client, str) and client == "default":
        try:
            return distributed.default_client()
        except ValueError as err:
            raise InputError(
                "client='default' but no Dask client is running in this process; create one "
                "(distributed.Client(...)) or pass it as client=."
            ) from err
    if not isinstance(client, distributed.Client):
        raise InputError(
            f"client must be a distributed.Client (or 'default'), got {type(client).__name__}."
        )
    return client

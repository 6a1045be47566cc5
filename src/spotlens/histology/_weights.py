"""Reading encoder weights a user has on disk: safetensors, torch state dicts, whole modules.

Used by :func:`spotlens.histology.get_encoder` (``weights=`` and file paths); every reader
raises :class:`~spotlens._validation.InputError` naming the file and what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .._backend import import_torch
from .._validation import InputError

torch = import_torch()
nn = torch.nn


def _check_file(path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"Weights file {str(path)!r} does not exist or is not a file.")
    return path


def _read_safetensors(path: Path):
    try:
        from safetensors.torch import load_file
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError(f"Reading {path.name} needs the safetensors package: pip install "
                         "'spotlens[histology]'.") from err
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise InputError(f"Could not read {str(path)!r} as a .safetensors file "
                         f"({type(err).__name__}: {err}).") from err


def _read_state_dict(path) -> dict:
    """Read a tensor-only checkpoint: ``.safetensors``, or ``torch.save`` (``weights_only``).

    No code in the file runs either way.
    """
    path = _check_file(path)
    try:
        state = (_read_safetensors(path) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
    except InputError:
        raise
    except Exception as err:
        raise InputError(
            f"Could not read {str(path)!r} as a state_dict of tensors ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). For a TorchScript file or a "
            "pickled nn.Module, pass the path as the encoder name instead."
        ) from err
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            inner = state.get(wrapper)
            if isinstance(inner, Mapping) and len(state) <= 8:
                state = inner
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise InputError(
            f"{str(path)!r} does not hold a state_dict (a mapping of parameter names to tensors)."
        )
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _load_strict(net, state: dict, *, what: str, optional_prefixes: tuple[str, ...] = (),
                 names: str = "torchvision's"):
    """Load ``state`` into ``net``, raising :class:`InputError` naming any bad key.

    Keys starting with ``optional_prefixes`` may be absent (e.g. an unused classifier head);
    BatchNorm ``num_batches_tracked`` counters may be absent (older checkpoints).
    """
    expected = net.state_dict()
    missing = [
        k
        for k in expected
        if k not in state
        and not k.endswith("num_batches_tracked")
        and not k.startswith(optional_prefixes)
    ]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else "")
            )
        raise InputError(
            f"The checkpoint does not match {what}: {'; '.join(parts)} "
            f"({len(missing)} missing, {len(unexpected)} unexpected). Pass a checkpoint of "
            f"this architecture with {names} parameter names."
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise InputError(
                f"The checkpoint does not match {what}: {key!r} has shape "
                f"{tuple(value.shape)}, the architecture needs {tuple(expected[key].shape)}."
            )
    net.load_state_dict(state, strict=False)


def _load_module_file(path: Path, *, allow_pickle: bool):
    """Load a TorchScript archive, or (``allow_pickle``) a pickled ``nn.Module``."""
    try:
        return torch.jit.load(str(path), map_location="cpu"), "torchscript"
    except RuntimeError as script_error:
        if not allow_pickle:
            raise InputError(
                f"{str(path)!r} is not a TorchScript file ({str(script_error).splitlines()[0]}). "
                "Save the model with torch.jit.save(torch.jit.script(model), path); or, if you "
                "trust the file, pass allow_pickle=True to unpickle a saved nn.Module (this "
                "executes code from the file). For a ResNet-50 state_dict use "
                "get_encoder('resnet50', weights=path)."
            ) from script_error
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise InputError(
            f"Could not unpickle {str(path)!r}: {type(err).__name__}: {err}. The module's class "
            "must be importable here."
        ) from err
    if not isinstance(obj, nn.Module):
        hint = (
            " It holds a state_dict: build the architecture and pass its weights instead "
            "(e.g. get_encoder('resnet50', weights=path))."
            if isinstance(obj, Mapping)
            else ""
        )
        raise InputError(
            f"{str(path)!r} holds a {type(obj).__name__}, not an nn.Module.{hint}"
        )
    return obj, "pickle"

"""Atomic writers: each writes a temporary file in the target folder, then ``os.replace``."""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import InputError
from ._names import escape_names

logger = logging.getLogger("spotlens")


#: Names of the temporary files an interrupted writer leaves behind: ``.<name>.<8 random
#: characters>.tmp`` from :func:`atomic_path` (:func:`tempfile.mkstemp`) and ``.<name>.tmp-<pid>``
#: from the histology checkpoint writer. Keep in step with both.
TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.(?:[a-z0-9_]{8}\.tmp|tmp-\d+)$")


def temporary_files(folder: str | PathLike) -> list[Path]:
    """The temporary files of interrupted atomic writes in ``folder`` (not in sub-folders).

    A run killed while writing (``kill -9``, power loss) cannot remove the temporary file of
    :func:`atomic_path`; it stays beside the outputs as a hidden ``.<name>.<random>.tmp``.

    Parameters
    ----------
    folder
        Folder to look in; a missing folder has none.

    Returns
    -------
    The paths, sorted by name; only regular files whose names match :data:`TEMPORARY_NAME`.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if TEMPORARY_NAME.match(p.name) and p.is_file() and not p.is_symlink())


@contextmanager
def atomic_path(path: str | PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` in one step.

    The temporary file (``.<name>.<random>.tmp``, same folder, so ``os.replace`` is atomic) is
    flushed to disk before the move and removed if the block raises or is interrupted, so
    ``path`` holds either its previous content or the complete new file, never a partial one.

    Parameters
    ----------
    path
        Final file path; its folder must exist.

    Yields
    ------
    The temporary path to write to.

    Raises
    ------
    InputError
        The folder of ``path`` does not exist, or ``path`` is a folder.
    """
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise InputError(f"Cannot write {path}: the folder {path.parent} does not exist.")
    if path.is_dir():
        raise InputError(f"Cannot write {path}: it is a folder.")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates the file readable by its owner only; give it the usual permissions
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_h5ad(
    adata: AnnData,
    path: str | PathLike,
    *,
    compression: Literal["gzip", "lzf"] | None = None,
) -> None:
    """Write ``adata`` to an ``.h5ad`` file atomically, without changing ``adata``.

    anndata converts string columns of ``obs``/``var`` to categoricals in the object it writes;
    here it writes a shallow copy (arrays shared, ``obs``/``var`` and ``uns`` copied), so the
    caller's object is untouched. ``uns`` entries anndata cannot store are converted in the copy:
    tuples and sets become arrays, ``pandas.Series`` one-column DataFrames, non-string keys and
    column names strings, object arrays with non-string items and other objects (paths, dates)
    their ``str``; each lossy conversion is logged. Names that hold ``/`` (cell types such as
    ``"T/NK"`` as columns of ``obsm["proportions_spotlens"]``, keys of ``obsm``/``uns``, ...)
    are stored with ``/`` written ``%2F`` (:func:`spotlens._keys.storage_name`; ``/`` would make
    nested HDF5 groups, which anndata's next release refuses), each change recorded in
    ``uns["spotlens_stored_names"]``; :func:`spotlens.io.read_spatial` and
    :func:`spotlens.io.read_reference` restore the original names. The result of
    :func:`spotlens.deconv.deconvolve` round-trips unchanged through those readers.

    Parameters
    ----------
    adata
        AnnData in memory (a view is fine; a backed object must be loaded first).
    path
        Destination ``.h5ad`` file; its folder must exist. An existing file is replaced only once
        the new one is complete.
    compression
        HDF5 compression of the arrays.

    Raises
    ------
    InputError
        ``adata`` is not an AnnData or is backed; the folder of ``path`` does not exist.

    Examples
    --------
    >>> spotlens.io.write_h5ad(st, "out/spatial.h5ad")  # doctest: +SKIP
    """
    if not isinstance(adata, AnnData):
        raise InputError(f"write_h5ad needs an AnnData object, got {type(adata).__name__}.")
    if adata.isbacked:
        raise InputError(
            "write_h5ad needs an AnnData in memory; this one is backed by a file. "
            "Load it first with adata.to_memory()."
        )
    copy = _shallow_copy(adata)
    with atomic_path(path) as tmp:
        copy.write_h5ad(tmp, compression=compression)


def write_csv(df: pd.DataFrame, path: str | PathLike, *, index: bool = True) -> None:
    """Write a DataFrame to CSV atomically.

    Parameters
    ----------
    df
        Table to write, e.g. ``n_spots × n_types`` proportions indexed by spot name.
    path
        Destination file; its folder must exist.
    index
        Write the row index as the first column.

    Raises
    ------
    InputError
        ``df`` is not a DataFrame; the folder of ``path`` does not exist.
    """
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"write_csv needs a pandas DataFrame, got {type(df).__name__}.")
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=index)


def save_figure(fig, path: str | PathLike, *, dpi: int = 150) -> None:
    """Save a matplotlib figure atomically; the format follows the suffix of ``path``.

    Parameters
    ----------
    fig
        :class:`matplotlib.figure.Figure`.
    path
        Destination, e.g. ``"proportions.png"`` or ``".pdf"``/``".svg"``; its folder must exist.
    dpi
        Resolution of raster formats, in dots per inch.

    Raises
    ------
    InputError
        ``fig`` is not a Figure; the suffix is not a format matplotlib writes; the folder of
        ``path`` does not exist.
    """
    from matplotlib.figure import Figure

    if not isinstance(fig, Figure):
        raise InputError(f"save_figure needs a matplotlib Figure, got {type(fig).__name__}.")
    fmt = Path(path).suffix.lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise InputError(
            f"Cannot save a figure as {str(path)!r}: the suffix must be one of "
            f"{', '.join('.' + s for s in sorted(supported))}."
        )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")


def _shallow_copy(adata: AnnData) -> AnnData:
    raw = None
    if adata.raw is not None:
        raw = {"X": adata.raw.X, "var": adata.raw.var.copy(), "varm": dict(adata.raw.varm)}
    parts, escaped = escape_names({
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "uns": _writable(dict(adata.uns), "uns"),
        "obsm": dict(adata.obsm),
        "varm": dict(adata.varm),
        "obsp": dict(adata.obsp),
        "varp": dict(adata.varp),
        "layers": dict(adata.layers),
    })
    if escaped:
        logger.info(
            "write_h5ad: %d names hold '/', which h5ad keys cannot (e.g. %s); stored with '/' as "
            "'%%2F' and restored by spotlens.io.read_spatial / read_reference",
            len(escaped), ", ".join(map(repr, list(dict.fromkeys(escaped))[:3])),
        )
    return AnnData(X=adata.X, raw=raw, **parts)


_SCALARS = (str, bytes, bool, int, float, np.bool_, np.integer, np.floating, np.str_, np.bytes_)


def _writable(value: Any, where: str) -> Any:
    """Return ``value`` in a form anndata can write (new containers; arrays are not copied)."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            name = key if isinstance(key, str) else str(key)
            if name != key:
                logger.info("write_h5ad: %s key %r written as the string %r", where, key, name)
            if item is None and not _none_writable():
                logger.info("write_h5ad: %s[%r] is None and is left out (this anndata cannot "
                            "store None)", where, name)
                continue
            out[name] = _writable(item, f"{where}[{name!r}]")
        return out
    if value is None or isinstance(value, _SCALARS):
        return value
    if isinstance(value, np.generic):  # complex, datetime64, void
        logger.info("write_h5ad: %s (%s) written as its string", where, value.dtype)
        return str(value)
    if isinstance(value, pd.Series):
        return _writable_frame(value.to_frame(name=str(value.name or "value")), where)
    if isinstance(value, pd.DataFrame):
        return _writable_frame(value, where)
    if isinstance(value, (tuple, list, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        if items and all(isinstance(item, Mapping) for item in items):
            return {str(i): _writable(item, f"{where}[{i}]") for i, item in enumerate(items)}
        try:
            array = np.asarray(items)
        except ValueError:  # ragged
            array = np.empty(len(items), dtype=object)
            array[:] = [str(item) for item in items]
        return _writable(array, where)
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O" and not all(isinstance(v, str) for v in value.flat):
            logger.info("write_h5ad: %s holds non-string objects; written as strings", where)
            return value.astype(str).astype(object)
        if value.dtype.kind in "cmMV":
            logger.info("write_h5ad: %s (%s) written as strings", where, value.dtype)
            return value.astype(str)
        return value
    if isinstance(value, (pd.Categorical, pd.api.extensions.ExtensionArray)):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # sparse matrices, array views
        return value
    logger.info("write_h5ad: %s (%s) written as its string", where, type(value).__name__)
    return str(value)


def _writable_frame(df: pd.DataFrame, where: str) -> pd.DataFrame:
    out = df.copy(deep=False)
    out.columns = [str(c) for c in out.columns]
    for column in out.columns[[dtype == np.dtype(object) for dtype in out.dtypes]]:
        values = out[column]
        if not all(isinstance(v, str) for v in values if not pd.isna(v)):
            logger.info("write_h5ad: %s column %r written as strings", where, column)
            out[column] = values.astype(str)
    return out


@functools.cache
def _none_writable() -> bool:
    """Whether this anndata version stores ``None`` in ``uns`` (newer versions do)."""
    import h5py

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem
    try:
        with h5py.File(io.BytesIO(), "w") as f:
            write_elem(f, "probe", None)
    except Exception:  # noqa: BLE001 - any failure means "no"
        return False
    return True

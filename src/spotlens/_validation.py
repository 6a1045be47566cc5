"""``check_*`` helpers that turn bad input into clear, actionable errors.

Every error names the problem and the fix; none of these helpers modifies its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Number

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._matrix import CHUNK_VALUES, is_backed, row_blocks  # re-exported: CHUNK_VALUES, row_blocks


class InputError(ValueError):
    """Bad user input; the message names the problem and the fix."""


#: Label text that means "no label" (compared after ``str.strip().lower()``): what pandas,
#: R and spreadsheets write for a missing value, and what ``astype(str)`` makes of NaN/None.
MISSING_LABEL_TEXT = frozenset({"", "nan", "none", "null", "na", "n/a", "<na>", "#n/a"})


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def check_int(
    name: str,
    value,
    *,
    minimum: int | None = None,
    none_ok: bool = False,
    expected: str | None = None,
) -> int | None:
    """Return ``value`` as an ``int``; raise unless it is an integer ``≥ minimum``.

    Python and NumPy integers pass; ``bool``, floats (even ``2.0``) and strings do not.

    Parameters
    ----------
    name
        Parameter name, as the user wrote it (it starts the message).
    value
        The value to check.
    minimum
        Smallest allowed value (None: no bound).
    none_ok
        Whether ``None`` is allowed (it is then returned as is).
    expected
        What the value must be, for the message (default ``"an integer ≥ {minimum}"``).

    Raises
    ------
    InputError
        ``"{name} must be {expected}, got {value!r}."``

    Examples
    --------
    >>> check_int("k_neighbors", 6, minimum=1)
    6
    >>> check_int("k_neighbors", 2.5, minimum=1, expected="a positive integer")
    Traceback (most recent call last):
    ...
    spotlens._validation.InputError: k_neighbors must be a positive integer, got 2.5.
    """
    if value is None and none_ok:
        return None
    if not _is_integer(value) or (minimum is not None and value < minimum):
        if expected is None:
            expected = "an integer" + ("" if minimum is None else f" ≥ {minimum}")
            expected += " or None" if none_ok else ""
        raise InputError(f"{name} must be {expected}, got {value!r}.")
    return int(value)


def check_number(
    name: str,
    value,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    finite: bool = True,
    whole: bool = False,
    none_ok: bool = False,
    expected: str | None = None,
) -> float | None:
    """Return ``value`` as a ``float``; raise unless it is a real number within the bounds.

    Python and NumPy integers and floats pass; ``bool``, strings and NaN never do.

    Parameters
    ----------
    name
        Parameter name, as the user wrote it (it starts the message).
    value
        The value to check.
    above, at_least, below
        Bounds: ``value > above``, ``value ≥ at_least``, ``value < below`` (None: no bound).
    finite
        Whether ``±inf`` is refused.
    whole
        Whether the value must equal an integer (``8`` or ``8.0``, not ``8.5``).
    none_ok
        Whether ``None`` is allowed (it is then returned as is).
    expected
        What the value must be, for the message (default e.g. ``"a finite number > 0"``).

    Raises
    ------
    InputError
        ``"{name} must be {expected}, got {value!r}."``

    Examples
    --------
    >>> check_number("tol", 1e-5, above=0)
    1e-05
    >>> check_number("reference_fraction", 1, above=0, below=1)
    Traceback (most recent call last):
    ...
    spotlens._validation.InputError: reference_fraction must be a finite number > 0 and < 1, got 1.
    """
    if value is None and none_ok:
        return None
    ok = _is_real(value) and not np.isnan(value)
    if ok:
        ok = (
            (not finite or bool(np.isfinite(value)))
            and (above is None or value > above)
            and (at_least is None or value >= at_least)
            and (below is None or value < below)
            and (not whole or (bool(np.isfinite(value)) and int(value) == value))
        )
    if not ok:
        if expected is None:
            bounds = [f"> {above:g}" if above is not None else "",
                      f"≥ {at_least:g}" if at_least is not None else "",
                      f"< {below:g}" if below is not None else ""]
            expected = ("a finite " if finite else "a ") + ("whole number" if whole else "number")
            expected += "".join(f" {b}" if i == 0 else f" and {b}"
                                for i, b in enumerate(b for b in bounds if b))
            expected += " or None" if none_ok else ""
        raise InputError(f"{name} must be {expected}, got {value!r}.")
    return float(value)


def get_matrix(adata: AnnData, layer: str | None, *, what: str):
    """Return ``adata.X`` or ``adata.layers[layer]`` (not copied), with a clear error if absent."""
    if layer is None:
        matrix = adata.X
        if matrix is None:
            raise InputError(f"The {what} has no X matrix. Pass layer='...' naming the raw counts.")
        return matrix
    if layer not in adata.layers:
        have = ", ".join(map(repr, adata.layers.keys())) or "none"
        raise InputError(
            f"The {what} has no layer {layer!r} (layers: {have}). "
            "Pass layer=None to use X, or the name of the layer that holds raw counts."
        )
    return adata.layers[layer]


def check_not_empty(adata: AnnData, *, what: str, obs_name: str) -> None:
    """Raise if ``adata`` has no observations or no genes."""
    if not isinstance(adata, AnnData):
        raise InputError(
            f"The {what} must be an AnnData object, got {type(adata).__name__}. "
            "Read it with anndata.read_h5ad or spotlens.io.read_spatial."
        )
    if adata.n_obs == 0:
        raise InputError(f"The {what} is empty: it has 0 {obs_name}.")
    if adata.n_vars == 0:
        raise InputError(f"The {what} is empty: it has 0 genes.")


def check_unique_names(adata: AnnData, *, what: str, obs_name: str) -> None:
    """Raise if observation or gene names repeat.

    Genes are matched between datasets by name, so a repeated gene name cannot be matched to
    one column; renaming repeats silently would leave the renamed copies out of the fit.

    Raises
    ------
    InputError
        Names repeat; the message lists up to five of them, how many there are, and the fix.
    """
    if not adata.obs_names.is_unique:
        names = adata.obs_names
        dup = names[names.duplicated()].unique()
        raise InputError(
            f"The {what} has duplicate {obs_name} names, e.g. {dup[:5].tolist()} "
            f"({len(dup)} repeated). Make them unique first, e.g. with "
            "adata.obs_names_make_unique()."
        )
    if not adata.var_names.is_unique:
        names = adata.var_names
        dup = names[names.duplicated()].unique()
        raise InputError(
            f"The {what} has duplicate gene names, e.g. {dup[:5].tolist()} ({len(dup)} "
            "repeated); genes are matched by name, so each name must be one column. Sum the "
            "repeated columns into one gene, or rename them with adata.var_names_make_unique() "
            "(the copies become NAME-1, NAME-2, ... and are used only where the other dataset "
            "has the same names)."
        )


class CountCheck:
    """:func:`check_counts` over chunks of values, with the message of one whole-matrix check.

    Non-finite values are gathered and the minimum and the most fractional value tracked, so
    the error names the total number of NaN/inf, the global minimum and the worst value, as
    one call on the whole matrix would. Feed it with :meth:`add`, then call :meth:`finish`.
    """

    def __init__(self, what: str):
        self.what = what
        self.non_finite: list[np.ndarray] = []
        self.low = np.inf
        self.worst, self.worst_frac = None, 1e-3

    def add(self, values) -> None:
        """Check one chunk; raise at once only on non-numeric values."""
        values = np.asarray(values).ravel()
        if values.size == 0:
            return
        if not np.issubdtype(values.dtype, np.number):
            check_counts(values[:1], what=self.what)  # raises: non-numeric
        finite = np.isfinite(values)
        if not finite.all():
            self.non_finite.append(values[~finite])
            values = values[finite]
        if values.size == 0:
            return
        self.low = min(self.low, float(values.min()))
        if not np.issubdtype(values.dtype, np.integer):
            frac = np.abs(values - np.round(values))
            at = int(np.argmax(frac))
            if frac[at] > self.worst_frac:
                self.worst, self.worst_frac = values[at : at + 1].copy(), float(frac[at])

    def finish(self) -> None:
        """Raise :class:`InputError` as :func:`check_counts` would on the whole matrix."""
        if self.non_finite:
            check_counts(np.concatenate(self.non_finite), what=self.what)
        if self.low < 0:
            check_counts(np.array([self.low]), what=self.what)
        if self.worst is not None:
            check_counts(self.worst, what=self.what)


def _values(matrix) -> np.ndarray:
    if sparse.issparse(matrix):
        if matrix.format not in ("csr", "csc", "coo", "bsr"):
            # lil/dok/dia hold values in other shapes (lil.data is an object array of lists)
            matrix = matrix.tocsr()
        return np.asarray(matrix.data)
    return np.asarray(matrix).ravel()  # flat, so an argmax indexes one value


def check_counts(matrix, *, what: str) -> None:
    """Raise unless ``matrix`` holds finite, non-negative, integer-valued counts.

    Normalised or log-transformed input is the common mistake this catches. A matrix that
    stays on disk (``X`` of an AnnData read with ``backed="r"``) is read in chunks of rows
    (:func:`row_blocks`), never whole, and gets the same message as one in memory.

    Raises
    ------
    InputError
        Non-numeric, NaN/infinite, negative or non-integer values (more than 1e-3 off an
        integer); the message gives the number of NaN/inf, the minimum, or an example value.
    """
    if is_backed(matrix):
        check = CountCheck(what)
        for _, block in row_blocks(matrix, chunk_values=CHUNK_VALUES):
            check.add(block.data if sparse.issparse(block) else block)
        check.finish()
        return
    values = _values(matrix)
    if not np.issubdtype(values.dtype, np.number):
        raise InputError(f"The {what} holds non-numeric values ({values.dtype}); expected counts.")
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        n_bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise InputError(
            f"The {what} contains {n_bad} NaN or infinite values. Raw counts are finite: "
            "fix or drop those entries first."
        )
    if values.min() < 0:
        raise InputError(
            f"The {what} contains negative values (min {values.min():g}); raw counts cannot be "
            "negative. It looks scaled or batch-corrected: pass the raw counts "
            "(e.g. layer='counts')."
        )
    if np.issubdtype(values.dtype, np.integer):
        return
    frac = np.abs(values - np.round(values))
    if frac.max() > 1e-3:
        raise InputError(
            f"The {what} holds non-integer values (e.g. {values[np.argmax(frac)]:g}); spotlens "
            "expects raw counts. It looks normalised or log-transformed: pass the raw counts, "
            "e.g. layer='counts', or adata.raw.to_adata()."
        )


def check_labels(
    reference: AnnData, labels_key: str, *, min_cells_per_type: int
) -> pd.Series:
    """Return the cell-type labels as strings, raising on missing, NaN or too-rare types.

    A label is missing when it is NaN/None or text that means missing: empty or blank, or
    (any case) ``"nan"``, ``"none"``, ``"null"``, ``"na"``, ``"n/a"``, ``"<na>"``, ``"#n/a"``
    (:data:`MISSING_LABEL_TEXT`) — what a CSV export, R or ``astype(str)`` leaves where a label
    was missing. Such cells would otherwise form a cell type of their own.

    Raises
    ------
    InputError
        ``labels_key`` is not an ``obs`` column; some cells have a missing label (the message
        counts them and shows the texts found); fewer than two cell types; a type with fewer
        than ``min_cells_per_type`` cells.
    """
    if labels_key not in reference.obs.columns:
        have = ", ".join(map(repr, reference.obs.columns[:10])) or "none"
        raise InputError(
            f"The reference has no obs column {labels_key!r} (columns: {have}). "
            "Pass labels_key= naming the column of cell-type labels."
        )
    labels = reference.obs[labels_key]
    is_nan = labels.isna().to_numpy()
    text = labels.astype(str)
    as_text = ~is_nan & text.str.strip().str.lower().isin(MISSING_LABEL_TEXT).to_numpy()
    if as_text.any():
        found = text[as_text].value_counts()
        listed = ([f"{int(is_nan.sum())} NaN"] if is_nan.any() else []) + [
            f"{int(n)} {value!r}" for value, n in found.items()
        ]
        column = f"reference.obs[{labels_key!r}]"
        keep = f"~{column}.isin({found.index.tolist()})"
        keep += f" & {column}.notna()" if is_nan.any() else ""
        raise InputError(
            f"{int(is_nan.sum() + as_text.sum())} reference cells have no label in "
            f"obs[{labels_key!r}] ({', '.join(listed)}): text such as 'nan', 'None' or '' "
            "means a missing label, and those cells would form a cell type of their own. Drop "
            f"those cells (e.g. reference = reference[{keep}].copy()) or give them their cell "
            "type."
        )
    if is_nan.any():
        raise InputError(
            f"{int(is_nan.sum())} reference cells have no label (NaN) in obs[{labels_key!r}]. "
            "Drop them or give them a label before deconvolution."
        )
    labels = text
    counts = labels.value_counts()
    if len(counts) < 2:
        raise InputError(
            f"obs[{labels_key!r}] holds a single cell type ({counts.index[0]!r}); deconvolution "
            "needs at least two."
        )
    rare = counts[counts < min_cells_per_type]
    if len(rare):
        listed = ", ".join(f"{name!r} ({n} cells)" for name, n in rare.items())
        raise InputError(
            f"These cell types have fewer than {min_cells_per_type} reference cells: {listed}. "
            "Their signatures would be noise. Drop or merge them, or lower min_cells_per_type."
        )
    return labels


def check_coordinates(adata: AnnData, spatial_key: str) -> np.ndarray:
    """Return ``n_spots × 2`` float64 coordinates; raise if missing, not 2-D or not finite."""
    if spatial_key not in adata.obsm:
        have = ", ".join(map(repr, adata.obsm.keys())) or "none"
        raise InputError(
            f"The spatial data has no obsm[{spatial_key!r}] (obsm keys: {have}). Store the spot "
            "coordinates there as an n_spots × 2 array, or pass spatial_key=."
        )
    coords = np.asarray(adata.obsm[spatial_key])
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise InputError(
            f"obsm[{spatial_key!r}] must be n_spots × 2 (x, y), got shape {coords.shape}."
        )
    if coords.shape[1] > 2:
        raise InputError(
            f"obsm[{spatial_key!r}] has {coords.shape[1]} columns; spotlens needs 2-D coordinates "
            "(x, y). Pass only the two spatial columns."
        )
    try:
        coords = coords.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"obsm[{spatial_key!r}] is not numeric.") from err
    if not np.all(np.isfinite(coords)):
        raise InputError(
            f"obsm[{spatial_key!r}] contains NaN or infinite coordinates; every spot needs a "
            "position."
        )
    return coords


def check_cells_per_spot_mode(value) -> str:
    """Which way ``cell_level(cells_per_spot=value)`` counts cells.

    Returns ``"library"`` (``None``), ``"estimate"``, ``"prior"`` (a finite number > 0) or
    ``"column"`` (any other string: an ``obs`` column, checked by
    :func:`check_cells_per_spot`).

    Raises
    ------
    InputError
        A number that is not finite and > 0, a bool, or another type.
    """
    if value is None:
        return "library"
    if isinstance(value, str):
        return "estimate" if value == "estimate" else "column"
    if isinstance(value, bool | np.bool_) or not isinstance(value, Number):
        raise InputError(
            f"cells_per_spot must be None, 'estimate', a mean number of cells per spot or an "
            f"obs column name, got {value!r} ({type(value).__name__})."
        )
    check_number("cells_per_spot", value, above=0,
                 expected="a finite number > 0 (the mean number of cells per spot)")
    return "prior"


def check_cells_per_spot(spatial: AnnData, column: str) -> np.ndarray:
    """``n_spots`` known cells per spot from ``obs[column]``, rounded to integers.

    Raises
    ------
    InputError
        The column is missing, not numeric, negative, NaN or infinite, or 0 in every spot
        (nothing could be placed).
    """
    if column not in spatial.obs.columns:
        raise InputError(
            f"The spatial data has no obs column {column!r} for cells_per_spot; pass the column "
            "holding the number of cells (or nuclei) per spot, or None to estimate it."
        )
    values = spatial.obs[column]
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        raise InputError(
            f"obs[{column!r}] must be numeric (cells per spot), got dtype {values.dtype}."
        )
    values = values.to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)) or (values < 0).any():
        raise InputError(f"obs[{column!r}] has negative, NaN or infinite cell counts.")
    values = np.round(values)
    if len(values) and not values.any():
        raise InputError(
            f"obs[{column!r}] gives 0 cells in every spot (after rounding), so no cell can be "
            f"placed. Pass cells_per_spot= (--cells-per-spot on the command line) naming a "
            "column with the number of cells in each spot, or leave it unset to estimate it "
            "from the counts."
        )
    return values


def check_shared_genes(
    reference_genes: Sequence[str], spatial_genes: Sequence[str], *, min_genes: int, n_types: int
) -> pd.Index:
    """Return the genes shared by both, in spatial order; raise if there are too few."""
    shared = pd.Index(spatial_genes).intersection(pd.Index(reference_genes), sort=False)
    needed = max(min_genes, n_types)
    if len(shared) < needed:
        example_ref = list(pd.Index(reference_genes)[:3])
        example_st = list(pd.Index(spatial_genes)[:3])
        raise InputError(
            f"The reference and the spatial data share {len(shared)} genes; at least {needed} are "
            f"needed (and more than the {n_types} cell types). Check that both use the same gene "
            f"identifiers (reference: {example_ref}, spatial: {example_st}) — e.g. symbols in one "
            "and Ensembl IDs in the other, or another species."
        )
    return shared

"""How much of a cell's RNA the spatial assay captures, relative to the reference.

Pure kernel: arrays in, a number out. The number of cells in a spot is its abundance in
reference-cell units (its counts over what one reference cell of each of its types holds)
divided by the **capture ratio** ``c``: the spatial counts of a cell over its reference counts.
``c`` is 1 only when both assays capture alike (e.g. pseudo-spots summed from the reference's
own cells); Visium against single-cell RNA-seq is typically far below 1, so library sizes alone
count far too few cells.

Estimator (moments of the counts around the type-level fit). Write the spot's counts as
``y_ig`` over genes ``g``, its library ``N_i``, the fitted share of gene ``g``,
``q_ig = (p_i m)_g / (p_i m)·1`` (proportions ``p_i``, type means ``m_kg`` in counts per
reference cell, each gene scaled by its total count over its fitted total: the assays capture
genes differently, and an unmodelled gene-wise difference would be read as scatter between
cells) and ``µ_ig = N_i q_ig``. A spot of ``n_ik`` independent cells of each type,
each captured at ``c``, has, beyond the multinomial noise of its counts given ``N_i``,

``E Σ_g [(y_ig − µ_ig)² − y_ig (1 − q_ig)] ≈ c Σ_k a_ik V_k + Σ_k a_ik² W_k``,

with ``a_ik = c n_ik`` the abundance in reference-cell units (``p_ik N_i / Σ_k p_ik L_k``,
``L_k = Σ_g m_kg``), ``V_k`` the variance between the reference cells of type ``k`` beyond
their own multinomial noise, ``Σ_g [(r_jg − L_j s_kg)² − r_jg (1 − s_kg)]`` averaged over its
cells ``j`` (``s_k`` the type's profile, ``L_j`` the cell's library), and ``W_k`` the sampling
variance of the reference's type mean (``Σ_g (r_jg − L_j s_kg)²`` averaged, over the number of
cells). Summed over spots, that is one linear equation in ``c``. The variance between cells
adds up over cells, so the more cells share a spot's counts, the closer the spot lies to the
type mean: the counts themselves say how many cells they came from.

It assumes the cells of a spot are independent draws from their types, and that a spot's
counts grow with its cells (one ``c`` for the slide). Where neighbouring cells resemble each
other more than two random cells of their type (layers of a cortex, zones of a lymph node),
spots vary more than that and ``c`` comes out high (too few cells); finer labels (subtypes)
in the reference reduce that. Spots thinned to one depth whatever their cells (some
simulations) break the second assumption.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from .._validation import InputError

#: Spots per block of fitted means (a block is ``_BLOCK × n_genes`` float64).
_BLOCK = 4096


def type_dispersion(profiles, codes: np.ndarray, n_types: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per type: mean counts per cell ``m``, between-cell variance ``V`` and mean error ``W``.

    Parameters
    ----------
    profiles
        ``n_cells × n_genes`` raw counts of the reference over the genes used (CSR or dense).
    codes
        ``n_cells`` type code of each cell in ``[0, n_types)``.
    n_types
        Number of types.

    Returns
    -------
    m
        ``n_types × n_genes`` mean counts per cell.
    v
        ``n_types`` ``V_k`` (module docstring), counts²; 0 for a type without cells.
    w
        ``n_types`` ``W_k``, counts²; 0 for a type without cells.
    """
    r = sparse.csr_matrix(profiles, dtype=np.float64)
    n_cells = r.shape[0]
    onehot = sparse.csr_matrix((np.ones(n_cells), (codes, np.arange(n_cells))),
                               shape=(n_types, n_cells))
    size = np.asarray(onehot.sum(axis=1)).ravel()
    lib = np.asarray(r.sum(axis=1)).ravel()
    sums = np.asarray((onehot @ r).todense())                     # Σ_j r_jg
    lib_sums = np.asarray((onehot @ r.multiply(lib[:, None]).tocsr()).todense())  # Σ_j L_j r_jg
    sq = onehot @ np.asarray(r.multiply(r).sum(axis=1)).ravel()  # Σ_j Σ_g r_jg²
    lib_sq = onehot @ (lib * lib)                                 # Σ_j L_j²
    lib_tot = onehot @ lib                                        # Σ_j L_j
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(lib_tot[:, None] > 0, sums / np.where(lib_tot > 0, lib_tot, 1)[:, None], 0.0)
        m = np.where(size[:, None] > 0, sums / np.where(size > 0, size, 1)[:, None], 0.0)
    # Σ_j Σ_g (r_jg − L_j s_g)² = Σ r² − 2 Σ_g s_g Σ_j L_j r_jg + ||s||² Σ_j L_j²
    dev = sq - 2.0 * (s * lib_sums).sum(axis=1) + (s * s).sum(axis=1) * lib_sq
    noise = lib_tot - (s * sums).sum(axis=1)  # Σ_j Σ_g r_jg (1 − s_g)
    safe = np.where(size > 0, size, 1.0)
    v = np.where(size > 0, (dev - noise) / safe, 0.0)
    w = np.where(size > 0, dev / safe / safe, 0.0)
    return m, v, w


def reference_abundance(library: np.ndarray, proportions: np.ndarray, m: np.ndarray
                        ) -> np.ndarray:
    """``n_spots × n_types`` abundance in reference-cell units, ``a_ik = p_ik N_i / Σ_k p_ik L_k``.

    The cells of each type a spot would hold if it captured as the reference does: its counts
    ``N_i`` over what one reference cell of its mixture holds (``L_k = Σ_g m_kg``). 0 for a
    spot without counts or proportions.
    """
    p = np.nan_to_num(np.asarray(proportions, dtype=np.float64))
    per_cell = p @ m.sum(axis=1)
    scale = np.divide(library, per_cell, out=np.zeros_like(per_cell),
                      where=(per_cell > 0) & (library > 0))
    return p * scale[:, None]


def capture_ratio(counts, proportions: np.ndarray, m: np.ndarray, v: np.ndarray,
                  w: np.ndarray) -> tuple[float, np.ndarray]:
    """Capture ratio ``c`` of the spatial assay (module docstring) and each spot's abundance.

    Parameters
    ----------
    counts
        ``n_spots × n_genes`` raw spatial counts over the genes of ``m`` (CSR or dense).
    proportions
        ``n_spots × n_types`` type-level proportions (rows sum to 1; NaN rows are skipped).
    m, v, w
        From :func:`type_dispersion`.

    Returns
    -------
    c
        The capture ratio; NaN when the counts vary no more than their multinomial noise (no
        variance between cells to measure) or no spot has counts.
    abundance
        ``n_spots`` cells per spot in reference-cell units, ``Σ_k a_ik``; the cells per spot
        are ``abundance / c``.
    """
    y = sparse.csr_matrix(counts, dtype=np.float64)
    lib = np.asarray(y.sum(axis=1)).ravel()
    a = reference_abundance(lib, proportions, m)
    # the assays' gene-wise capture differences: each gene's total over its fitted total
    fitted = a.sum(axis=0) @ m
    seen = np.asarray(y.sum(axis=0)).ravel()
    factor = np.divide(seen, fitted, out=np.zeros_like(seen), where=fitted > 0)
    excess = 0.0
    for lo in range(0, y.shape[0], _BLOCK):
        hi = min(lo + _BLOCK, y.shape[0])
        mu = (a[lo:hi] @ m) * factor[None, :]
        total = mu.sum(axis=1, keepdims=True)
        q = np.divide(mu, total, out=np.zeros_like(mu), where=total > 0)
        mu = lib[lo:hi, None] * q                           # µ_ig = N_i q_ig
        block = y[lo:hi].toarray()
        excess += float(((block - mu) ** 2 - block * (1.0 - q)).sum())
    between = float((a * v[None, :]).sum())
    mean_error = float((a * a * w[None, :]).sum())
    c = (excess - mean_error) / between if between > 0 else np.nan
    if not np.isfinite(c) or c <= 0:
        c = np.nan
    return float(c), a.sum(axis=1)


def cells_per_spot_from(mode: str | float, counts, proportions: np.ndarray, profiles,
                        codes: np.ndarray) -> tuple[np.ndarray, dict]:
    """``n_spots`` cells per spot (not rounded) for ``cells_per_spot="estimate"`` or a number.

    ``"estimate"``: abundance over the capture ratio of :func:`capture_ratio`. A number ``n``:
    a prior on the mean, as cell2location's ``N_cells_per_location``: the capture ratio is
    set so that spots with counts hold ``n`` cells on average, each in proportion to its
    abundance. Also returns ``{"capture_ratio", "capture_ratio_from"}`` for ``uns``.

    Raises
    ------
    InputError
        ``"estimate"`` on counts that vary no more than counting noise (nothing to estimate
        from); no spot with counts and proportions.
    """
    n_types = proportions.shape[1]
    y = sparse.csr_matrix(counts, dtype=np.float64)
    if isinstance(mode, str):
        m, v, w = type_dispersion(profiles, codes, n_types)
        c, abundance = capture_ratio(y, proportions, m, v, w)
        if not np.isfinite(c):
            raise InputError(
                "cells_per_spot='estimate': the spots vary no more than counting noise around "
                "the type-level fit, so their counts do not say how many cells they hold. Pass "
                "the expected mean number of cells per spot instead (e.g. cells_per_spot=8 for "
                "Visium; --cells-per-spot 8)."
            )
    else:
        abundance = reference_abundance(np.asarray(y.sum(axis=1)).ravel(), proportions,
                                        type_dispersion(profiles, codes, n_types)[0]).sum(axis=1)
        with_cells = abundance > 0
        if not with_cells.any():
            raise InputError("No spot has both counts and type-level proportions: nothing to "
                             "scale cells_per_spot to.")
        c = float(abundance[with_cells].mean()) / float(mode)
    return abundance / c, {"capture_ratio": c, "capture_ratio_from":
                           "estimate" if isinstance(mode, str) else "mean cells per spot"}


__all__ = ["capture_ratio", "cells_per_spot_from", "reference_abundance", "type_dispersion"]

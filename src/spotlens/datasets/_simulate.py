"""Pure simulation kernels for :func:`spotlens.datasets.synthetic` (arrays in, arrays out).

The generative model, for spot ``s``, cell type ``k`` and gene ``g``:

- spot coordinates on a hexagonal (Visium-like) or square grid, 100 µm apart;
- a mean composition ``m_s`` that varies smoothly in space (a soft mixture of a few domain
  compositions) and spot proportions ``p_s ~ Dirichlet(concentration · m_s)``;
- ``n_s = max(1, Poisson(cells_per_spot))`` cells, split over types as
  ``Multinomial(n_s, p_s)``: the ground truth is these cell counts and their fractions;
- type profiles ``P`` (``n_types × n_genes``, rows sum to 1) and a per-cell library size
  ``ℓ_c`` (counts per cell) drawn around a type-specific mean;
- each cell's counts ``Poisson(ℓ_c P_kg · γ_cg)`` with ``γ_cg ~ Gamma(1/φ, φ)``
  (negative binomial with dispersion ``φ``), summed over the spot's cells.

The sum over cells is drawn in one step per spot and gene: ``Poisson(Λ_sg)`` with ``Λ_sg``
gamma-distributed with mean ``M_sg = Σ_k L_sk P_kg`` and variance ``V_sg = φ Σ_k Q_sk P_kg²``,
where ``L_sk = Σ_c ℓ_c`` and ``Q_sk = Σ_c ℓ_c²`` over the spot's cells of type ``k``. This matches
the mean and variance of the sum of the cells' negative-binomial draws exactly (and is exact for
a single cell, or for ``φ = 0``), and costs O(n_spots · n_genes) instead of O(n_cells · n_genes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

#: Entries (spots × genes) drawn per chunk: bounds the dense working memory (~40 MB per array).
CHUNK_ENTRIES = 1 << 22


def grid_coordinates(n_spots: int, *, spacing: float = 100.0, kind: str = "hex") -> np.ndarray:
    """Spot centres on a roughly square patch of a regular grid.

    Parameters
    ----------
    n_spots
        Number of spots.
    spacing
        Centre-to-centre distance of neighbouring spots, in µm (Visium: 100 µm).
    kind
        ``"hex"`` (rows ``spacing · √3/2`` apart, odd rows shifted by half a spacing, as on a
        Visium slide) or ``"square"``.

    Returns
    -------
    ``n_spots × 2`` float64 coordinates ``(x, y)`` in µm, filled row by row from ``(0, 0)``.
    """
    row_step = spacing * np.sqrt(3.0) / 2.0 if kind == "hex" else spacing
    n_cols = max(1, int(np.ceil(np.sqrt(n_spots * row_step / spacing))))
    i = np.arange(n_spots)
    row, col = np.divmod(i, n_cols)
    x = col * spacing + (0.5 * spacing * (row % 2) if kind == "hex" else 0.0)
    return np.column_stack([x, row * row_step]).astype(np.float64)


def domain_compositions(
    n_domains: int, n_types: int, rng: np.random.Generator, *, sparsity: float = 0.4,
    floor: float = 0.05,
) -> np.ndarray:
    """Mean composition of each domain: a few dominant types plus a small share of all types.

    Parameters
    ----------
    n_domains, n_types
        Shape of the result.
    rng
        Random generator.
    sparsity
        Dirichlet concentration per type; below 1 each domain is dominated by a few types.
    floor
        Share spread evenly over all types, so every type occurs everywhere at a low level.

    Returns
    -------
    ``n_domains × n_types`` array; rows sum to 1.
    """
    mu = rng.dirichlet(np.full(n_types, sparsity), size=n_domains)
    return (1.0 - floor) * mu + floor / n_types


def spot_means(
    coords: np.ndarray, n_domains: int, rng: np.random.Generator, *, layout: str = "domains",
    n_nearest: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Domain weights of each spot: smooth in space (``"domains"``) or not (``"random"``).

    With ``"domains"`` the domain centres are uniform random points in the bounding box of the
    spots, and a spot's weight on each of its ``n_nearest`` nearest centres is
    ``softmax(−d² / (2ℓ²))`` with ``ℓ`` half the typical centre spacing: a spot near a centre is
    mostly that domain, a spot between centres blends them, so compositions change smoothly.
    With ``"random"`` each spot belongs to one domain chosen uniformly at random (same kind of
    compositions, no spatial structure).

    Parameters
    ----------
    coords
        ``n_spots × 2`` coordinates (µm).
    n_domains
        Number of domains.
    rng
        Random generator.
    layout
        ``"domains"`` or ``"random"``.
    n_nearest
        Centres each spot is blended from.

    Returns
    -------
    columns, weights
        ``n_spots × n_nearest`` domain indices and weights (rows sum to 1).
    dominant
        ``n_spots`` index of each spot's heaviest domain.
    """
    n = coords.shape[0]
    if layout == "random" or n_domains == 1:
        dom = rng.integers(n_domains, size=n)
        return dom[:, None], np.ones((n, 1)), dom
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    extent = np.maximum(hi - lo, 1.0)
    centres = lo + rng.random((n_domains, 2)) * extent
    length = 0.5 * np.sqrt(extent.prod() / n_domains)
    kk = min(n_nearest, n_domains)
    d, j = cKDTree(centres).query(coords, k=kk)
    d, j = d.reshape(n, kk), j.reshape(n, kk)
    logits = -(d**2 - d[:, :1] ** 2) / (2.0 * length**2)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    return j, w, j[np.arange(n), w.argmax(axis=1)]


def draw_proportions(
    mean: np.ndarray, concentration: float, rng: np.random.Generator
) -> np.ndarray:
    """Spot proportions ``p_s ~ Dirichlet(concentration · mean_s)``.

    Parameters
    ----------
    mean
        ``n_spots × n_types`` mean compositions (rows sum to 1).
    concentration
        Dirichlet precision; larger keeps spots closer to their mean.
    rng
        Random generator.

    Returns
    -------
    ``n_spots × n_types`` proportions (rows sum to 1). A row whose gamma draws all underflow
    falls back to its mean.
    """
    g = rng.standard_gamma(concentration * mean)
    total = g.sum(axis=1, keepdims=True)
    return np.where(total > 0, g / np.where(total > 0, total, 1.0), mean)


def draw_cells(
    proportions: np.ndarray, cells_per_spot: float, rng: np.random.Generator
) -> np.ndarray:
    """Cells of each type per spot: ``Multinomial(max(1, Poisson(cells_per_spot)), p_s)``.

    Returns
    -------
    ``n_spots × n_types`` int64 cell counts; every row sums to at least 1.
    """
    n_cells = np.maximum(1, rng.poisson(cells_per_spot, size=proportions.shape[0]))
    p = proportions / proportions.sum(axis=1, keepdims=True)
    return rng.multinomial(n_cells, p).astype(np.int64)


def gene_profiles(
    n_types: int, n_genes: int, rng: np.random.Generator, *, n_markers: int | None = None,
    marker_fold: tuple[float, float] = (4.0, 16.0), type_cv: float = 0.5,
) -> np.ndarray:
    """Gamma-distributed expression profiles with type-specific marker genes.

    Each gene has a baseline ``b_g ~ Gamma(0.6, 1)`` (heavy-tailed, like real mean expression);
    each type multiplies it by ``Gamma`` noise with mean 1 and coefficient of variation
    ``type_cv``, and its own ``n_markers`` marker genes (disjoint between types while genes last)
    by a fold change log-uniform in ``marker_fold``.

    Parameters
    ----------
    n_types, n_genes
        Shape of the result.
    rng
        Random generator.
    n_markers
        Markers per type; ``None`` gives ``max(3, n_genes // (4 · n_types))``.
    marker_fold
        Range of the markers' fold change.
    type_cv
        Non-marker variation between types.

    Returns
    -------
    ``n_types × n_genes`` profiles; each row sums to 1 (expected fraction of a cell's counts).
    """
    if n_markers is None:
        n_markers = max(3, n_genes // (4 * n_types))
    n_markers = min(n_markers, n_genes)
    base = rng.gamma(0.6, 1.0, size=n_genes) + 1e-3
    shape = 1.0 / type_cv**2
    profiles = base[None, :] * rng.gamma(shape, 1.0 / shape, size=(n_types, n_genes))
    order = rng.permutation(n_genes)
    lo, hi = np.log(marker_fold[0]), np.log(marker_fold[1])
    for k in range(n_types):
        start = (k * n_markers) % n_genes
        markers = np.take(order, np.arange(start, start + n_markers), mode="wrap")
        profiles[k, markers] *= np.exp(rng.uniform(lo, hi, size=n_markers))
    return profiles / profiles.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class LibraryModel:
    """Per-cell library sizes (counts per cell): a lognormal around a type mean, or resampling.

    Attributes
    ----------
    type_mean
        ``n_types`` mean counts per cell of each type.
    cell_sd
        Standard deviation of the log library size within a type (lognormal model).
    pools
        Optional list of ``n_types`` arrays of observed library sizes; when given, cells draw
        their library size from their type's pool with replacement (used with a real reference).
    """

    type_mean: np.ndarray
    cell_sd: float = 0.3
    pools: tuple[np.ndarray, ...] | None = None

    def draw(self, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Library sizes of cells with type codes ``codes`` (``n_cells``), float64."""
        if self.pools is None:
            z = rng.normal(-0.5 * self.cell_sd**2, self.cell_sd, size=codes.shape[0])
            return self.type_mean[codes] * np.exp(z)
        sizes = np.array([len(p) for p in self.pools])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        flat = np.concatenate(self.pools).astype(np.float64)
        pick = offsets[codes] + (rng.random(codes.shape[0]) * sizes[codes]).astype(np.int64)
        return flat[pick]


def _chunk_counts(
    cells: np.ndarray, profiles: np.ndarray, profiles_sq: np.ndarray | None,
    library: LibraryModel, dispersion: float, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw the counts of one chunk of spots; return CSR pieces ``(row_nnz, indices, data)``."""
    c, n_types = cells.shape
    flat = cells.ravel()
    slot = np.repeat(np.arange(c * n_types), flat)
    lib = library.draw(slot % n_types, rng)
    lsum = np.bincount(slot, weights=lib, minlength=c * n_types).reshape(c, n_types)
    mean = lsum @ profiles
    if dispersion > 0:
        qsum = np.bincount(slot, weights=lib * lib, minlength=c * n_types).reshape(c, n_types)
        var = dispersion * (qsum @ profiles_sq)
        pos = mean > 0
        shape = np.divide(mean * mean, var, out=np.ones_like(mean), where=pos)
        scale = np.divide(var, mean, out=np.zeros_like(mean), where=pos)
        mean = rng.standard_gamma(shape) * scale
    counts = rng.poisson(mean)
    flat_counts = counts.ravel()
    at = np.flatnonzero(flat_counts)
    return (
        np.count_nonzero(counts, axis=1),
        (at % counts.shape[1]).astype(np.int32),
        flat_counts[at].astype(np.float32),
    )


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def draw_counts(
    cells: np.ndarray, profiles: np.ndarray, library: LibraryModel, *, dispersion: float,
    seed: np.random.SeedSequence, n_jobs: int | None = 1,
) -> sparse.csr_matrix:
    """Sum of the cells' negative-binomial counts for every spot, drawn chunk by chunk.

    Parameters
    ----------
    cells
        ``n_spots × n_types`` cells of each type per spot (a one-hot row is a single cell).
    profiles
        ``n_types × n_genes`` profiles (rows sum to 1).
    library
        Per-cell library sizes.
    dispersion
        Per-cell negative-binomial dispersion ``φ`` (variance ``μ + φμ²``); 0 gives Poisson.
    seed
        Seed sequence; chunk ``i`` uses its ``i``-th child, so the result does not depend on
        ``n_jobs``.
    n_jobs
        Threads drawing chunks in parallel (NumPy's generators release the GIL); ``None`` uses
        every core.

    Returns
    -------
    ``n_spots × n_genes`` CSR float32 matrix of integer counts. Working memory is a few dense
    ``chunk × n_genes`` arrays (``CHUNK_ENTRIES`` entries each) per thread plus the result;
    nothing dense of size ``n_spots × n_genes`` is built.
    """
    n, n_genes = cells.shape[0], profiles.shape[1]
    size = max(1, CHUNK_ENTRIES // max(n_genes, 1))
    slices = list(_chunks(n, size))
    seeds = seed.spawn(len(slices))
    profiles_sq = profiles * profiles if dispersion > 0 else None

    def work(i: int):
        rng = np.random.default_rng(seeds[i])
        return _chunk_counts(cells[slices[i]], profiles, profiles_sq, library, dispersion, rng)

    n_jobs = (os.cpu_count() or 1) if n_jobs is None else max(1, int(n_jobs))
    if n_jobs == 1 or len(slices) == 1:
        return _assemble(map(work, range(len(slices))), slices, n, n_genes)
    with ThreadPoolExecutor(max_workers=min(n_jobs, len(slices))) as pool:
        # results arrive in order and are copied out at once: a few chunks in flight at a time
        return _assemble(pool.map(work, range(len(slices))), slices, n, n_genes)


def _assemble(
    pieces, slices: list[slice], n: int, n_genes: int, *, reserve: bool = True
) -> sparse.csr_matrix:
    """Copy CSR pieces, in row order, into one matrix as they arrive.

    The output buffers are allocated at the largest possible size (``n × n_genes`` entries) but
    only the pages written become resident; they are shrunk in place at the end (``realloc``),
    so peak memory is the result plus the chunks in flight, not twice the result. Where the
    system refuses so large a reservation (or ``reserve=False``) the pieces are kept and
    concatenated instead.
    """
    index_dtype = np.int32 if n * n_genes < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n + 1, dtype=index_dtype)
    indices = data = None
    if reserve:
        try:
            indices = np.empty(n * n_genes, dtype=index_dtype)
            data = np.empty(n * n_genes, dtype=np.float32)
        except MemoryError:
            indices = data = None
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    at = 0
    for sl, (row_nnz, cols, vals) in zip(slices, pieces, strict=True):
        indptr[sl.start + 1 : sl.stop + 1] = at + np.cumsum(row_nnz)
        if data is None:
            kept.append((cols, vals))
        else:
            indices[at : at + cols.size] = cols
            data[at : at + vals.size] = vals
        at += vals.size
    if data is None:
        indices = np.concatenate([c for c, _ in kept]).astype(index_dtype, copy=False)
        data = np.concatenate([v for _, v in kept])
    else:
        indices.resize(at, refcheck=False)
        data.resize(at, refcheck=False)
    return sparse.csr_matrix((data, indices, indptr), shape=(n, n_genes), copy=False)

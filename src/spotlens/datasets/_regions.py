"""Regions of :func:`spotlens.datasets.pseudo_spots`: where they lie and their composition prior.

Pure kernels on arrays: :func:`region_labels` splits a grid of spots into contiguous regions of
similar size, :func:`region_prior` draws the cell-type prior of a region of a named kind
(synthspot's patterns: Sang-aram et al. 2024, doi:10.7554/eLife.88431); with the checks and
names of the ``regions`` argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial import cKDTree

from .._validation import InputError

#: The region kinds :func:`pseudo_spots` knows, each a way to draw a composition prior.
REGION_KINDS = ("uniform", "dominant", "missing", "rare", "diverse")
#: Share of the prior mass taken by the dominant type of a ``"dominant"`` region (uniform range).
DOMINANT_SHARE = (0.5, 0.8)
#: Prior of the rare type of a ``"rare"`` region (uniform range).
RARE_SHARE = (0.01, 0.05)
_LLOYD_ITERATIONS = 10


def region_labels(coords: np.ndarray, n_regions: int, rng: np.random.Generator) -> np.ndarray:
    """Split spots into ``n_regions`` contiguous regions of roughly equal size.

    The centres start at ``n_regions`` distinct random spots and are moved by a few Lloyd
    (k-means) iterations; each spot belongs to its nearest centre, so regions are Voronoi cells
    (convex, hence contiguous on the grid) of similar area. An iteration that would leave a
    region empty is not taken, so every region keeps at least one spot.

    Parameters
    ----------
    coords
        ``n_spots × 2`` spot centres (µm), ``n_spots ≥ n_regions`` distinct points.
    n_regions
        Number of regions.
    rng
        Random generator.

    Returns
    -------
    ``n_spots`` int64 region index in ``[0, n_regions)``.
    """
    centres = coords[rng.choice(coords.shape[0], size=n_regions, replace=False)]
    labels = cKDTree(centres).query(coords)[1].astype(np.int64)
    for _ in range(_LLOYD_ITERATIONS):
        sizes = np.bincount(labels, minlength=n_regions)
        centres = np.column_stack(
            [np.bincount(labels, weights=coords[:, d], minlength=n_regions) for d in range(2)]
        ) / sizes[:, None]
        new = cKDTree(centres).query(coords)[1].astype(np.int64)
        if np.bincount(new, minlength=n_regions).min() == 0 or np.array_equal(new, labels):
            break
        labels = new
    return labels


def region_prior(
    kind: str, n_types: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Cell-type frequency prior ``π`` of one region of the given kind.

    - ``"uniform"``: ``π_k = 1 / n_types``.
    - ``"dominant"``: a random type takes a share ``U(0.5, 0.8)``; the others split the rest
      as ``Dirichlet(1)``.
    - ``"missing"``: ``⌊n_types / 2⌋`` random types get ``π_k = 0``; the others ``Dirichlet(1)``.
    - ``"rare"``: a random type gets ``U(0.01, 0.05)``; the others split the rest as
      ``Dirichlet(1)``.
    - ``"diverse"``: ``Dirichlet(1)`` over all types.

    Parameters
    ----------
    kind
        One of :data:`REGION_KINDS`.
    n_types
        Number of cell types (≥ 2).
    rng
        Random generator.

    Returns
    -------
    prior
        ``n_types`` frequencies summing to 1.
    special
        Indices of the types that define the pattern: the dominant type, the missing types or
        the rare type (empty for ``"uniform"`` and ``"diverse"``).
    """
    none = np.zeros(0, dtype=np.int64)
    if kind == "uniform":
        return np.full(n_types, 1.0 / n_types), none
    if kind == "diverse":
        return rng.dirichlet(np.ones(n_types)), none
    if kind == "missing":
        special = np.sort(rng.choice(n_types, size=max(1, n_types // 2), replace=False))
        prior = np.zeros(n_types)
        rest = np.setdiff1d(np.arange(n_types), special)
        prior[rest] = rng.dirichlet(np.ones(rest.size))
        return prior, special
    low, high = DOMINANT_SHARE if kind == "dominant" else RARE_SHARE
    k = int(rng.integers(n_types))
    share = rng.uniform(low, high)
    prior = np.zeros(n_types)
    rest = np.delete(np.arange(n_types), k)
    prior[rest] = (1.0 - share) * rng.dirichlet(np.ones(rest.size))
    prior[k] = share
    return prior, np.array([k])


def check_regions(regions) -> tuple[str, ...]:
    """The ``regions`` argument as a tuple of kinds from :data:`REGION_KINDS` (a str is one).

    Raises
    ------
    InputError
        If ``regions`` is not a sequence, is empty, or names an unknown kind.
    """
    if isinstance(regions, str):
        regions = (regions,)
    try:
        regions = tuple(regions)
    except TypeError:
        raise InputError(
            f"regions must be a sequence of region kinds from {list(REGION_KINDS)}, got "
            f"{regions!r}."
        ) from None
    if not regions:
        raise InputError(f"regions is empty; give at least one kind from {list(REGION_KINDS)}.")
    bad = [r for r in regions if not isinstance(r, str) or r not in REGION_KINDS]
    if bad:
        raise InputError(
            f"Unknown region kinds {bad} in regions; valid kinds are {list(REGION_KINDS)}."
        )
    return regions


def name_regions(kinds: Sequence[str]) -> list[str]:
    """Region names: the kind, numbered from the second region of a kind on (``"rare_2"``)."""
    seen: dict[str, int] = {}
    names = []
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
        names.append(kind if seen[kind] == 1 else f"{kind}_{seen[kind]}")
    return names

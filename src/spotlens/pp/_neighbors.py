"""K-nearest-neighbour spot graphs that never cross sections, with ties broken by index.

Shared by the deconvolution graph and the histology graph model.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def knn(
    coords: np.ndarray, k: int, sections: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """K nearest neighbours of each spot (itself excluded), never across sections.

    Parameters
    ----------
    coords
        ``n_spots × 2`` coordinates.
    k
        Neighbours per spot; capped at the section size minus one.
    sections
        ``n_spots`` integer section codes, or ``None`` for one section.

    Returns
    -------
    distances, indices
        ``n_spots × k`` arrays. Where a section has fewer than ``k + 1`` spots the missing
        neighbours have index ``-1`` and distance ``inf``.

    Notes
    -----
    On regular grids (Visium HD bins, legacy ST, pseudo-spots) many neighbours are equally far
    and ``k`` cuts through a ring of them (k = 6 on a square grid: 4 orthogonal and 2 of the 4
    diagonal neighbours). Which of the tied neighbours the KD-tree returns depends on the last
    bits of the coordinates, so the same slide in other units could get another graph. Here
    distances equal to within 1e-6 of the median nearest-neighbour distance count as ties and
    ties go to the lower spot index, so the graph depends on the geometry and spot order only.
    """
    n = coords.shape[0]
    dist = np.full((n, k), np.inf)
    idx = np.full((n, k), -1, dtype=np.int64)
    groups = [np.arange(n)] if sections is None else [
        np.flatnonzero(sections == s) for s in np.unique(sections)
    ]
    for members in groups:
        kk = min(k, len(members) - 1)
        if kk < 1:
            continue
        tree = cKDTree(coords[members])
        # twice as many candidates as needed, so a ring of tied neighbours cut by k is whole
        m = min(2 * kk + 1, len(members))
        d, j = tree.query(coords[members], k=m, workers=-1)
        d, j = _break_ties(d, j, np.arange(len(members)), kk)
        dist[members, :kk] = d
        idx[members, :kk] = members[j]
    return dist, idx


def _break_ties(d: np.ndarray, j: np.ndarray, self_index: np.ndarray, k: int):
    """Each spot's ``k`` nearest candidates other than itself, by distance, then by index.

    Distances within 1e-6 of the median nearest-neighbour distance of each other count as
    equal.
    """
    nearest = d[:, 1] if d.shape[1] > 1 else d[:, 0]  # column 0 is (mostly) the spot itself
    nearest = nearest[np.isfinite(nearest) & (nearest > 0)]
    tol = 1e-6 * (float(np.median(nearest)) if nearest.size else 1.0)
    big = np.iinfo(np.int64).max
    with np.errstate(invalid="ignore", over="ignore"):
        ring = np.where(np.isfinite(d), np.round(d / tol), 0).astype(np.int64)
    key = ring * (int(j.max()) + 2) + j  # one sortable integer: ring first, then index
    key[~np.isfinite(d) | (j == self_index[:, None])] = big  # itself last, never chosen
    order = np.argsort(key, axis=1)[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(j, order, axis=1)

"""``pseudo_spots``: synthspot-style spots summed from real reference cells, with ground truth.

The design follows synthspot (Sang-aram et al., "Spotless, a reproducible pipeline for
benchmarking cell type deconvolution in spatial transcriptomics", eLife 12:RP88431, 2024,
doi:10.7554/eLife.88431): a labelled single-cell reference is split per cell type into a half
that is handed to the method as its reference and a half whose cells are summed into spots, so
a method never sees the cells it has to find. The spots lie in regions whose composition prior
follows a named pattern (a dominant type, missing types, a rare type, ...). This is our own
implementation, not a port of the R package.

The pure kernels here and in ``_regions.py`` (where the regions lie, their composition prior)
and ``_spot_counts.py`` (the cells and counts of each spot) take and return arrays;
:func:`pseudo_spots` validates, calls them and builds the AnnData objects.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._keys import (
    N_CELLS_KEY,
    PSEUDO_SPOTS_CELL_COUNTS_KEY,
    PSEUDO_SPOTS_KEY,
    PSEUDO_SPOTS_PLATFORM_KEY,
    PSEUDO_SPOTS_PROPORTIONS_KEY,
    REGION_KEY,
    SPATIAL_KEY,
)
from .._validation import (
    InputError,
    check_counts,
    check_int,
    check_labels,
    check_not_empty,
    check_number,
    check_unique_names,
    get_matrix,
)
from ._regions import check_regions, name_regions, region_labels, region_prior
from ._simulate import grid_coordinates
from ._spot_counts import (  # noqa: F401  (pick_cells, thin_counts: re-exported for tests)
    SPOT_CONCENTRATION,
    _platform,
    pick_cells,
    spot_cells,
    thin_counts,
)
from ._synthetic import SPACING_UM, _names

logger = logging.getLogger("spotlens")

#: Standard deviation of the log of a spot's target library size around ``library_size``.
LIBRARY_LOG_SD = 0.3
_SOURCE = "doi:10.7554/eLife.88431 (Sang-aram et al. 2024, synthspot)"


# --- validation and the reference split ------------------------------------------------------


def _check_cells_per_spot(value) -> tuple[int, int]:
    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    ok = (
        isinstance(value, (tuple, list, np.ndarray)) and len(value) == 2
        and all(is_int(v) for v in value) and 1 <= value[0] <= value[1]
    )
    if not ok:
        raise InputError(
            "cells_per_spot must be a pair of integers (min, max) with 1 ≤ min ≤ max, the "
            f"inclusive range of cells per spot, e.g. (2, 10); got {value!r}."
        )
    return int(value[0]), int(value[1])


def _split(
    codes: np.ndarray, n_types: int, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean ``n_cells`` mask of the reference half of each type's cells.

    ``round(fraction · n_k)`` random cells of type ``k``, at least one and at most ``n_k − 1``.
    """
    in_reference = np.zeros(codes.size, dtype=bool)
    for k in range(n_types):
        cells = np.flatnonzero(codes == k)
        n_ref = min(max(1, round(fraction * cells.size)), cells.size - 1)
        in_reference[rng.choice(cells, size=n_ref, replace=False)] = True
    return in_reference


# --- AnnData adapter -------------------------------------------------------------------------


def pseudo_spots(
    reference: AnnData,
    *,
    labels_key: str = "cell_type",
    layer: str | None = None,
    n_spots: int = 1000,
    regions: Sequence[str] = ("dominant", "uniform", "missing", "rare"),
    cells_per_spot: tuple[int, int] = (2, 10),
    library_size: float | None = None,
    reference_fraction: float = 0.5,
    exclude_from_reference: Sequence[str] = (),
    platform_effect: float = 0.0,
    seed: int | None = 0,
) -> tuple[AnnData, AnnData]:
    """Simulate spots by summing real reference cells, in regions of known composition pattern.

    Follows synthspot (Sang-aram et al., eLife 2024, doi:10.7554/eLife.88431). The cells of
    each type are split at random into a *reference half* (returned, for the method to use) and
    a *simulation half* (the only cells summed into spots); no cell is in both. Spots lie on a
    Visium-like hexagonal grid, 100 µm apart, divided into one contiguous region per entry of
    ``regions`` (Voronoi cells of k-means centres, of similar size). Each region has a cell-type
    prior ``π`` drawn once from its kind:

    - ``"uniform"``: all types equal;
    - ``"dominant"``: one random type takes 50–80 % of the prior, the others share the rest;
    - ``"missing"``: half of the types (rounded down) have prior 0, the others random;
    - ``"rare"``: one random type has a prior of 1–5 %, the others random;
    - ``"diverse"``: random (``Dirichlet(1)``).

    ("random" shares are ``Dirichlet(1)``.) A spot gets ``n ~ U{min, …, max}`` cells
    (``cells_per_spot``), proportions ``p ~ Dirichlet(20 · π)`` around its region's prior and
    ``Multinomial(n, p)`` cells of each type; the cells of a type are drawn without replacement
    within the spot (with replacement across spots) from that type's simulation half. The
    spot's counts are the sum of its cells' raw counts over all reference genes. With
    ``library_size``, each spot is then binomially thinned to a target
    ``library_size · exp(N(0, 0.3²))`` counts, and left as it is when it has fewer counts than
    its target (never upsampled).

    With ``platform_effect = σ > 0`` the spatial assay captures each gene differently from the
    single-cell one, as real pairs do (RCTD fits this gene-wise factor: Cable et al. 2022,
    doi:10.1038/s41587-021-00830-w): each gene gets a factor ``f_g = exp(N(0, σ²))``, scaled so
    that the simulation cells' total counts stay the same on average, and each spot's summed
    count ``y_g`` is replaced by a draw from ``Poisson(f_g · y_g)`` before the thinning.

    Parameters
    ----------
    reference
        ``n_cells × n_genes`` AnnData of raw counts (in ``X`` or ``layers[layer]``) with cell
        types in ``obs[labels_key]``; at least two types, each with at least two cells.
        Not modified.
    labels_key
        ``obs`` column of the cell types.
    layer
        Layer with the raw counts (``None``: ``X``).
    n_spots
        Number of spots (at least the number of regions).
    regions
        Region kinds from ``("uniform", "dominant", "missing", "rare", "diverse")``, one region
        per entry; a kind may repeat (regions are named ``"dominant"``, ``"dominant_2"``, …).
    cells_per_spot
        Inclusive integer range ``(min, max)`` of cells per spot, ``1 ≤ min ≤ max``; uniform.
    library_size
        ``None`` keeps the summed counts of the cells. A number is the target *median*
        library size (counts per spot) after binomial thinning. Spots whose cells hold fewer
        counts than their target are not topped up, so the median falls short of the target
        when that exceeds the typical depth of the summed cells.
    reference_fraction
        Fraction of each type's cells, in ``(0, 1)``, that goes to the returned reference:
        ``round(fraction · n_k)``, at least one and at most ``n_k − 1`` cells of type ``k``.
    exclude_from_reference
        Cell types left out of the returned reference but still present in the spots (a type
        the reference lacks). Their split is the same as without exclusion, so the spots do not
        depend on this argument.
    platform_effect
        Standard deviation ``σ`` (natural log) of the gene-wise capture factor of the spatial
        assay; 0 (the default) leaves the counts as the cells hold them. Real single-cell /
        spatial pairs show gene-wise factors of 2–25×; ``σ = 0.7`` puts 95 % of the factors
        within 4× either way.
    seed
        Seed of all randomness (``numpy.random.SeedSequence``); ``None`` draws fresh entropy,
        recorded in ``uns["pseudo_spots"]["params"]["seed"]``. The spots do not depend on
        ``library_size`` except through the thinning itself, so a thinned run is an entrywise
        subsample of the unthinned run with the same seed.

    Returns
    -------
    spatial
        ``n_spots × n_genes`` AnnData, genes (``var``) as in ``reference``.

        - ``X``: CSR float32 integer counts.
        - ``obsm["spatial"]``: ``n_spots × 2`` spot centres in µm, 100 µm apart (hexagonal).
        - ``obsm["proportions_true"]``: DataFrame ``n_spots × n_types`` (index ``obs_names``,
          columns all types of ``reference`` in sorted order), fraction of the spot's cells of
          each type; rows sum to 1.
        - ``obsm["cell_counts_true"]``: DataFrame ``n_spots × n_types`` of int64 cells per
          type; ``proportions_true == cell_counts_true / n_cells``.
        - ``obs["n_cells"]``: int64 cells in the spot, within ``cells_per_spot``.
        - ``obs["region"]``: categorical region name (its kind, numbered if it repeats).
        - ``var["platform_effect_true"]``: the factor ``f_g`` of each gene (1 without
          ``platform_effect``).
        - ``uns["pseudo_spots"]``: ``"params"`` (every argument, and the model constants),
          ``"region_priors"`` (a dict ``{"index": regions, "columns": types,
          "data": n_regions × n_types}``; ``pd.DataFrame(**d)`` rebuilds it),
          ``"region_types"`` (region name → array of the type names defining its pattern: the
          dominant type, the missing types, the rare type; empty for uniform and diverse),
          ``"simulation_cells"`` (``obs_names`` of the reference cells that spots were built
          from), ``"reference_cells"`` (those of the reference half, including the cells of
          excluded types that were dropped), ``"n_repeated_cells"`` (cells used twice in a
          spot because a type's simulation half had fewer cells than the spot needed; normally
          0) and ``"source"`` (the synthspot paper).
    reference_half
        ``n_ref_cells × n_genes`` AnnData of the reference-half cells without the types in
        ``exclude_from_reference``: ``X`` CSR float32 raw counts (from ``layer``), ``obs``
        copied with ``obs[labels_key]`` categorical, ``var`` as in ``reference``.

    Raises
    ------
    InputError
        ``reference`` not an AnnData or empty, duplicate cell or gene names, ``labels_key``
        missing or with NaN, fewer than two types, a type with fewer than two cells (it cannot
        be split), counts that are not raw non-negative integers; ``n_spots`` not an integer
        ≥ the number of regions; an empty ``regions`` or an unknown kind; ``cells_per_spot``
        not an integer pair with ``1 ≤ min ≤ max``; ``library_size`` not ``None`` or a positive
        number; ``reference_fraction`` outside ``(0, 1)``; ``exclude_from_reference`` naming
        an unknown type or every type; ``platform_effect`` negative or not a number.

    Examples
    --------
    >>> import numpy as np
    >>> import spotlens
    >>> _, ref = spotlens.datasets.synthetic(10, 200, 5, n_cells_per_type=20, seed=0)
    >>> spatial, ref_half = spotlens.datasets.pseudo_spots(
    ...     ref, n_spots=300, regions=("dominant", "missing"), library_size=500, seed=1
    ... )
    >>> spatial.shape, ref_half.shape
    ((300, 200), (50, 200))
    >>> bool(np.allclose(spatial.obsm["proportions_true"].sum(axis=1), 1.0))
    True
    >>> spatial.obs["region"].cat.categories.tolist()
    ['dominant', 'missing']
    """
    check_not_empty(reference, what="reference", obs_name="cells")
    check_unique_names(reference, what="reference", obs_name="cell")
    labels = check_labels(reference, labels_key, min_cells_per_type=1)
    sizes = labels.value_counts()
    if (sizes < 2).any():
        listed = ", ".join(f"{t!r} ({n} cell)" for t, n in sizes[sizes < 2].items())
        raise InputError(
            f"These cell types have a single cell in obs[{labels_key!r}]: {listed}. Each type "
            "is split into a reference half and a simulation half, so it needs at least two "
            "cells: drop or merge these types first."
        )
    counts = get_matrix(reference, layer, what="reference")
    check_counts(counts, what="reference counts")
    regions = check_regions(regions)
    n_spots = check_int("n_spots", n_spots, minimum=1)
    if n_spots < len(regions):
        raise InputError(
            f"n_spots={n_spots} is fewer than the {len(regions)} regions; every region needs a "
            "spot: raise n_spots or pass fewer regions."
        )
    low, high = _check_cells_per_spot(cells_per_spot)
    if library_size is not None:
        library_size = check_number("library_size", library_size, above=0)
    sigma = check_number("platform_effect", platform_effect, at_least=0)
    fraction = check_number(
        "reference_fraction", reference_fraction, above=0, below=1,
        expected="a number strictly between 0 and 1 (the share of each type's cells kept for "
                 "the reference; the rest build the spots)",
    )
    types = pd.Index(sorted(labels.unique()))
    if isinstance(exclude_from_reference, str):
        exclude_from_reference = (exclude_from_reference,)
    excluded = [str(t) for t in exclude_from_reference]
    unknown = [t for t in excluded if t not in types]
    if unknown:
        raise InputError(
            f"exclude_from_reference names cell types not in obs[{labels_key!r}]: {unknown}; "
            f"the types are {types.tolist()}."
        )
    if set(excluded) >= set(types):
        raise InputError(
            "exclude_from_reference names every cell type, which would leave the returned "
            "reference empty; exclude a subset of the types."
        )

    root = np.random.SeedSequence(seed)
    # the first six streams are those of the release without platform_effect (spawn is by index)
    s_split, s_layout, s_priors, s_cells, s_pick, s_thin, s_platform = root.spawn(7)
    codes = types.get_indexer(labels)
    n_types = len(types)
    x = sparse.csr_matrix(counts, dtype=np.float32, copy=True)
    np.round(x.data, out=x.data)  # check_counts allows 1e-3 off an integer

    in_reference = _split(codes, n_types, fraction, np.random.default_rng(s_split))
    sim = np.flatnonzero(~in_reference)
    sim_codes = codes[sim]

    coords = grid_coordinates(n_spots, spacing=SPACING_UM, kind="hex")
    region = region_labels(coords, len(regions), np.random.default_rng(s_layout))
    rng = np.random.default_rng(s_priors)
    priors, special = zip(*(region_prior(kind, n_types, rng) for kind in regions), strict=True)
    priors = np.vstack(priors)

    rng = np.random.default_rng(s_cells)
    n_cells = rng.integers(low, high + 1, size=n_spots)
    cell_counts = spot_cells(priors[region], n_cells, rng)

    rng = np.random.default_rng(s_pick)
    rows, cols, n_repeated = [], [], 0
    for k in range(n_types):
        pool = np.flatnonzero(sim_codes == k)  # positions among the simulation cells
        spots_k = np.flatnonzero(cell_counts[:, k])
        if spots_k.size == 0:
            continue
        picks = pick_cells(cell_counts[spots_k, k], pool.size, rng)
        n_repeated += int(np.maximum(cell_counts[spots_k, k] - pool.size, 0).sum())
        used = picks >= 0
        rows.append(np.broadcast_to(spots_k[:, None], picks.shape)[used])
        cols.append(pool[picks[used]])
    if n_repeated:
        logger.warning(
            "%d cells were used twice within a spot: some types have fewer simulation cells "
            "than a spot drew; lower cells_per_spot or reference_fraction to avoid it",
            n_repeated,
        )
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    membership = sparse.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(n_spots, sim.size)
    )  # repeated (spot, cell) pairs are summed
    spot_x = sparse.csr_matrix(membership @ x[sim])
    factor = np.ones(x.shape[1])
    if sigma > 0:
        spot_x, factor = _platform(spot_x, np.asarray(x[sim].sum(axis=0)).ravel(), sigma,
                                   np.random.default_rng(s_platform))
    if library_size is not None:
        rng = np.random.default_rng(s_thin)
        target = library_size * np.exp(rng.normal(0.0, LIBRARY_LOG_SD, size=n_spots))
        spot_x = thin_counts(spot_x, target, rng)
    spot_x.sort_indices()  # after thinning, which keeps the entry order and drops most of them

    region_names = name_regions(regions)
    spots = _names("spot", n_spots)
    truth_counts = pd.DataFrame(cell_counts, index=spots, columns=types.copy())
    spatial = AnnData(
        X=spot_x.astype(np.float32, copy=False),
        obs=pd.DataFrame(
            {
                N_CELLS_KEY: n_cells.astype(np.int64),
                REGION_KEY: pd.Categorical.from_codes(region, region_names),
            },
            index=spots,
        ),
        var=reference.var.copy(),
    )
    spatial.var_names = reference.var_names.astype(str)
    spatial.var[PSEUDO_SPOTS_PLATFORM_KEY] = factor
    spatial.obsm[SPATIAL_KEY] = coords
    spatial.obsm[PSEUDO_SPOTS_PROPORTIONS_KEY] = truth_counts.div(n_cells, axis=0)
    spatial.obsm[PSEUDO_SPOTS_CELL_COUNTS_KEY] = truth_counts
    names = np.asarray(reference.obs_names.astype(str))
    spatial.uns[PSEUDO_SPOTS_KEY] = {
        "params": {
            "labels_key": labels_key, "layer": layer,
            "n_spots": n_spots, "regions": np.array(regions),
            "cells_per_spot": np.array([low, high]),
            "library_size": library_size, "platform_effect": sigma,
            "reference_fraction": fraction, "exclude_from_reference": np.array(excluded, dtype=str),
            "spacing_um": SPACING_UM, "spot_concentration": SPOT_CONCENTRATION,
            "library_log_sd": LIBRARY_LOG_SD,
            "seed": seed if seed is not None else str(root.entropy),
        },
        "region_priors": {
            "index": np.array(region_names), "columns": np.asarray(types, dtype=str),
            "data": priors,
        },
        "region_types": {
            name: np.asarray(types[idx], dtype=str) for name, idx in zip(
                region_names, special, strict=True)
        },
        "simulation_cells": names[sim],
        "reference_cells": names[in_reference],
        "n_repeated_cells": n_repeated,
        "source": _SOURCE,
    }

    keep = in_reference & ~np.isin(labels.to_numpy(), excluded)
    kept_types = [t for t in types if t not in excluded]
    ref_obs = reference.obs.iloc[np.flatnonzero(keep)].copy()
    ref_obs[labels_key] = pd.Categorical(labels.to_numpy()[keep], categories=kept_types)
    reference_half = AnnData(X=x[np.flatnonzero(keep)], obs=ref_obs, var=reference.var.copy())
    reference_half.var_names = spatial.var_names.copy()
    return spatial, reference_half

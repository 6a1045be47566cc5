"""``synthetic``: simulated spatial data and a matching reference, with ground truth."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._keys import (
    DOMAIN_KEY,
    N_CELLS_KEY,
    SPATIAL_KEY,
    SYNTHETIC_KEY,
    TRUE_CELL_COUNTS_KEY,
    TRUE_PROFILES_KEY,
    TRUE_PROPORTIONS_KEY,
)
from .._validation import (
    InputError,
    check_counts,
    check_int,
    check_labels,
    check_not_empty,
    check_number,
    get_matrix,
)
from ._simulate import (
    LibraryModel,
    domain_compositions,
    draw_cells,
    draw_counts,
    draw_proportions,
    gene_profiles,
    grid_coordinates,
    spot_means,
)

SPACING_UM = 100.0
_LIBRARY_TYPE_SD = 0.35


def _names(prefix: str, n: int) -> pd.Index:
    width = len(str(max(n - 1, 0)))
    return pd.Index([f"{prefix}_{i:0{width}d}" for i in range(n)])


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def _profiles_from_reference(
    reference: AnnData, labels_key: str, layer: str | None
) -> tuple[np.ndarray, LibraryModel, pd.Index, pd.Index]:
    """Type profiles (rows sum to 1) and library-size pools of a labelled raw-count reference."""
    check_not_empty(reference, what="reference", obs_name="cells")
    labels = check_labels(reference, labels_key, min_cells_per_type=1)
    counts = get_matrix(reference, layer, what="reference")
    check_counts(counts, what="reference counts")
    counts = sparse.csr_matrix(counts, dtype=np.float64)
    lib = np.asarray(counts.sum(axis=1)).ravel()
    types = pd.Index(sorted(labels.unique()))
    codes = types.get_indexer(labels)
    keep = lib > 0
    norm = sparse.diags(np.divide(1.0, lib, out=np.zeros_like(lib), where=keep)) @ counts
    onehot = sparse.csr_matrix(
        (keep.astype(np.float64), (codes, np.arange(len(codes)))), shape=(len(types), len(codes))
    )
    n_used = np.asarray(onehot.sum(axis=1)).ravel()
    if (n_used == 0).any():
        empty = types[n_used == 0].tolist()
        raise InputError(
            f"Reference cell types {empty} have no cell with any counts; drop them before "
            "simulating from this reference."
        )
    profiles = np.asarray((onehot @ norm).todense()) / n_used[:, None]
    profiles /= profiles.sum(axis=1, keepdims=True)
    pools = tuple(lib[keep & (codes == k)] for k in range(len(types)))
    library = LibraryModel(type_mean=np.array([p.mean() for p in pools]), pools=pools)
    return profiles, library, types, pd.Index(reference.var_names.astype(str))


def synthetic(
    n_spots: int = 1000,
    n_genes: int = 2000,
    n_types: int = 15,
    *,
    cells_per_spot: float = 8.0,
    n_cells_per_type: int = 50,
    layout: Literal["domains", "random"] = "domains",
    seed: int | None = 0,
    reference: AnnData | None = None,
    labels_key: str = "cell_type",
    reference_layer: str | None = None,
    grid: Literal["hex", "square"] = "hex",
    n_domains: int | None = None,
    concentration: float = 10.0,
    counts_per_cell: float = 500.0,
    dispersion: float = 0.2,
    platform_effect: float = 0.0,
    n_jobs: int | None = 1,
    spacing_um: float = SPACING_UM,
) -> tuple[AnnData, AnnData]:
    """Simulate spot data with known cell-type composition, and a matching reference.

    Spots lie on a grid ``spacing_um`` apart (default 100 µm, hexagonal, like Visium; a
    square grid 8 µm apart is laid out like Visium HD 8 µm bins). Their cell-type composition is
    spatially coherent: a few random domain centres each carry a mean composition dominated by a
    few types, a spot's mean blends its nearest domains with weights that fall off smoothly
    with distance, and its proportions are drawn from a Dirichlet around that mean. Each spot
    holds ``max(1, Poisson(cells_per_spot))`` cells split over types multinomially. Each cell
    has a library size (counts per cell) around its type's mean and negative-binomial counts
    from its type's gene profile (gamma-distributed, with type-specific marker genes); a spot's
    counts are the sum over its cells. The reference holds ``n_cells_per_type`` single cells of
    every type drawn from the same profiles. See ``spotlens.datasets._simulate`` for the model.

    With ``reference=`` the profiles and library sizes come from a real labelled reference
    (mean library-size-normalised expression per type; library sizes resampled from the type's
    cells), so the simulation carries that dataset's genes, types and expression structure.

    Parameters
    ----------
    n_spots
        Number of spots.
    n_genes
        Number of genes (ignored with ``reference=``: the reference's genes are used).
    n_types
        Number of cell types (ignored with ``reference=``: the reference's types are used).
    cells_per_spot
        Mean cells per spot (Poisson, at least 1).
    n_cells_per_type
        Cells per type in the returned reference.
    layout
        ``"domains"``: spatially smooth compositions; ``"random"``: each spot takes one domain's
        composition at random, so neighbours are unrelated (a control for spatial methods).
    seed
        Seed of all randomness (``numpy.random.SeedSequence``); ``None`` draws fresh entropy,
        recorded in ``uns["synthetic"]["params"]["seed"]``. The spots do not depend on
        ``n_cells_per_type`` nor the reference cells on ``n_spots``.
    reference
        Optional ``n_cells × n_genes`` AnnData with raw counts and cell types in
        ``obs[labels_key]`` to take profiles from.
    labels_key
        ``obs`` column of the cell types, read from ``reference=`` and written to the returned
        reference.
    reference_layer
        Layer of ``reference=`` with raw counts (``None``: ``X``).
    grid
        ``"hex"`` or ``"square"``.
    n_domains
        Number of domains; ``None`` gives ``max(2, ⌈n_spots / 100⌉)`` (about 1 mm² each).
    concentration
        Dirichlet precision of spot proportions around their domain mean; larger is less varied.
    counts_per_cell
        Mean counts per cell over the simulated genes (type means vary around it by a factor
        ``exp(N(0, 0.35²))``; cells by ``exp(N(0, 0.3²))`` within a type). Ignored with
        ``reference=``.
    dispersion
        Per-cell negative-binomial dispersion ``φ`` (variance ``μ + φμ²``); 0 gives Poisson.
    platform_effect
        Standard deviation of a per-gene log-normal factor that scales the spatial profiles
        only (capture differences between the spatial assay and the reference); 0 for none.
    n_jobs
        Threads drawing the spot counts; ``None`` uses every core. Results do not depend on it.
    spacing_um
        Distance between neighbouring grid points, in µm (Visium 100, Visium HD bins 2, 8
        or 16). Only the coordinates depend on it.

    Returns
    -------
    spatial
        ``n_spots × n_genes`` AnnData.

        - ``X``: CSR float32 integer counts.
        - ``obsm["spatial"]``: ``n_spots × 2`` spot centres in µm (``spacing_um`` apart).
        - ``obsm["true_proportions"]``: DataFrame ``n_spots × n_types`` (index ``obs_names``),
          fraction of the spot's cells of each type; rows sum to 1.
        - ``obsm["true_cell_counts"]``: DataFrame ``n_spots × n_types`` of int64 cells per type;
          ``true_proportions == true_cell_counts / true_cell_counts.sum(axis=1)``.
        - ``obs["n_cells"]``: cells in the spot; ``obs["domain"]``: its dominant domain.
        - ``varm["true_profiles"]``: DataFrame ``n_genes × n_types``, expected counts of a cell
          with its type's mean library size (after the platform effect).
        - ``uns["synthetic"]["params"]``: every setting, for reproducibility.
    reference
        ``(n_types · n_cells_per_type) × n_genes`` AnnData: CSR float32 integer counts,
        ``obs[labels_key]`` (categorical), ``varm["true_profiles"]`` (before the platform
        effect).

    Notes
    -----
    Counts are drawn in chunks of spots straight into the sparse result, so memory is about
    the size of the returned matrix (CSR: 8 bytes per non-zero entry, float32 value and int32
    index). Measured time and memory at 1,000,000 spots: ``benchmarks/results/scaling.md`` and
    ``benchmarks/results/docstring_figures.md``.

    Raises
    ------
    InputError
        A size below its minimum (``n_spots``, ``n_cells_per_type``, ``n_domains`` ≥ 1;
        ``n_types`` ≥ 2; ``n_genes`` ≥ ``n_types``), a non-positive ``cells_per_spot``,
        ``spacing_um``, ``concentration`` or ``counts_per_cell``, a negative ``dispersion`` or
        ``platform_effect``, an unknown ``layout`` or ``grid``; with ``reference=``: not an
        AnnData, missing labels, fewer than two types, counts that are not raw integers, or a
        type whose cells are all empty.

    Examples
    --------
    >>> import numpy as np
    >>> import spotlens
    >>> spatial, reference = spotlens.datasets.synthetic(500, 300, 6, seed=1)
    >>> spatial.shape, reference.shape
    ((500, 300), (300, 300))
    >>> bool(np.allclose(spatial.obsm["true_proportions"].sum(axis=1), 1.0))
    True
    """
    n_spots = check_int("n_spots", n_spots, minimum=1)
    n_cells_per_type = check_int("n_cells_per_type", n_cells_per_type, minimum=1)
    cells_per_spot = check_number("cells_per_spot", cells_per_spot, above=0)
    concentration = check_number("concentration", concentration, above=0)
    counts_per_cell = check_number("counts_per_cell", counts_per_cell, above=0)
    spacing_um = check_number("spacing_um", spacing_um, above=0)
    dispersion = check_number("dispersion", dispersion, at_least=0)
    platform_effect = check_number("platform_effect", platform_effect, at_least=0)
    _check_choice("layout", layout, ("domains", "random"))
    _check_choice("grid", grid, ("hex", "square"))
    if n_domains is None:
        n_domains = max(2, -(-n_spots // 100))
    n_domains = check_int("n_domains", n_domains, minimum=1)
    if n_jobs is not None:
        n_jobs = check_int("n_jobs", n_jobs, minimum=1)

    root = np.random.SeedSequence(seed)
    s_profiles, s_layout, s_counts, s_reference, s_platform = root.spawn(5)
    if reference is None:
        n_types = check_int("n_types", n_types, minimum=2)
        n_genes = check_int("n_genes", n_genes, minimum=n_types)
        rng = np.random.default_rng(s_profiles)
        profiles = gene_profiles(n_types, n_genes, rng)
        type_mean = counts_per_cell * np.exp(
            rng.normal(-0.5 * _LIBRARY_TYPE_SD**2, _LIBRARY_TYPE_SD, size=n_types)
        )
        library = LibraryModel(type_mean=type_mean)
        types, genes = _names("type", n_types), _names("gene", n_genes)
    else:
        if not isinstance(reference, AnnData):
            raise InputError(
                f"reference must be an AnnData with raw counts, got {type(reference).__name__}."
            )
        profiles, library, types, genes = _profiles_from_reference(
            reference, labels_key, reference_layer
        )
        n_types, n_genes = profiles.shape

    spatial_profiles = profiles
    if platform_effect > 0:
        factor = np.exp(np.random.default_rng(s_platform).normal(0, platform_effect, n_genes))
        spatial_profiles = profiles * factor[None, :]
        spatial_profiles /= spatial_profiles.sum(axis=1, keepdims=True)

    rng = np.random.default_rng(s_layout)
    coords = grid_coordinates(n_spots, spacing=spacing_um, kind=grid)
    domain_mean = domain_compositions(n_domains, n_types, rng)
    cols, weights, dominant = spot_means(coords, n_domains, rng, layout=layout)
    mean = np.einsum("nj,njk->nk", weights, domain_mean[cols])
    cells = draw_cells(draw_proportions(mean, concentration, rng), cells_per_spot, rng)
    x = draw_counts(
        cells, spatial_profiles, library, dispersion=dispersion, seed=s_counts, n_jobs=n_jobs
    )

    spots = _names("spot", n_spots)
    truth_counts = pd.DataFrame(cells, index=spots, columns=types.copy())
    truth = truth_counts.div(truth_counts.sum(axis=1), axis=0)
    spatial = AnnData(
        X=x,
        obs=pd.DataFrame(
            {
                N_CELLS_KEY: cells.sum(axis=1),
                DOMAIN_KEY: pd.Categorical.from_codes(dominant, _names("domain", n_domains)),
            },
            index=spots,
        ),
        var=pd.DataFrame(index=genes.copy()),
    )
    spatial.obsm[SPATIAL_KEY] = coords
    spatial.obsm[TRUE_PROPORTIONS_KEY] = truth
    spatial.obsm[TRUE_CELL_COUNTS_KEY] = truth_counts
    spatial.varm[TRUE_PROFILES_KEY] = pd.DataFrame(
        (spatial_profiles * library.type_mean[:, None]).T, index=genes.copy(),
        columns=types.copy(),
    )
    spatial.uns[SYNTHETIC_KEY] = {
        "params": {
            "n_spots": n_spots, "n_genes": int(n_genes), "n_types": int(n_types),
            "cells_per_spot": cells_per_spot, "n_cells_per_type": n_cells_per_type,
            "layout": layout, "grid": grid, "spacing_um": spacing_um, "n_domains": n_domains,
            "concentration": concentration,
            "counts_per_cell": None if reference is not None else counts_per_cell,
            "dispersion": dispersion, "platform_effect": platform_effect,
            "seed": seed if seed is not None else str(root.entropy),
            "from_reference": reference is not None,
        }
    }

    one_hot = np.repeat(np.eye(n_types, dtype=np.int64), n_cells_per_type, axis=0)
    ref_x = draw_counts(one_hot, profiles, library, dispersion=dispersion, seed=s_reference)
    ref = AnnData(
        X=ref_x,
        obs=pd.DataFrame(
            {labels_key: pd.Categorical.from_codes(
                np.repeat(np.arange(n_types), n_cells_per_type), types.copy())},
            index=_names("cell", n_types * n_cells_per_type),
        ),
        var=pd.DataFrame(index=genes.copy()),
    )
    ref.varm[TRUE_PROFILES_KEY] = pd.DataFrame(
        (profiles * library.type_mean[:, None]).T, index=genes.copy(), columns=types.copy()
    )
    return spatial, ref

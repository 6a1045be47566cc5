"""Products of the cell level: reference cells placed in the spots, expression per cell type.

AnnData adapters that read :func:`spotlens.deconv.cell_level`'s weights
(``obsm[cell_weights_key]``) and the type-level proportions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._keys import (
    SPATIAL_KEY,
    SPOT_DIAMETER_KEY,
    cell_counts_key,
    cell_weights_key,
)
from .._validation import InputError, get_matrix
from ._cell_checks import footprint_diameter, read_rows

CELL_WEIGHTS_KEY = cell_weights_key()


def assign_cells(
    spatial: AnnData,
    reference: AnnData,
    *,
    key: str = CELL_WEIGHTS_KEY,
    spatial_key: str = "spatial",
    reference_layer: str | None = None,
    spot_diameter: float | None = None,
    seed: int = 0,
) -> AnnData:
    """Single-cell map: reference cells placed in the spots, as many as each spot's abundance.

    In every spot, ``cell_counts[i, k]`` cells of type ``k`` are taken: the highest-weighted
    cells of that type (cycling through them if fewer have weight; with metacells, a random
    member of each chosen metacell). Each is placed uniformly at random inside the spot's
    footprint, a disc of ``spot_diameter`` around the spot centre.

    Parameters
    ----------
    spatial
        Spatial AnnData after :func:`cell_level`.
    reference
        The reference used by :func:`cell_level` (may be backed: only the rows or genes
        needed are read, in chunks).
    key
        ``key_added`` of :func:`cell_level`.
    spatial_key
        ``obsm`` key of the spot coordinates.
    reference_layer
        Reference layer copied into the cells' ``X`` (``None`` = ``X``).
    spot_diameter
        Footprint diameter in coordinate units. ``None``: ``spot_diameter_fullres`` from
        ``uns["spatial"][library]["scalefactors"]`` when there is one, else half the median
        distance between neighbouring spots.
    seed
        Seed for the positions (and metacell members).

    Returns
    -------
    ``n_assigned_cells × n_genes`` AnnData: ``X`` the source cells' counts; ``obs``: ``spot``,
    ``cell_type``, ``source_cell``, ``weight``; ``obsm["spatial"]`` positions in the spots'
    coordinate units; ``uns["spot_diameter"]``.

    Raises
    ------
    InputError
        :func:`cell_level` has not been run, or ``reference`` does not match it.
    """
    if key not in spatial.obsm or key not in spatial.uns:
        raise InputError(
            f"No cell-level result under obsm[{key!r}]. Run spotlens.deconv.cell_level first."
        )
    counts_key = cell_counts_key(key)
    w = sparse.csr_matrix(spatial.obsm[key])
    cell_counts = spatial.obsm[counts_key]
    info = spatial.uns[key]
    columns = pd.Index(np.asarray(info["columns"]).astype(str))
    metacell = np.asarray(info["metacell"])
    labels_key = info["params"]["labels_key"]
    if len(metacell) != reference.n_obs or labels_key not in reference.obs:
        raise InputError("This reference is not the one cell_level used (cells differ).")
    use_meta = (metacell >= 0).any()
    if not use_meta and not columns.equals(pd.Index(reference.obs_names)):
        raise InputError("This reference is not the one cell_level used (cell names differ).")
    types = pd.Index(cell_counts.columns)
    labels = reference.obs[labels_key].astype(str)
    rng = np.random.default_rng(seed)
    if use_meta:
        col_type = np.array([types.get_loc(c.rsplit("#", 1)[0]) for c in columns])
    else:
        col_type = types.get_indexer(labels)

    coo = w.tocoo()
    spot, col, weight = coo.row, coo.col, coo.data
    ctype = col_type[col]
    order = np.lexsort((-weight, ctype, spot))
    spot, col, weight, ctype = spot[order], col[order], weight[order], ctype[order]
    group = spot * len(types) + ctype
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    sizes = np.diff(np.r_[starts, len(group)])
    need = cell_counts.to_numpy()[spot[starts], ctype[starts]].astype(np.int64)
    take = np.repeat(starts, need) + np.concatenate(
        [np.arange(k) % s for k, s in zip(need, sizes, strict=True)]
    ) if need.sum() else np.zeros(0, dtype=np.int64)
    out_spot, out_col, out_w = spot[take], col[take], weight[take]
    # types a spot needs but no candidate carries (rare): random cells of that type
    have = np.zeros(cell_counts.shape, dtype=np.int64)
    np.add.at(have, (out_spot, ctype[take]), 1)
    short = cell_counts.to_numpy() - have
    extra_spot, extra_col = [], []
    for i, k in zip(*np.nonzero(short > 0), strict=True):
        pool = np.flatnonzero(col_type == k)
        extra_spot.append(np.full(short[i, k], i))
        extra_col.append(rng.choice(pool, short[i, k]))
    if extra_spot:
        out_spot = np.concatenate([out_spot, *extra_spot])
        out_col = np.concatenate([out_col, *extra_col])
        out_w = np.concatenate([out_w, np.zeros(sum(len(e) for e in extra_spot))])
    if use_meta:
        members = pd.Series(np.arange(reference.n_obs)).groupby(metacell).apply(np.asarray)
        source = np.array([rng.choice(members[m]) for m in out_col], dtype=np.int64)
    else:
        source = out_col

    coords = np.asarray(spatial.obsm[spatial_key], dtype=np.float64)
    diameter = footprint_diameter(spatial, coords, spot_diameter)
    radius = diameter / 2 * np.sqrt(rng.random(len(source)))
    angle = rng.random(len(source)) * 2 * np.pi
    xy = coords[out_spot] + np.c_[radius * np.cos(angle), radius * np.sin(angle)]

    x = read_rows(get_matrix(reference, reference_layer, what="reference"), rows=source)
    obs = pd.DataFrame(
        {
            "spot": pd.Categorical(np.asarray(spatial.obs_names)[out_spot]),
            "cell_type": pd.Categorical(types[col_type[out_col]]),
            "source_cell": np.asarray(reference.obs_names)[source],
            "weight": out_w,
        },
        index=[f"cell_{i}" for i in range(len(source))],
    )
    cells = AnnData(X=x, obs=obs, var=pd.DataFrame(index=reference.var_names.copy()))
    cells.obsm[SPATIAL_KEY] = xy
    cells.uns[SPOT_DIAMETER_KEY] = float(diameter)
    return cells


def cell_type_expression(
    spatial: AnnData,
    reference: AnnData,
    genes: list[str] | pd.Index,
    *,
    key: str = CELL_WEIGHTS_KEY,
    reference_layer: str | None = None,
) -> pd.DataFrame:
    """Expression of chosen genes in each spot, split by the cell type it comes from.

    ``E[i, (g, k)] = Σ_{c ∈ k} β_ic · counts_c[g]``: the counts of gene ``g`` that the cells of
    type ``k`` placed in spot ``i`` carry (reference count units).

    Parameters
    ----------
    spatial
        Spatial AnnData after :func:`cell_level`.
    reference
        The reference used by :func:`cell_level` (may be backed: only the rows or genes
        needed are read, in chunks).
    genes
        Genes of the reference.
    key
        ``key_added`` of :func:`cell_level`.
    reference_layer
        Reference layer with counts (``None`` = ``X``).

    Returns
    -------
    DataFrame ``n_spots × (n_genes · n_types)`` with columns ``(gene, cell_type)``.

    Raises
    ------
    InputError
        No cell-level result, or genes missing from the reference.
    """
    if key not in spatial.obsm or key not in spatial.uns:
        raise InputError(
            f"No cell-level result under obsm[{key!r}]. Run spotlens.deconv.cell_level first."
        )
    genes = pd.Index(genes).astype(str)
    missing = genes.difference(reference.var_names)
    if len(missing):
        raise InputError(f"Genes not in the reference: {list(missing[:5])}.")
    info = spatial.uns[key]
    w = sparse.csr_matrix(spatial.obsm[key])
    metacell = np.asarray(info["metacell"])
    labels = reference.obs[info["params"]["labels_key"]].astype(str)
    types = pd.Index(spatial.obsm[cell_counts_key(key)].columns)
    x = read_rows(get_matrix(reference, reference_layer, what="reference"),
                  columns=reference.var_names.get_indexer(genes)).astype(np.float64)
    codes = types.get_indexer(labels)
    if (metacell >= 0).any():
        n_meta = w.shape[1]
        member = sparse.csr_matrix(
            (np.ones(len(metacell)), (metacell, np.arange(len(metacell)))),
            shape=(n_meta, len(metacell)),
        )
        size = np.asarray(member.sum(axis=1)).ravel()
        x = sparse.diags(1 / np.maximum(size, 1)) @ member @ x  # metacell mean counts
        col_type = np.asarray(member @ sparse.csr_matrix(
            (np.ones(len(codes)), (np.arange(len(codes)), codes)), shape=(len(codes), len(types))
        ).todense()).argmax(axis=1)
    else:
        col_type = codes
    blocks = {}
    for k, name in enumerate(types):
        cols = np.flatnonzero(col_type == k)
        part = np.asarray((w[:, cols] @ x[cols]).todense())
        for j, g in enumerate(genes):
            blocks[(g, name)] = part[:, j]
    frame = pd.DataFrame(blocks, index=spatial.obs_names)
    order = [(g, name) for g in genes for name in types]  # genes in the order asked for
    frame = frame[order]
    frame.columns = pd.MultiIndex.from_tuples(order, names=["gene", "cell_type"])
    return frame

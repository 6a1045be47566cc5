"""Bins smaller than a cell summed into larger bins or into segmented cells.

A Visium HD slide comes as 2 µm bins (and 8 / 16 µm ones); a cell spans many 2 µm bins, and a
bin holds a few counts of a piece of a cell. Cell types can be estimated per bin (fractional
proportions), but whole cells cannot be placed in a bin that holds a fraction of one. The
field's answer is to sum bins first: into squares of a chosen size (as Space Ranger's 8 and
16 µm outputs), or into the cells a segmentation found (bin2cell: Polański et al. 2024,
doi:10.1093/bioinformatics/btae546). :func:`aggregate_bins` does both, with scanpy's
:func:`scanpy.get.aggregate` summing the counts.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._keys import AGGREGATE_BINS_KEY, N_BINS_KEY, SPATIAL_UNS_KEY
from .._validation import InputError, check_coordinates, check_counts, check_number, get_matrix

#: Bins whose counts are checked to be raw counts (as deconvolve checks the first spots).
_HEAD_BINS = 2000


def _microns_per_unit(adata: AnnData, given) -> float:
    """µm per unit of the coordinates: ``given``, else the scale factors' ``microns_per_pixel``."""
    if given is not None:
        return check_number("microns_per_unit", given, above=0)
    libraries = adata.uns.get(SPATIAL_UNS_KEY)
    stated = set()
    if hasattr(libraries, "values"):
        for entry in libraries.values():
            scale = entry.get("scalefactors", {}) if hasattr(entry, "get") else {}
            if scale.get("microns_per_pixel"):
                stated.add(float(scale["microns_per_pixel"]))
    if len(stated) == 1:
        return stated.pop()
    why = ("its libraries state different values" if stated else
           "uns['spatial'][...]['scalefactors'] states no 'microns_per_pixel'")
    raise InputError(
        f"The size of a coordinate unit in µm is unknown ({why}). Pass microns_per_unit= (1 if "
        "obsm holds µm; spotlens.io.read_spatial records it for Visium HD)."
    )


def aggregate_bins(
    adata: AnnData,
    *,
    bin_size_um: float | None = None,
    by: str | None = None,
    spatial_key: str = "spatial",
    layer: str | None = None,
    library_key: str | None = None,
    microns_per_unit: float | None = None,
) -> AnnData:
    """Sum the counts of small bins into squares of ``bin_size_um`` or into labelled groups.

    Use it before :func:`spotlens.deconv.cell_level` on bins smaller than a cell (Visium HD 2 or
    8 µm bins, Stereo-seq): there every bin would be given at least one whole cell. Square bins
    of 16 µm or more, or the cells of a segmentation (``by=``, e.g. nuclei from
    :func:`spotlens.histology.segment_nuclei` grown into cells, one label per bin), hold whole
    cells. Type-level proportions can still be estimated on the small bins themselves.

    Parameters
    ----------
    adata
        ``n_bins × n_genes`` AnnData of raw counts with bin centres in ``obsm[spatial_key]``.
    bin_size_um
        Side of the square bins to form, in µm: bin ``(⌊x/s⌋, ⌊y/s⌋)`` of each section takes
        every input bin whose centre lies in it. Give this or ``by``.
    by
        ``obs`` column of group labels (e.g. a cell id per bin); bins with a missing label are
        left out. Give this or ``bin_size_um``.
    spatial_key
        ``obsm`` key of the coordinates.
    layer
        Layer of raw counts (``None``: ``X``).
    library_key
        ``obs`` column of section labels: bins of different sections are never summed together.
    microns_per_unit
        µm per unit of ``obsm[spatial_key]`` (1 if it holds µm). ``None``: the
        ``microns_per_pixel`` of ``uns["spatial"][library_id]["scalefactors"]`` (written by
        :func:`spotlens.io.read_spatial` for Visium HD). Only used with ``bin_size_um``.

    Returns
    -------
    A new ``n_groups × n_genes`` AnnData (the input is not changed) with

    - ``X``: CSR float64 summed counts,
    - ``obsm[spatial_key]``: the mean centre of each group's bins (input units),
    - ``obs["n_bins"]``: bins summed; ``obs[library_key]`` and ``obs[by]`` where given,
    - ``var``: as the input's; ``uns["spatial"]``: the input's (images, scale factors),
    - ``uns["aggregate_bins"]``: ``"params"`` (the arguments, and ``microns_per_unit``) and
      ``"bin_group"``: ``n_bins`` int64, the output row of each input bin (-1: left out).

    Raises
    ------
    InputError
        Neither or both of ``bin_size_um`` and ``by``; a missing ``obs`` column, layer or
        coordinates; counts that are not raw (negative, non-integer); missing section labels;
        ``bin_size_um`` or ``microns_per_unit`` not > 0; an unknown coordinate unit; every bin
        left out.

    Examples
    --------
    >>> import spotlens
    >>> hd, _ = spotlens.datasets.synthetic(n_spots=400, n_genes=50, grid="square",
    ...                                     spacing_um=8.0)
    >>> big = spotlens.pp.aggregate_bins(hd, bin_size_um=16.0, microns_per_unit=1.0)
    >>> int(big.obs["n_bins"].sum()) == hd.n_obs, bool(big.X.sum() == hd.X.sum())
    (True, True)
    """
    import scanpy as sc

    if (bin_size_um is None) == (by is None):
        raise InputError("Pass exactly one of bin_size_um= (square bins of that side, µm) and "
                         "by= (an obs column of group labels, e.g. segmented cell ids).")
    for column in (by, library_key):
        if column is not None and column not in adata.obs.columns:
            raise InputError(f"adata.obs has no column {column!r}; pass the name of an obs "
                             "column.")
    if library_key is not None and adata.obs[library_key].isna().any():
        raise InputError(f"obs[{library_key!r}] has missing section labels; every bin needs "
                         "its section.")
    counts = get_matrix(adata, layer, what="spatial data")
    check_counts(counts[: min(adata.n_obs, _HEAD_BINS)], what="spatial counts")
    coords = check_coordinates(adata, spatial_key)
    params = {"bin_size_um": bin_size_um, "by": by, "spatial_key": spatial_key, "layer": layer,
              "library_key": library_key, "microns_per_unit": None}
    parts = []
    if library_key is not None:
        parts.append(adata.obs[library_key].astype(str).to_numpy())
    if by is not None:
        labels = adata.obs[by]
        keep = labels.notna().to_numpy()
        parts.append(labels.astype(str).to_numpy())
    else:
        size = check_number("bin_size_um", bin_size_um, above=0)
        unit = _microns_per_unit(adata, microns_per_unit)
        params["microns_per_unit"] = unit
        cell = np.floor(coords * unit / size).astype(np.int64)
        keep = np.ones(adata.n_obs, dtype=bool)
        parts.append(np.char.add(np.char.add(cell[:, 0].astype(str), "_"),
                                 cell[:, 1].astype(str)))
    if not keep.any():
        raise InputError(f"Every bin has a missing label in obs[{by!r}]; nothing to aggregate.")
    key = parts[0] if len(parts) == 1 else np.char.add(np.char.add(parts[0], "|"), parts[1])
    group, names = pd.factorize(pd.Series(key).where(keep))
    light = AnnData(sparse.csr_matrix(counts) if sparse.issparse(counts) else np.asarray(counts),
                    obs=pd.DataFrame({"group": pd.Categorical.from_codes(
                        group, categories=names)},
                                     index=pd.RangeIndex(adata.n_obs).astype(str)))
    light = light[keep]
    summed = sc.get.aggregate(light, by="group", func="sum")
    order = summed.obs_names.get_indexer(names)  # rows of `summed` in the order of `names`
    x = sparse.csr_matrix(summed.layers["sum"], dtype=np.float64)[order]
    n_bins = np.bincount(group[keep], minlength=len(names))
    centre = np.stack([np.bincount(group[keep], weights=coords[keep, d], minlength=len(names))
                       for d in range(2)], axis=1) / n_bins[:, None]
    obs = pd.DataFrame({N_BINS_KEY: n_bins}, index=pd.Index(np.asarray(names, dtype=str)))
    first = pd.Series(np.arange(adata.n_obs)[keep]).groupby(group[keep]).first().to_numpy()
    for column in (library_key, by):
        if column is not None:
            obs[column] = adata.obs[column].to_numpy()[first]
    out = AnnData(x, obs=obs, var=adata.var.copy())
    out.obsm[spatial_key] = centre
    if SPATIAL_UNS_KEY in adata.uns:  # a copy: the result never shares the input's objects
        out.uns[SPATIAL_UNS_KEY] = copy.deepcopy(adata.uns[SPATIAL_UNS_KEY])
    out.uns[AGGREGATE_BINS_KEY] = {"params": {k: v for k, v in params.items() if v is not None},
                              "bin_group": np.where(keep, group, -1).astype(np.int64)}
    return out

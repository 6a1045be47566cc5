"""The bundled real example: osmFISH mouse somatosensory cortex pseudo-spots with ground truth."""

from __future__ import annotations

from importlib import resources

import anndata as ad
import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import (
    CELL_TYPE_COARSE_KEY,
    CELL_TYPE_FINE_KEY,
    CELL_TYPE_KEY,
    TRUE_CELL_COUNTS_KEY,
    TRUE_PROPORTIONS_KEY,
)

SPATIAL_FILE = "osmfish_cortex_spatial.h5ad"
REFERENCE_FILE = "osmfish_cortex_reference.h5ad"

# the file's layout: integer counts under these obsm keys, type names under these uns keys
TRUE_COUNTS = TRUE_CELL_COUNTS_KEY
TRUE_COUNTS_FINE = f"{TRUE_CELL_COUNTS_KEY}_fine"
TYPES = "true_cell_types"
TYPES_FINE = "true_cell_types_fine"


def _read(name: str) -> AnnData:
    """Read one bundled h5ad file into memory (a fresh object on every call)."""
    with resources.as_file(resources.files(__package__) / "data" / name) as path:
        return ad.read_h5ad(path)


def _truth_frames(spatial: AnnData, *, fine: bool) -> None:
    """Turn the stored integer cell counts into the documented truth DataFrames (in place).

    The file holds ``obsm[TRUE_COUNTS*]`` as ``n_spots × n_types`` integer arrays and the type
    names in ``uns``; proportions are derived as counts / row sum, so they are exact.
    """
    frames = {}
    for suffix, counts_key, types_key in (
        ("", TRUE_COUNTS, TYPES), ("_fine", TRUE_COUNTS_FINE, TYPES_FINE)
    ):
        counts = pd.DataFrame(
            np.asarray(spatial.obsm[counts_key], dtype=np.int64),
            index=spatial.obs_names.copy(),
            columns=pd.Index(np.asarray(spatial.uns.pop(types_key), dtype=str)),
        )
        frames[f"{TRUE_CELL_COUNTS_KEY}{suffix}"] = counts
        frames[f"{TRUE_PROPORTIONS_KEY}{suffix}"] = counts.div(counts.sum(axis=1), axis=0)
    if fine:
        for key in (TRUE_PROPORTIONS_KEY, TRUE_CELL_COUNTS_KEY):
            frames[f"{key}_coarse"] = frames[key]
            frames[key] = frames[f"{key}_fine"]
    for key, frame in frames.items():
        spatial.obsm[key] = frame


def osmfish_cortex(*, fine: bool = False) -> tuple[AnnData, AnnData]:
    """Mouse somatosensory cortex (osmFISH) as 50 µm pseudo-spots with known cell-type proportions.

    Real single-cell-resolution data (Codeluppi et al. 2018) binned into 50 µm × 50 µm squares:
    each non-empty bin is one pseudo-spot whose counts are the sum of its cells' molecule
    counts, so the true cell-type composition of every spot is known. The reference is the same
    4,839 labelled cells (optimistic; see :func:`osmfish_heldout` for a held-out split). Only
    33 genes (a targeted smFISH panel), about 160 molecules per cell. Provenance and licence are
    in ``spotlens/datasets/data/README.md``.

    Both objects are read from the package on every call, so they are independent copies.

    Parameters
    ----------
    fine
        Use the 31 published clusters instead of the 11 coarse types: the reference's
        ``obs["cell_type"]`` and the spatial ``obsm["true_proportions"]`` and
        ``obsm["true_cell_counts"]`` then hold the fine clusters, and the coarse ones move to
        ``obs["cell_type_coarse"]``, ``obsm["true_proportions_coarse"]`` and
        ``obsm["true_cell_counts_coarse"]``.

    Returns
    -------
    spatial
        ``1,036 spots × 33 genes`` AnnData. ``X``: CSR float32 integer molecule counts.
        ``obsm["spatial"]``: ``n_spots × 2`` bin centres in µm (x 25–1575, y 25–3125).
        ``obs``: ``n_cells`` (cells in the bin, 1–17), ``half`` (``"left"``/``"right"``,
        split at the median x), ``dominant_region`` (published anatomical region), ``nUMI``.
        Ground truth as DataFrames indexed by ``obs_names``: ``obsm["true_proportions"]``
        (``n_spots × 11`` fraction of the spot's cells of each type, rows sum to 1),
        ``obsm["true_cell_counts"]`` (``n_spots × 11`` cells per type, integers),
        ``obsm["true_proportions_fine"]`` and ``obsm["true_cell_counts_fine"]``
        (``n_spots × 31``, the published clusters).
    reference
        ``4,839 cells × 33 genes`` AnnData. ``X``: CSR float32 integer molecule counts.
        ``obs``: ``cell_type`` (11 coarse types), ``cell_type_fine`` (31 clusters), ``region``,
        ``spot`` (the pseudo-spot the cell belongs to), ``half``, ``sample``.
        ``obsm["spatial"]``: cell centroids in µm.

    References
    ----------
    Codeluppi et al., "Spatial organization of the somatosensory cortex revealed by osmFISH",
    Nat Methods 15, 932–935 (2018), doi:10.1038/s41592-018-0175-z. Data via
    ``drieslab/spatial-datasets`` (MIT licence, © 2019 Ruben Dries).

    Notes
    -----
    The coarse type "Microglia/Macrophage" is named "Microglia-Macrophage" here: cell-type names
    become HDF5 keys when results are written to h5ad, and anndata refuses "/" in them.

    Examples
    --------
    >>> import spotlens
    >>> spatial, reference = spotlens.datasets.osmfish_cortex()
    >>> spatial.shape, reference.shape
    ((1036, 33), (4839, 33))
    >>> spatial.obsm["true_proportions"].shape
    (1036, 11)
    """
    spatial = _read(SPATIAL_FILE)
    reference = _read(REFERENCE_FILE)
    _truth_frames(spatial, fine=fine)
    _writable_names(spatial, reference)
    if fine:
        reference.obs[CELL_TYPE_COARSE_KEY] = reference.obs[CELL_TYPE_KEY]
        reference.obs[CELL_TYPE_KEY] = reference.obs[CELL_TYPE_FINE_KEY]
    return spatial, reference


def _writable_names(spatial: AnnData, reference: AnnData) -> None:
    """Replace '/' in cell-type names by '-' ("Microglia/Macrophage" -> "Microglia-Macrophage").

    Names become HDF5 keys when results are written to h5ad, and anndata refuses '/' there.
    """
    for column in (CELL_TYPE_KEY, CELL_TYPE_FINE_KEY):
        if column in reference.obs:
            labels = reference.obs[column].astype(str).str.replace("/", "-", regex=False)
            reference.obs[column] = labels.astype("category")
    for key, frame in list(spatial.obsm.items()):
        if key.startswith("true_") and isinstance(frame, pd.DataFrame):
            spatial.obsm[key] = frame.rename(columns=lambda c: str(c).replace("/", "-"))


def osmfish_heldout(*, fine: bool = False) -> tuple[AnnData, AnnData]:
    """Held-out split of :func:`osmfish_cortex`: right-half spots, left-half reference cells.

    The section is split at the median bin-centre x. The reference holds only cells of the left
    half, the spots only the right half, so no spot is made of reference cells. This is the
    harder, fairer test.

    Parameters
    ----------
    fine
        As in :func:`osmfish_cortex`.

    Returns
    -------
    spatial
        ``519 spots × 33 genes`` (``obs["half"] == "right"``), with the same keys and ground
        truth as :func:`osmfish_cortex`.
    reference
        ``2,538 cells × 33 genes`` (``obs["half"] == "left"``).

    Examples
    --------
    >>> import spotlens
    >>> spatial, reference = spotlens.datasets.osmfish_heldout()
    >>> spatial.shape, reference.shape
    ((519, 33), (2538, 33))
    >>> set(spatial.obs["half"]), set(reference.obs["half"])
    ({'right'}, {'left'})
    """
    spatial, reference = osmfish_cortex(fine=fine)
    spatial = spatial[(spatial.obs["half"] == "right").to_numpy()].copy()
    reference = reference[(reference.obs["half"] == "left").to_numpy()].copy()
    for adata in (spatial, reference):
        adata.obs = adata.obs.apply(
            lambda col: col.cat.remove_unused_categories() if col.dtype == "category" else col
        )
    return spatial, reference

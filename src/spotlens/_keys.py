"""The one place where AnnData key names are built.

Every key the package writes comes from a builder or constant here, so a name is changed in one
place and the documentation can point at one list. Inputs named by the user (``spatial_key``,
``labels_key``, ``key_added``, ...) default to these names.

- Deconvolution (:func:`spotlens.deconv.deconvolve` with ``key_added=K``): ``obsm[K]``
  proportions, ``obsm[abundance_key(K)]``, ``obs[zero_counts_key(K)]``,
  ``obs[fit_score_key(K)]``, ``obs[poorly_fit_key(K)]``, ``obsp[connectivities_key(K)]``,
  ``uns[K]``.
- Cell level (:func:`spotlens.deconv.cell_level` with ``key_added=C``): ``obsm[C]``,
  ``obsm[cell_counts_key(C)]``, ``uns[C]``; placed cells (:func:`~spotlens.deconv.assign_cells`)
  carry ``obsm[SPATIAL_KEY]`` and ``uns[SPOT_DIAMETER_KEY]``.
- Readers: ``obsm[SPATIAL_KEY]`` and ``uns[SPATIAL_UNS_KEY][library_id]``; from Space Ranger
  outputs also ``obs[IN_TISSUE_KEY]``, ``obs[ARRAY_ROW_KEY]`` and ``obs[ARRAY_COL_KEY]``.
- Plotting: ``uns[colors_key(key)]`` (scanpy's palette convention).
- Histology: ``obsm[features_key(encoder)]``, ``obsm[HISTOLOGY_PREDICTION_KEY]`` and
  ``uns[HISTOLOGY_PREDICTION_KEY]``, ``obsm[prediction_std_key(K)]`` (the prediction's
  uncertainty; a layer of that name in :func:`~spotlens.histology.predict_image`'s AnnData),
  ``obs[SECTION_KEY]``.
- Summed bins (:func:`spotlens.pp.aggregate_bins`): a new AnnData with ``obs[N_BINS_KEY]``
  and ``uns[AGGREGATE_BINS_KEY]``.
- Nuclei (:func:`spotlens.histology.segment_nuclei`): a new AnnData with ``obsm[SPATIAL_KEY]``,
  ``obs[NUCLEUS_SPOT_KEY]`` and ``uns[NUCLEI_KEY]``; :func:`~spotlens.histology.count_nuclei`
  writes ``obs[N_NUCLEI_KEY]`` of the spots.
- Example data with ground truth (:mod:`spotlens.datasets`): the ``TRUE_*``, ``CELL_TYPE_*``
  and ``PSEUDO_SPOTS_*`` names below, ``obs[N_CELLS_KEY]``, and ``obs[DOMAIN_KEY]``
  (:func:`~spotlens.datasets.synthetic`) or ``obs[REGION_KEY]``
  (:func:`~spotlens.datasets.pseudo_spots`).
"""

from __future__ import annotations

import re

DEFAULT_METHOD = "spotlens"
#: ``obsm`` key of spot (or cell) coordinates, ``n_obs × 2`` (the default ``spatial_key``).
SPATIAL_KEY = "spatial"
#: ``uns`` key of the per-library images and scale factors: ``uns["spatial"][library_id]``.
SPATIAL_UNS_KEY = "spatial"
#: squidpy's ``obsp`` key of a spatial graph.
CONNECTIVITIES_KEY = "spatial_connectivities"
#: ``uns`` key of the footprint diameter of the spots that placed cells came from.
SPOT_DIAMETER_KEY = "spot_diameter"
#: ``obs`` column naming the section of each spot when sections are joined.
SECTION_KEY = "section"
#: ``uns`` key of the parameters of a histology expression prediction.
HISTOLOGY_PREDICTION_KEY = "histology_prediction"
#: ``uns`` key of a nucleus segmentation's parameters (and label image) in its nuclei AnnData.
NUCLEI_KEY = "nuclei"
#: ``obs`` column of a nuclei AnnData naming the spot each nucleus falls in (NA outside).
NUCLEUS_SPOT_KEY = "spot"
#: ``obs`` key of the number of segmented nuclei in each spot.
N_NUCLEI_KEY = "n_nuclei"
#: ``obs`` columns of a Space Ranger read (:func:`spotlens.io.read_spatial`): whether the spot
#: lies under tissue (0/1), and its row and column on the spot (or Visium HD bin) grid.
IN_TISSUE_KEY = "in_tissue"
ARRAY_ROW_KEY = "array_row"
ARRAY_COL_KEY = "array_col"
#: ``uns`` key of :func:`spotlens.pp.aggregate_bins`' parameters and bin map in its result, and
#: the ``obs`` column of the input bins each output row sums.
AGGREGATE_BINS_KEY = "aggregate_bins"
N_BINS_KEY = "n_bins"

# ground truth written by the synthetic factories and the bundled example
#: ``obsm``: true proportions (``n_spots × n_types``) of :func:`spotlens.datasets.synthetic`
#: and the bundled osmFISH example.
TRUE_PROPORTIONS_KEY = "true_proportions"
#: ``obsm``: true cells per spot and type.
TRUE_CELL_COUNTS_KEY = "true_cell_counts"
#: ``varm``: the profiles the synthetic counts were drawn from.
TRUE_PROFILES_KEY = "true_profiles"
#: ``uns``: the settings of :func:`spotlens.datasets.synthetic`.
SYNTHETIC_KEY = "synthetic"
#: ``obs`` columns of the bundled osmFISH reference (:func:`spotlens.datasets.osmfish_cortex`):
#: its cell types (the default ``labels_key``), the fine types, and with ``fine=True`` the coarse
#: types kept beside the fine ones.
CELL_TYPE_KEY = "cell_type"
CELL_TYPE_FINE_KEY = "cell_type_fine"
CELL_TYPE_COARSE_KEY = "cell_type_coarse"
#: ``obsm`` / ``var`` / ``uns`` keys of :func:`spotlens.datasets.pseudo_spots` (its own names).
PSEUDO_SPOTS_PROPORTIONS_KEY = "proportions_true"
PSEUDO_SPOTS_CELL_COUNTS_KEY = "cell_counts_true"
PSEUDO_SPOTS_PLATFORM_KEY = "platform_effect_true"
PSEUDO_SPOTS_KEY = "pseudo_spots"
#: ``obs`` column of the true number of cells in each simulated spot (``synthetic``,
#: ``pseudo_spots``; the default ``n_cells_key`` of :func:`spotlens.metrics.member_recall`).
N_CELLS_KEY = "n_cells"
#: ``obs`` column of each spot's dominant domain in :func:`spotlens.datasets.synthetic`.
DOMAIN_KEY = "domain"
#: ``obs`` column of each spot's region in :func:`spotlens.datasets.pseudo_spots`.
REGION_KEY = "region"


def proportions_key(method: str = DEFAULT_METHOD) -> str:
    """Return ``obsm`` key of cell-type proportions (rows sum to 1)."""
    return f"proportions_{method}"


def abundance_key(key_added: str) -> str:
    """Return ``obsm`` key of estimated cells per spot and type (from the proportions key)."""
    if key_added.startswith("proportions_"):
        return "abundance_" + key_added[len("proportions_") :]
    return f"{key_added}_abundance"


def zero_counts_key(key_added: str) -> str:
    """Return ``obs`` key flagging spots that had no counts over the genes used."""
    return f"{key_added}_zero_counts"


def fit_score_key(key_added: str) -> str:
    """Return ``obs`` key of each spot's goodness-of-fit score (1 = a typical spot)."""
    return f"{key_added}_fit_score"


def poorly_fit_key(key_added: str) -> str:
    """Return ``obs`` key flagging spots far outside what the reference explains."""
    return f"{key_added}_poorly_fit"


def connectivities_key(key_added: str) -> str:
    """Return ``obsp`` key of the spatial graph a deconvolution used (squidpy's suffix)."""
    return f"{key_added}_connectivities"


def cell_weights_key(method: str = DEFAULT_METHOD) -> str:
    """Return ``obsm`` key of the cell-level weights (spots × reference cells or metacells)."""
    return f"cell_weights_{method}"


def cell_counts_key(key_added: str) -> str:
    """Return ``obsm`` key of the estimated cells per type, derived from the cell-weights key."""
    return key_added.replace("cell_weights", "cell_counts", 1) if "cell_weights" in key_added \
        else f"{key_added}_cell_counts"


def colors_key(key: str) -> str:
    """Return the ``uns`` key of the colours of ``obs[key]`` or ``obsm[key]`` (scanpy's)."""
    return f"{key}_colors"


def prediction_std_key(key_added: str = HISTOLOGY_PREDICTION_KEY) -> str:
    """Return the key of the per-spot, per-gene uncertainty (s.d.) of a histology prediction.

    Examples
    --------
    >>> prediction_std_key("histology_prediction")
    'histology_prediction_std'
    """
    return f"{key_added}_std"


def features_key(encoder: str) -> str:
    """Return ``obsm`` key of image features from ``encoder`` (squidpy's ``X_<name>``).

    Examples
    --------
    >>> features_key("efficientnet-lite0")
    'X_efficientnet-lite0'
    """
    return f"X_{encoder}"


#: ``uns`` key of the table that :func:`spotlens.io.write_h5ad` writes when it stores names
#: under :func:`storage_name` (columns ``where``, ``stored``, ``name``), so readers restore them.
STORED_NAMES_KEY = "spotlens_stored_names"

_STORED_ESCAPE = re.compile("%(25|2F)")


def storage_name(name: str) -> str:
    """Return ``name`` as an h5ad file can hold it as a key: ``/`` → ``%2F``, ``%`` → ``%25``.

    anndata stores ``obsm``/``uns`` keys and DataFrame column names as HDF5 names, where ``/``
    separates groups (anndata's next release refuses it). This percent-encoding is reversible
    (:func:`name_from_storage`) and leaves names without ``/`` or ``%`` unchanged. Only storage
    uses it: labels in memory, tables and plots keep the user's names (``"T/NK"``).

    Examples
    --------
    >>> storage_name("Microglia/Macrophage")
    'Microglia%2FMacrophage'
    >>> name_from_storage(storage_name("CD4+/CD8- 5%"))
    'CD4+/CD8- 5%'
    """
    return name.replace("%", "%25").replace("/", "%2F")


def name_from_storage(stored: str) -> str:
    """Return the name that :func:`storage_name` encoded as ``stored``."""
    return _STORED_ESCAPE.sub(lambda m: "%" if m.group(1) == "25" else "/", stored)

"""Loaders for the real spatial/reference pairs of the shared data folder (not bundled)."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
from anndata import AnnData

from .._validation import InputError

DATA_ENV = "SPOTLENS_DATA"

#: The loadable pairs: name -> one-line description.
PAIRS: dict[str, str] = {
    "spacexr_cerebellum_slideseq": (
        "mouse cerebellum, Slide-seq: 100 beads × 378 genes; snRNA-seq reference 475 cells × "
        "384 genes, 19 types (378 shared genes)"
    ),
    "spacexr_hippocampus_visium": (
        "mouse hippocampus, Visium: 313 spots × 276 genes; scRNA-seq reference 510 cells × "
        "307 genes, 17 types (124 shared genes)"
    ),
    "spacexr_lymphnode_visium": (
        "human lymph node, Visium: 1,000 spots × 2,000 genes; scRNA-seq reference 330 cells × "
        "10,237 genes, 11 types (558 shared genes)"
    ),
}

_SPATIAL = "spatial.h5ad"
_REFERENCE = "sc_reference.h5ad"


def _candidate_dirs() -> list[Path]:
    """Where the shared data folder is looked for, in order (only ``$SPOTLENS_DATA`` if set)."""
    if os.environ.get(DATA_ENV):
        return [Path(os.environ[DATA_ENV])]
    # a source checkout: <root>/src/spotlens/datasets/_pairs.py, data in <root>/../shared/data
    root = Path(__file__).resolve().parents[3]
    return [root.parent / "shared" / "data", root / "shared" / "data"]


def default_data_dir() -> Path | None:
    """Locate the shared data folder: ``$SPOTLENS_DATA`` if set, else ``shared/data`` nearby.

    Returns
    -------
    The first candidate folder that exists, or ``None``.
    """
    for path in _candidate_dirs():
        if path.is_dir():
            return path
    return None


def load_pair(name: str, data_dir: str | os.PathLike | None = None) -> tuple[AnnData, AnnData]:
    """Load a real spatial dataset and its single-cell reference from the shared data folder.

    These pairs are not shipped with the package (their licence is GPL-3.0 and they are larger);
    the folder must be present locally. None of them has ground-truth proportions; for that use
    :func:`osmfish_cortex` or :func:`synthetic`. Gene sets differ between the two objects:
    :func:`spotlens.deconv.deconvolve` intersects them.

    Parameters
    ----------
    name
        One of

        - ``"spacexr_cerebellum_slideseq"``: mouse cerebellum Slide-seq, 100 beads; snRNA-seq
          reference 475 cells, 19 types; 378 shared genes.
        - ``"spacexr_hippocampus_visium"``: mouse hippocampus Visium, 313 spots; reference 510
          cells, 17 types; 124 shared genes.
        - ``"spacexr_lymphnode_visium"``: human lymph node Visium, 1,000 spots; reference 330
          cells, 11 types; 558 shared genes.

        Sources and licences are in each folder's ``README.md`` (Cable et al., Nat Biotechnol
        2022, doi:10.1038/s41587-021-00830-w; Cable et al., Nat Methods 2022,
        doi:10.1038/s41592-022-01575-3).
    data_dir
        Folder holding ``<name>/spatial.h5ad`` and ``<name>/sc_reference.h5ad``. ``None`` uses
        the environment variable ``SPOTLENS_DATA`` if set, else ``shared/data`` next to (or
        inside) the source checkout.

    Returns
    -------
    spatial
        ``n_spots × n_genes`` AnnData: raw UMI counts in ``X`` (CSR), ``obsm["spatial"]``
        coordinates as shipped (unit not stated by the source; most likely pixels).
    reference
        ``n_cells × n_genes`` AnnData: raw UMI counts in ``X``, ``obs["cell_type"]``.

    Both are read from disk on every call (independent copies).

    Raises
    ------
    InputError
        ``name`` is not one of the pairs above, or the data folder or its files are missing.

    Examples
    --------
    >>> import spotlens
    >>> spatial, reference = spotlens.datasets.load_pair("spacexr_cerebellum_slideseq")
    >>> spatial.n_obs, reference.obs["cell_type"].nunique()
    (100, 19)
    """
    if name not in PAIRS:
        hint = (
            " The osmFISH example is bundled: use spotlens.datasets.osmfish_cortex()."
            if "osmfish" in str(name) else ""
        )
        raise InputError(
            f"Unknown dataset {name!r}; choose one of {sorted(PAIRS)}.{hint}"
        )
    if data_dir is None:
        base = default_data_dir()
        if base is None:
            tried = ", ".join(str(p) for p in _candidate_dirs())
            raise InputError(
                f"Cannot find the shared data folder (looked in: {tried}). These datasets are "
                f"not bundled: set the environment variable {DATA_ENV} to the folder that holds "
                f"{name}/, or pass data_dir=."
            )
    else:
        base = Path(data_dir)
    folder = base / name
    missing = [f for f in (_SPATIAL, _REFERENCE) if not (folder / f).is_file()]
    if missing:
        raise InputError(
            f"{folder} lacks {', '.join(missing)}. Pass data_dir= (or set {DATA_ENV}) to the "
            f"folder that holds {name}/{_SPATIAL} and {name}/{_REFERENCE}."
        )
    return ad.read_h5ad(folder / _SPATIAL), ad.read_h5ad(folder / _REFERENCE)

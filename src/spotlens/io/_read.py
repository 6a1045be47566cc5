"""Readers: ``.h5ad`` files and 10x Space Ranger ``outs/`` folders (Visium and Visium HD).

No analysis here.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import ARRAY_COL_KEY, ARRAY_ROW_KEY, IN_TISSUE_KEY, SPATIAL_UNS_KEY
from .._validation import InputError, check_coordinates, check_labels, check_number
from ._names import restore_names
from ._spatialdata import is_spatialdata, read_spatialdata

logger = logging.getLogger("spotlens")

COUNT_FILE = "filtered_feature_bc_matrix.h5"
#: Spot positions, newest Space Ranger layout first (``_list.csv`` is Space Ranger < 2.0).
POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv", "tissue_positions.parquet")
SCALEFACTORS_FILE = "scalefactors_json.json"
#: The ``obs`` columns copied from the positions file, in its order.
GRID_COLUMNS = (IN_TISSUE_KEY, ARRAY_ROW_KEY, ARRAY_COL_KEY)
POSITION_COLUMNS = (*GRID_COLUMNS, "pxl_row_in_fullres", "pxl_col_in_fullres")
#: Visium HD: ``outs/binned_outputs/square_<NNN>um/`` per bin size, positions in parquet.
BINNED_FOLDER = "binned_outputs"
HD_POSITIONS_FILE = "tissue_positions.parquet"
HD_DEFAULT_BIN_UM = 8  # Space Ranger's recommended bin size for analysis
_BIN_FOLDER = re.compile(r"^square_(\d+)um$")


def read_spatial(
    path: str | PathLike,
    *,
    spatial_key: str = "spatial",
    count_file: str = COUNT_FILE,
    library_id: str | None = None,
    load_images: bool = True,
    bin_size: int | None = None,
) -> AnnData:
    """Read spatial transcriptomics data: ``.h5ad``, Space Ranger ``outs/`` or SpatialData.

    Visium HD outputs are read at one bin size from ``outs/binned_outputs/square_<NNN>um/``
    (``filtered_feature_bc_matrix.h5`` and ``spatial/tissue_positions.parquet``), through
    :func:`scanpy.read_10x_h5` and :func:`pandas.read_parquet` (pyarrow).

    Counts are kept raw (no normalisation). Repeated gene names (10x matrices repeat a few
    symbols) are made unique by appending ``-1``, ``-2``, ...
    (:meth:`anndata.AnnData.var_names_make_unique`) with a logged warning that names them: the
    first copy keeps the name, the renamed copies match only a dataset with the same names.
    :func:`spotlens.deconv.deconvolve` itself refuses repeated gene names. Names holding ``/``
    that :func:`spotlens.io.write_h5ad` stored encoded are restored.

    Parameters
    ----------
    path
        An ``.h5ad`` file with raw counts in ``X`` and coordinates in ``obsm[spatial_key]``, or
        the ``outs/`` folder written by ``spaceranger count`` (its parent folder works too). The
        folder must hold ``count_file`` and ``spatial/tissue_positions.csv`` (Space Ranger ≥ 2.0;
        ``tissue_positions_list.csv`` of older versions and ``tissue_positions.parquet`` are read
        as well). For Visium HD pass the ``outs/`` folder (or its parent, or
        ``outs/binned_outputs/``) with ``bin_size``, or one bin folder such as
        ``outs/binned_outputs/square_008um/``, which must hold ``count_file`` and
        ``spatial/tissue_positions.parquet`` (scale factors and images are taken from its
        ``spatial/`` folder, else from ``outs/spatial/``). A SpatialData ``.zarr`` store or
        object is read by :func:`read_spatialdata` (``bin_size`` picks its HD table).
    spatial_key
        ``obsm`` key that holds (``.h5ad``) or receives (Space Ranger) the coordinates.
    count_file
        Count matrix inside the ``outs/`` folder, e.g. ``"raw_feature_bc_matrix.h5"`` to keep
        spots outside the tissue.
    library_id
        Key under ``uns["spatial"]`` for a Space Ranger folder; ``None`` takes the library id
        stored in the count matrix, or else the folder name.
    load_images
        Load ``spatial/tissue_{hires,lowres}_image.png`` when present (Space Ranger only).
    bin_size
        Visium HD bin side in µm (2, 8, 16, ... as in ``square_008um``). ``None`` takes the
        given bin folder, else 8 µm when present (Space Ranger's recommended bin), else the only
        bin size there is. Only for Visium HD outputs.

    Returns
    -------
    ``n_spots × n_genes`` AnnData. For a Space Ranger folder it holds

    - ``X``: raw UMI counts (sparse CSR, float32), gene symbols as ``var_names``,
      ``var["gene_ids"]``, ``var["feature_types"]`` (gene expression only),
    - ``obsm[spatial_key]``: ``n_spots × 2`` float64 coordinates ``(x, y)`` in full-resolution
      image pixels (``x`` = column, ``y`` = row),
    - ``obs["in_tissue"]``, ``obs["array_row"]``, ``obs["array_col"]``,
    - ``uns["spatial"][library_id]``: ``"scalefactors"`` (the JSON file: pixel scale factors of
      the images, spot diameter in full-resolution pixels), ``"metadata"`` and ``"images"``
      (``"hires"``/``"lowres"`` as float arrays), the layout scanpy and squidpy plot from.

    For Visium HD each observation is one square bin (``obs_names`` such as
    ``s_008um_00301_00404-1``), ``obsm[spatial_key]`` is the bin centre in full-resolution
    pixels, ``obs["array_row"]``/``obs["array_col"]`` index the bin grid, and the scale factors
    always hold ``"bin_size_um"`` (bin side, µm), ``"microns_per_pixel"`` (µm per
    full-resolution pixel; ``bin_size_um / spot_diameter_fullres`` when the file lacks it) and
    ``"spot_diameter_fullres"`` (bin side, full-resolution pixels). ``library_id`` defaults to
    the one in the count matrix, else the sample folder holding ``outs/``.

    Raises
    ------
    InputError
        ``path`` does not exist; a folder is not a Space Ranger ``outs/`` folder (the message
        names the file expected); positions are missing for some barcodes; the file is not a
        readable ``.h5ad``; an ``.h5ad`` file has no valid ``obsm[spatial_key]``; the suffix is
        not supported; ``bin_size`` is given for data that are not Visium HD binned outputs,
        is not a positive integer, or has no ``square_<NNN>um`` folder (the message lists the
        bin sizes there are); an HD bin folder lacks its count matrix or
        ``spatial/tissue_positions.parquet``; its scale factors disagree with the folder's bin
        size.

    Examples
    --------
    >>> import spotlens
    >>> st = spotlens.io.read_spatial("sample/outs")  # doctest: +SKIP
    >>> st.obsm["spatial"][:2]  # doctest: +SKIP
    array([[ 8468., 2281.],
           [ 2807., 8154.]])
    >>> hd = spotlens.io.read_spatial("hd_sample/outs", bin_size=8)  # doctest: +SKIP
    >>> hd.uns["spatial"]["hd_sample"]["scalefactors"]["bin_size_um"]  # doctest: +SKIP
    8.0
    """
    bin_size = _check_bin_size(bin_size)
    if is_spatialdata(path):
        return read_spatialdata(path, spatial_key=spatial_key, library_id=library_id,
                                load_images=load_images, bin_size=bin_size)
    path = _existing(path, what="spatial data")
    hd_folder = _visium_hd_folder(path, bin_size) if path.is_dir() else None
    if hd_folder is not None:
        adata = _read_visium_hd(
            *hd_folder, count_file=count_file, spatial_key=spatial_key, library_id=library_id,
            load_images=load_images,
        )
    elif bin_size is not None:
        raise InputError(
            f"bin_size={bin_size} applies to Visium HD binned outputs, but {path} is not one "
            f"(no {BINNED_FOLDER}/square_<NNN>um/ folder). Pass the outs/ folder of a Visium HD "
            "run, or leave bin_size=None."
        )
    elif path.is_dir():
        adata = _read_spaceranger(
            _outs_folder(path, count_file), count_file=count_file, spatial_key=spatial_key,
            library_id=library_id, load_images=load_images,
        )
    elif path.suffix == ".h5ad":
        adata = _read_h5ad(path, what="spatial data")
        check_coordinates(adata, spatial_key)
    elif path.suffix == ".h5":
        raise InputError(
            f"{path} is a 10x count matrix without coordinates. Pass the Space Ranger outs/ "
            f"folder that holds it ({path.parent}); the coordinates are in outs/spatial/."
        )
    else:
        raise InputError(
            f"Cannot read spatial data from {path}: expected an .h5ad file or a Space Ranger "
            "outs/ folder."
        )
    _make_var_names_unique(adata, path)
    return adata


def read_reference(path: str | PathLike, *, labels_key: str | None = None) -> AnnData:
    """Read a single-cell reference from an ``.h5ad`` file.

    Parameters
    ----------
    path
        ``.h5ad`` file: ``n_cells × n_genes`` raw counts in ``X`` (or a layer), cell types in
        ``obs[labels_key]``.
    labels_key
        If given, check now that ``obs[labels_key]`` holds at least two cell types and no
        missing labels, so a typo fails before any computation.

    Returns
    -------
    ``n_cells × n_genes`` AnnData as stored, with repeated gene names made unique (NAME-1,
    NAME-2, ..., with a logged warning naming them; the first copy keeps the name) and names
    holding ``/`` that :func:`spotlens.io.write_h5ad` stored encoded restored.

    Raises
    ------
    InputError
        ``path`` does not exist, is not an ``.h5ad`` file or cannot be read; ``labels_key`` is
        given and missing, has missing labels (NaN, or text such as ``"nan"``, ``"None"``,
        ``""``) or a single cell type.

    Examples
    --------
    >>> ref = spotlens.io.read_reference("ref.h5ad", labels_key="cell_type")  # doctest: +SKIP
    """
    path = _existing(path, what="reference")
    if path.is_dir() or path.suffix != ".h5ad":
        raise InputError(
            f"Cannot read the reference from {path}: expected an .h5ad file with raw counts and "
            "cell-type labels in obs."
        )
    adata = _read_h5ad(path, what="reference")
    if labels_key is not None:
        check_labels(adata, labels_key, min_cells_per_type=1)
    _make_var_names_unique(adata, path)
    return adata


def _existing(path: str | PathLike, *, what: str) -> Path:
    if not isinstance(path, (str, PathLike)):
        raise InputError(f"The {what} path must be a string or a Path, got {type(path).__name__}.")
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"The {what} path {path} does not exist.")
    return path


def _read_h5ad(path: Path, *, what: str) -> AnnData:
    import anndata

    try:
        with warnings.catch_warnings():
            # repeated gene names are fixed (and reported) right after reading
            warnings.filterwarnings("ignore", message="Variable names are not unique")
            adata = anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise InputError(
            f"Could not read the {what} {path} as an .h5ad file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}). Is the file complete?"
        ) from err
    restore_names(adata)  # names with '/' that spotlens.io.write_h5ad stored encoded
    return adata


def _make_var_names_unique(adata: AnnData, path: Path) -> None:
    """Rename repeated gene names NAME-1, NAME-2, ... and say so in a logged warning.

    10x count matrices repeat some gene symbols (one per gene id); deconvolution matches genes
    by name, so it refuses repeats (:func:`~spotlens._validation.check_unique_names`). Here the
    first copy keeps the name, so it is matched as before; the renamed copies match only a
    dataset with the same renamed copies. The warning names the genes so that nothing is
    dropped silently.
    """
    if adata.var_names.is_unique:
        return
    repeated = adata.var_names[adata.var_names.duplicated(keep=False)].unique()
    n_copies = int(adata.var_names.duplicated().sum())
    adata.var_names_make_unique()
    logger.warning(
        "%s: %d gene names occur more than once (e.g. %s); the %d repeats were renamed NAME-1, "
        "NAME-2, ... and are used only where the other dataset has the same names (otherwise "
        "only the first copy is). To keep all their counts, sum the repeated columns into one "
        "gene before reading, or read the file with anndata and aggregate them.",
        path.name, len(repeated), ", ".join(map(str, repeated[:5])), n_copies,
    )


def _outs_folder(path: Path, count_file: str) -> Path:
    if (path / count_file).is_file():
        return path
    if (path / "outs" / count_file).is_file():
        return path / "outs"
    raise InputError(
        f"{path} is not a Space Ranger outs/ folder: expected the count matrix "
        f"{path / count_file} (with spatial/tissue_positions.csv beside it). Pass the outs/ "
        "folder of `spaceranger count`, or an .h5ad file."
    )


def _read_spaceranger(
    outs: Path, *, count_file: str, spatial_key: str, library_id: str | None, load_images: bool
) -> AnnData:
    positions_file = next(
        (outs / "spatial" / name for name in POSITION_FILES if (outs / "spatial" / name).is_file()),
        None,
    )
    if positions_file is None:
        raise InputError(
            f"{outs} has no spot positions: expected {outs / 'spatial' / POSITION_FILES[0]} "
            f"(or {POSITION_FILES[1]} from Space Ranger < 2.0). Copy the whole spatial/ folder "
            "of the Space Ranger output."
        )
    adata, attrs = _read_matrix(outs / count_file)
    _add_positions(adata, _read_positions(positions_file), positions_file,
                   matrix_name=count_file, spatial_key=spatial_key)
    if library_id is None:
        library_id = _library_id(attrs, outs.parent.name if outs.name == "outs" else outs.name)
    adata.uns[SPATIAL_UNS_KEY] = {
        library_id: _spatial_metadata([outs / "spatial"], attrs, load_images)
    }
    return adata


def _read_matrix(matrix_file: Path) -> tuple[AnnData, dict]:
    """Read a 10x HDF5 count matrix (gene expression only) and its file attributes."""
    import h5py
    import scanpy as sc

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Variable names are not unique")
            adata = sc.read_10x_h5(matrix_file)
        with h5py.File(matrix_file, "r") as f:
            attrs = dict(f.attrs)
    except Exception as err:  # scanpy raises a bare Exception for missing datasets
        raise InputError(
            f"Could not read the 10x count matrix {matrix_file} ({type(err).__name__}: {err})."
        ) from err
    return adata, attrs


def _add_positions(
    adata: AnnData, positions: pd.DataFrame, positions_file: Path, *, matrix_name: str,
    spatial_key: str,
) -> None:
    """Write ``obs`` array/tissue columns and ``obsm[spatial_key]`` (x, y) px, by barcode."""
    missing = ~adata.obs_names.isin(positions.index)
    if missing.any():
        raise InputError(
            f"{int(missing.sum())} of {adata.n_obs} barcodes in {matrix_name} have no row in "
            f"{positions_file} (e.g. {list(adata.obs_names[missing][:3])}); the two files come "
            "from different runs."
        )
    positions = positions.loc[adata.obs_names]
    for column in GRID_COLUMNS:
        adata.obs[column] = positions[column].to_numpy()
    adata.obsm[spatial_key] = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(
        dtype=np.float64
    )


def _library_id(attrs: dict, fallback: str) -> str:
    ids = attrs.get("library_ids")
    if ids is not None and len(ids):
        return _text(ids[0])
    return fallback


def _check_bin_size(bin_size) -> int | None:
    if bin_size is None:
        return None
    value = check_number("bin_size", bin_size, above=0, whole=True,
                         expected="a positive whole number of µm (e.g. 8 for square_008um)")
    return int(value)


def _bin_sizes(binned: Path) -> dict[int, Path]:
    """``{bin side in µm: folder}`` of the ``square_<NNN>um`` folders in ``binned_outputs/``."""
    found = {}
    for child in binned.iterdir():
        match = _BIN_FOLDER.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def _visium_hd_folder(path: Path, bin_size: int | None) -> tuple[Path, int] | None:
    """``(square_<NNN>um folder, bin side in µm)`` when ``path`` is Visium HD output, else None."""
    match = _BIN_FOLDER.match(path.name)
    if match:
        size = int(match.group(1))
        if bin_size is not None and bin_size != size:
            raise InputError(
                f"{path} holds {size} µm bins, but bin_size={bin_size} was asked for. Pass the "
                f"outs/ folder to choose among the bin sizes, or bin_size={size}."
            )
        return path, size
    binned = next(
        (b for b in (path, path / BINNED_FOLDER, path / "outs" / BINNED_FOLDER)
         if b.name == BINNED_FOLDER and b.is_dir()),
        None,
    )
    if binned is None:
        return None
    sizes = _bin_sizes(binned)
    have = ", ".join(f"{s} µm ({f.name})" for s, f in sizes.items()) or "none"
    if bin_size is None:
        if HD_DEFAULT_BIN_UM in sizes:
            bin_size = HD_DEFAULT_BIN_UM
        elif len(sizes) == 1:
            bin_size = next(iter(sizes))
        else:
            raise InputError(
                f"{binned} holds several bin sizes and none is {HD_DEFAULT_BIN_UM} µm; pass "
                f"bin_size= (µm). Available: {have}."
            )
        logger.info("Visium HD: reading the %d µm bins of %s", bin_size, binned)
    if bin_size not in sizes:
        raise InputError(
            f"{binned} has no {bin_size} µm bins (folder square_{bin_size:03d}um). Available bin "
            f"sizes: {have}."
        )
    return sizes[bin_size], bin_size


def _read_visium_hd(
    folder: Path, bin_size: int, *, count_file: str, spatial_key: str, library_id: str | None,
    load_images: bool,
) -> AnnData:
    """One bin size of Visium HD binned outputs (``square_<NNN>um/``)."""
    matrix_file = folder / count_file
    positions_file = folder / "spatial" / HD_POSITIONS_FILE
    for needed in (matrix_file, positions_file):
        if not needed.is_file():
            raise InputError(
                f"The Visium HD bin folder {folder} has no {needed.relative_to(folder)}; copy the "
                "whole binned_outputs/ folder of the Space Ranger output."
            )
    adata, attrs = _read_matrix(matrix_file)
    _add_positions(adata, _read_positions(positions_file), positions_file,
                   matrix_name=f"{folder.name}/{count_file}", spatial_key=spatial_key)
    outs = folder.parent.parent  # outs/binned_outputs/square_NNNum
    if library_id is None:
        library_id = _library_id(attrs, outs.parent.name if outs.name == "outs" else outs.name)
    meta = _spatial_metadata([folder / "spatial", outs / "spatial"], attrs, load_images)
    scalefactors = meta.setdefault("scalefactors", {})
    stated = scalefactors.get("bin_size_um")
    if stated is not None and not np.isclose(float(stated), bin_size):
        raise InputError(
            f"The scale factors of {folder} give bin_size_um={stated}, but the folder holds "
            f"{bin_size} µm bins; the spatial/ folder belongs to another bin size."
        )
    scalefactors["bin_size_um"] = float(bin_size)
    diameter = scalefactors.get("spot_diameter_fullres")
    if scalefactors.get("microns_per_pixel") is None and diameter:
        scalefactors["microns_per_pixel"] = bin_size / float(diameter)
    if scalefactors.get("microns_per_pixel") is None:
        logger.warning("%s: µm per pixel is unknown (no scale factors)", folder)
    elif diameter is None:
        scalefactors["spot_diameter_fullres"] = bin_size / float(scalefactors["microns_per_pixel"])
    meta["metadata"]["bin_size_um"] = float(bin_size)
    adata.uns[SPATIAL_UNS_KEY] = {library_id: meta}
    return adata


def _read_positions(file: Path) -> pd.DataFrame:
    try:
        if file.suffix == ".parquet":
            table = pd.read_parquet(file).set_index("barcode")
        else:
            header = 0 if file.name == POSITION_FILES[0] else None
            table = pd.read_csv(file, header=header, index_col=0)
    except (ImportError, OSError, ValueError, KeyError) as err:
        raise InputError(f"Could not read the spot positions {file} ({err}).") from err
    if table.shape[1] != len(POSITION_COLUMNS):
        raise InputError(
            f"{file} has {table.shape[1] + 1} columns; a Space Ranger positions file has 6: "
            f"barcode, {', '.join(POSITION_COLUMNS)}."
        )
    table.columns = list(POSITION_COLUMNS)
    table.index = table.index.astype(str)
    return table


def _spatial_metadata(folders: list[Path], attrs: dict, load_images: bool) -> dict:
    """Scale factors and images from the first of ``folders`` that holds them."""
    meta: dict = {
        "metadata": {
            key: _text(attrs[key])
            for key in ("chemistry_description", "software_version")
            if key in attrs
        }
    }
    scalefactors = next((f / SCALEFACTORS_FILE for f in folders
                         if (f / SCALEFACTORS_FILE).is_file()), None)
    if scalefactors is not None:
        try:
            meta["scalefactors"] = json.loads(scalefactors.read_text())
        except ValueError as err:
            raise InputError(f"{scalefactors} is not valid JSON ({err}).") from err
    else:
        logger.warning("%s is missing; spot size and image scale factors are unknown",
                       folders[0] / SCALEFACTORS_FILE)
    if load_images:
        from matplotlib.image import imread

        images = {}
        for res in ("hires", "lowres"):
            file = next((f / f"tissue_{res}_image.png" for f in folders
                         if (f / f"tissue_{res}_image.png").is_file()), None)
            if file is not None:
                images[res] = imread(file)
        if images:
            meta["images"] = images
    return meta


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

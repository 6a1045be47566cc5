"""Training sections: every check :func:`train` makes before encoding a tile, and the genes.

(Reading a section's ``.h5ad`` and finding its image is :func:`spotlens.io.read_section`.)

Encoding the tiles of a few sections takes minutes; whatever can be known to be wrong from the
AnnData and a cheap look at the image is refused here first: a section of unknown scale (µm per
pixel), an image that does not fit its spots or is another section's
(:func:`~spotlens.histology._image_check.check_section_image`), a truncated image file, and
target genes that no section has.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anndata import AnnData

from .._validation import InputError
from ..io import SlideImage, check_mpp, read_image
from ._image_check import check_section_image
from ._tiles import _check_on_image, _library, section_mpp, tile_geometry

logger = logging.getLogger("spotlens")

#: gene rules -> the sets of :func:`~spotlens.histology.select_gene_sets` (the protocol's)
GENE_RULES = ("hvg", "top_expressed", "svg")
#: their sizes, as the protocol's (``ProtocolConfig`` defaults)
GENE_RULE_SIZES = {"hvg": {"n_hvg": 50}, "top_expressed": {"n_top": 250}, "svg": {"n_svg": 50}}
_MPP_MISMATCH = 0.1  # a given mpp this far (relative) from the section's own is reported


def _section_name(adata: AnnData, image_path: Path, taken: set[str]) -> str:
    spatial = adata.uns.get("spatial")
    name = str(next(iter(spatial))) if hasattr(spatial, "keys") and len(spatial) == 1 else (
        Path(image_path).stem)
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _section_mpps(mpp, n_sections: int) -> list[float | None]:
    """``mpp`` (None, one number, or one number-or-None per section) as one entry per section."""
    if mpp is None or np.ndim(mpp) == 0:
        return [check_mpp(mpp)] * n_sections
    values = list(mpp)
    if len(values) != n_sections:
        raise InputError(f"mpp (--mpp) has {len(values)} values for {n_sections} sections; "
                         "give one number for all sections, or one per section in their order.")
    return [check_mpp(v, what=f"mpp[{i}]") for i, v in enumerate(values)]


def _unknown_scale(name: str, image: SlideImage, adata: AnnData, library_id) -> InputError:
    where = f"adata.uns['spatial'][{library_id!r}]" if library_id is not None else (
        "adata.uns['spatial'][library_id]")
    hint = ""
    entry = adata.uns["spatial"][library_id] if library_id is not None else {}
    diameter = ((entry.get("scalefactors") if hasattr(entry, "get") else None) or {}).get(
        "spot_diameter_fullres")
    if diameter is not None:
        hint = (f" If you know the spot diameter in µm (Visium 55 µm, legacy ST 100 µm), mpp = "
                f"that / spot_diameter_fullres ({float(diameter):.4g} px here).")
    return InputError(
        f"The scale of section {name} ({image.path.name}) is unknown: the image records no µm "
        f"per pixel, nor does {where}['scalefactors']['microns_per_pixel'] or ['metadata']"
        "['microns_per_pixel'|'microns_per_pixel_est']. A model needs it to tile new images in "
        "µm, so it is asked for before training: pass --mpp (mpp=, µm per full-resolution px; "
        "one number for all sections, or one per section)." + hint
    )


def prepare_sections(sections, *, mpp=None, tile_um: float | None = None
                     ) -> tuple[list[str], dict[str, dict]]:
    """Open and check every training section, reading no more than an overview of each image.

    Parameters
    ----------
    sections
        Non-empty list of ``(adata, image)`` pairs (image: a file path or a file-backed
        :class:`SlideImage`). Not modified.
    mpp
        µm per full-resolution px: one number for all sections, or one (or None) per section;
        None = what each section records (:func:`~spotlens.histology._tiles.section_mpp`).
    tile_um
        Scale-1 tile side in µm (validated); None = each section's spot diameter.

    Returns
    -------
    names
        Section names (library ids, made unique), in input order.
    data
        ``{name: {"adata", "image" (SlideImage), "geometry" (TileGeometry), "image_r"}}``;
        ``image_r`` is the agreement with the stored image (None when none is stored).

    Raises
    ------
    InputError
        If a pair is malformed, an image is not a file, a section's µm/px is unknown (the
        message names ``--mpp``/``mpp=``), ``mpp`` has the wrong length or a non-positive value,
        the image does not fit the spots or is another section's, or it cannot be decoded.
    """
    mpps = _section_mpps(mpp, len(sections))
    names: list[str] = []
    data: dict[str, dict] = {}
    for pair, mpp_i in zip(sections, mpps):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InputError("Each section must be an (adata, image_path) pair.")
        adata, image = pair
        if not isinstance(adata, AnnData):
            raise InputError(f"A section is a {type(adata).__name__}, not an AnnData.")
        image = image if isinstance(image, SlideImage) else read_image(image)
        if image.path is None:
            raise InputError("Training images must be files (they key the feature cache).")
        name = _section_name(adata, image.path, set(names))
        names.append(name)
        library_id = _library(adata, None)[0]
        stored, source = section_mpp(adata, image=image, library_id=library_id)
        if mpp_i is None and stored is None:
            raise _unknown_scale(name, image, adata, library_id)
        if mpp_i is not None and stored is not None and abs(mpp_i / stored - 1) > _MPP_MISMATCH:
            logger.warning("%s: mpp %.4g differs from the %.4g µm/px recorded (%s); using %.4g",
                           name, mpp_i, stored, source, mpp_i)
        geometry = tile_geometry(adata, image=image, tile_um=tile_um, mpp=mpp_i)
        _check_on_image(adata, geometry, image, "spatial")
        r = check_section_image(adata, image, section=name, library_id=geometry.library_id)
        if r is None:  # nothing stored to compare with; still find a truncated file now
            image.check_decodes()
        else:
            logger.info("%s: %s matches the stored image (r = %.3f)", name, image.path.name, r)
        data[name] = {"adata": adata, "image": image, "geometry": geometry, "image_r": r}
    return names, data


def _choose_genes(genes, adatas: dict[str, AnnData]) -> tuple[list[str], str]:
    """The target genes and the rule that chose them (``"hvg"``, ``"top_expressed"``, ``"svg"``,
    ``"list"``).

    A rule chooses on the training sections exactly as the frozen protocol does
    (:func:`~spotlens.histology.select_gene_sets`: mitochondrial, ribosomal and housekeeping
    genes excluded; 50 HVGs, 250 most expressed or 50 spatially variable genes).

    Raises
    ------
    InputError
        For an unknown rule, an empty list, duplicates, or names in none of the sections (the
        message lists them with close matches among the sections' genes).
    """
    from ._gene_sets import select_gene_sets

    if isinstance(genes, str):
        if genes not in GENE_RULES:
            raise InputError(
                f"genes must be 'hvg', 'top_expressed', 'svg' or a list of gene names, got "
                f"{genes!r}."
            )
        sizes = {"n_top": 0, "n_hvg": 0, "n_svg": 0, **GENE_RULE_SIZES[genes]}
        return list(select_gene_sets(adatas, **sizes)[genes]), genes
    genes = [str(g) for g in genes]
    if not genes:
        raise InputError("The gene list is empty.")
    if len(set(genes)) != len(genes):
        raise InputError("The gene list has duplicates.")
    known = list(dict.fromkeys(g for a in adatas.values() for g in a.var_names))
    known_set = set(known)
    missing = [g for g in genes if g not in known_set]
    if missing:
        raise InputError(
            f"{len(missing)} of {len(genes)} genes are in none of the training sections: "
            f"{missing[:10]}" + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            + _close_matches(missing[:10], known) + ". Check the names (gene symbols as in "
            f"var_names, e.g. {known[:3]})."
        )
    return genes, "list"


def _close_matches(missing: Sequence[str], known: list[str]) -> str:
    """``"; did you mean: A → [B, C], ..."`` for names with a case-insensitive or close match."""
    by_lower: dict[str, list[str]] = {}
    for g in known:
        by_lower.setdefault(g.lower(), []).append(g)
    hints = []
    for g in missing:
        close = by_lower.get(g.lower()) or difflib.get_close_matches(g, known, n=3, cutoff=0.8)
        if close:
            hints.append(f"{g} → {', '.join(close)}")
    return f"; did you mean: {'; '.join(hints)}" if hints else ""

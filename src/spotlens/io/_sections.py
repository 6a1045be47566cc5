"""Reading one spatial section with its full-resolution H&E image (a file pair, no analysis)."""

from __future__ import annotations

from pathlib import Path

from anndata import AnnData

from .._validation import InputError

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".svs")


def read_section(h5ad_path, image_path=None) -> tuple[AnnData, Path]:
    """Read one section's ``.h5ad`` and find its full-resolution H&E image.

    Parameters
    ----------
    h5ad_path
        ``.h5ad`` with raw counts in ``X`` (``n_spots × n_genes``), spot centres ``(x, y)`` in
        full-resolution px in ``obsm["spatial"]`` and ``uns["spatial"][library_id]
        ["scalefactors"]["spot_diameter_fullres"]``.
    image_path
        The full-resolution image; None = the one file beside the ``.h5ad`` named
        ``<stem>_HE*`` with suffix ``.jpg``, ``.jpeg``, ``.png``, ``.tif``, ``.tiff`` or
        ``.svs`` (e.g. ``C6_HE_fullres.jpg`` beside ``C6.h5ad``).

    Returns
    -------
    adata
        The section.
    image_path
        Path of its image.

    Raises
    ------
    InputError
        If the ``.h5ad`` or the given image does not exist, or no / several images match
        beside the ``.h5ad`` (pass the image explicitly then), or the ``.h5ad`` cannot be read.

    Examples
    --------
    >>> adata, image = read_section("her2st/C6.h5ad")  # + C6_HE_fullres.jpg  # doctest: +SKIP
    """
    import anndata as ad

    h5ad_path = Path(h5ad_path).expanduser()
    if not h5ad_path.is_file():
        raise InputError(f"Section file not found: {h5ad_path}.")
    if image_path is None:
        stem = h5ad_path.name[: -len(".h5ad")] if h5ad_path.name.endswith(".h5ad") else (
            h5ad_path.stem)
        found = sorted(
            p for p in h5ad_path.parent.glob(f"{stem}_HE*")
            if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
        )
        if not found:
            raise InputError(
                f"No H&E image beside {h5ad_path} (looked for {stem}_HE*"
                f"{{{','.join(_IMAGE_SUFFIXES)}}}). Pass the full-resolution image explicitly."
            )
        if len(found) > 1:
            raise InputError(
                f"Several H&E images beside {h5ad_path}: {[p.name for p in found]}. Pass the "
                "full-resolution one explicitly."
            )
        image_path = found[0]
    image_path = Path(image_path).expanduser()
    if not image_path.is_file():
        raise InputError(f"Image file not found: {image_path}.")
    try:
        adata = ad.read_h5ad(h5ad_path)
    except (OSError, KeyError) as err:
        raise InputError(f"Cannot read {h5ad_path} as an AnnData .h5ad file: {err}") from err
    return adata, image_path

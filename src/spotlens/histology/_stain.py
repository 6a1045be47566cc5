"""Macenko stain normalisation of H&E tiles (NumPy).

Macenko M. et al., "A method for normalizing histology slides for quantitative analysis",
IEEE ISBI 2009, 1107–1110, doi:10.1109/ISBI.2009.5193250.

Beer–Lambert: the optical density ``OD = −ln(I / I0)`` of a pixel is a non-negative mix
``OD = S · c`` of two stain colour vectors (``S``: 3 × 2, columns haematoxylin, eosin) with
concentrations ``c``. The stain vectors span the plane of the two leading singular vectors of
the tissue pixels' OD; within that plane they are the extreme angles (robust percentiles) of
the pixels' OD directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validation import InputError

_CHUNK = 2**20  # pixels transformed at a time


@dataclass(frozen=True)
class StainReference:
    """Stain vectors and concentration scale that tiles are normalised to.

    Attributes
    ----------
    stain_matrix
        ``3 × 2`` unit OD vectors in RGB; column 0 haematoxylin, column 1 eosin.
    max_concentrations
        ``(2,)`` robust maximum (99th percentile) concentration of each stain.
    """

    stain_matrix: np.ndarray
    max_concentrations: np.ndarray


#: A typical H&E appearance (OD vectors of haematoxylin and eosin and their 99th-percentile
#: concentrations for I0 = 240), the usual default target of Macenko normalisation.
DEFAULT_REFERENCE = StainReference(
    stain_matrix=np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
    max_concentrations=np.array([1.9705, 1.0308]),
)


def _check_rgb(images, *, what: str) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise InputError(
            f"The {what} must be one RGB tile (h × w × 3) or a batch (n × h × w × 3), got "
            f"shape {array.shape}."
        )
    if array.dtype != np.uint8:
        raise InputError(f"The {what} must be uint8 RGB, got {array.dtype}.")
    if array.size == 0:
        raise InputError(f"The {what} is empty (shape {array.shape}).")
    return array


def _optical_density(pixels: np.ndarray, background: float) -> np.ndarray:
    """``n × 3`` uint8 → ``n × 3`` float32 OD ``−ln(I / I0)``, clipped at 0 (brighter than I0)."""
    od = -np.log(np.maximum(pixels.astype(np.float32), 1.0) / np.float32(background))
    return np.maximum(od, 0.0, out=od)


def _fit(
    pixels: np.ndarray, *, background: float, beta: float, alpha: float, max_pixels: int,
    min_pixels: int = 100,
) -> StainReference | None:
    """Fit stain vectors to ``n × 3`` uint8 pixels; None if too little tissue or one stain."""
    if pixels.shape[0] > 4 * max_pixels:  # even subsample before computing OD
        pixels = pixels[:: pixels.shape[0] // (4 * max_pixels)]
    od = _optical_density(pixels, background)
    tissue = od[np.linalg.norm(od, axis=1) > beta]
    if tissue.shape[0] < min_pixels:
        return None
    if tissue.shape[0] > max_pixels:  # deterministic subsample for speed
        step = tissue.shape[0] / max_pixels
        tissue = tissue[(np.arange(max_pixels) * step).astype(np.int64)]
    tissue = tissue.astype(np.float64)
    # leading two right-singular vectors of the (uncentred) OD matrix = top eigenvectors of OD'OD
    _, vectors = np.linalg.eigh(tissue.T @ tissue)
    plane = vectors[:, [2, 1]]
    plane[:, 0] *= np.sign(plane[:, 0].sum()) or 1.0  # first axis points into positive OD
    projected = tissue @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [alpha, 100 - alpha])
    if high - low < 1e-3:
        return None
    v_low = plane @ np.array([np.cos(low), np.sin(low)])
    v_high = plane @ np.array([np.cos(high), np.sin(high)])
    # haematoxylin absorbs more red than eosin does
    stains = np.column_stack([v_low, v_high] if v_low[0] > v_high[0] else [v_high, v_low])
    stains *= np.sign(stains.sum(axis=0, keepdims=True))
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    concentrations = np.linalg.lstsq(stains, tissue.T, rcond=None)[0]
    maxima = np.percentile(concentrations, 99, axis=1)
    if np.any(maxima <= 0):
        return None
    return StainReference(stains, maxima)


def fit_macenko(
    image, *, background: float = 240.0, beta: float = 0.15, alpha: float = 1.0,
    max_pixels: int = 250_000,
) -> StainReference:
    """Estimate the H and E stain vectors and concentration scale of an image (or batch).

    Parameters
    ----------
    image
        ``h × w × 3`` or ``n × h × w × 3`` uint8 RGB.
    background
        Transmitted light intensity ``I0`` (a bright-field slide's glass, ≈ 240).
    beta
        Pixels whose OD norm is at most ``beta`` are glass and ignored.
    alpha
        Percentile (in %) of the angle distribution taken as each stain's extreme; robust
        alternative to the minimum and maximum.
    max_pixels
        Tissue pixels used for the fit (an even subsample beyond it).

    Returns
    -------
    StainReference

    Raises
    ------
    InputError
        If the image is not uint8 RGB, has fewer than 100 tissue pixels, or shows a single
        stain (the two stain vectors coincide).
    """
    array = _check_rgb(image, what="image")
    reference = _fit(array.reshape(-1, 3), background=background, beta=beta, alpha=alpha,
                     max_pixels=max_pixels)
    if reference is None:
        raise InputError(
            f"Cannot estimate two stains: the image has too little stained tissue (OD > "
            f"{beta:g}) or a single colour. Pass a tile or slide region with H&E-stained "
            "tissue."
        )
    return reference


def _transform(
    pixels: np.ndarray, source: StainReference, target: StainReference, background: float
) -> np.ndarray:
    """Re-stain ``n × 3`` uint8 pixels from ``source`` stains to ``target`` stains."""
    unmix = np.linalg.pinv(source.stain_matrix).astype(np.float32)  # 2 × 3
    scale = (target.max_concentrations / source.max_concentrations).astype(np.float32)
    mix = (target.stain_matrix * scale[None, :]).astype(np.float32)  # 3 × 2
    out = np.empty_like(pixels)
    for start in range(0, pixels.shape[0], _CHUNK):
        od = _optical_density(pixels[start:start + _CHUNK], background)
        restained = (od @ unmix.T) @ mix.T
        rgb = background * np.exp(-restained)
        out[start:start + _CHUNK] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out


def macenko_normalize(
    tile_or_batch,
    *,
    target: StainReference | np.ndarray | None = None,
    per_tile: bool = False,
    background: float = 240.0,
    beta: float = 0.15,
    alpha: float = 1.0,
) -> np.ndarray:
    """Macenko stain normalisation: re-stain H&E tiles with a reference's stain colours.

    Each pixel's optical density is unmixed into haematoxylin and eosin concentrations with
    the stain vectors estimated from the input, the concentrations are rescaled so that their
    99th percentiles match the reference's, and the pixel is re-composed with the reference's
    stain vectors.

    Parameters
    ----------
    tile_or_batch
        ``h × w × 3`` or ``n × h × w × 3`` uint8 RGB.
    target
        The appearance to normalise to: a :class:`StainReference` (see :func:`fit_macenko`),
        an RGB image to fit one from, or None for :data:`DEFAULT_REFERENCE`.
    per_tile
        False (default): one set of stains is fitted on the whole batch — pass the tiles of
        one slide together, which keeps their relative intensities. True: each tile gets its
        own fit; tiles with too little tissue use the batch fit.
    background
        Transmitted light intensity ``I0``.
    beta
        OD norm below which pixels are glass and not used to fit the stains.
    alpha
        Robust percentile (%) of the stain angles.

    Returns
    -------
    Same shape as the input, uint8 RGB. The input is not modified.

    Raises
    ------
    InputError
        If the input is not uint8 RGB of one of those shapes, or the batch has too little
        tissue or a single stain to fit (see :func:`fit_macenko`).

    Notes
    -----
    Macenko M. et al., "A method for normalizing histology slides for quantitative
    analysis", IEEE ISBI 2009, doi:10.1109/ISBI.2009.5193250. Glass is re-composed as
    ``I0`` (240 by default), not pure white.

    Examples
    --------
    >>> from spotlens.histology import macenko_normalize
    >>> tiles = spot_tiles(adata, image)  # doctest: +SKIP
    >>> tiles = macenko_normalize(tiles)  # doctest: +SKIP
    """
    array = _check_rgb(tile_or_batch, what="input to macenko_normalize")
    if target is None:
        reference = DEFAULT_REFERENCE
    elif isinstance(target, StainReference):
        reference = target
    else:
        reference = fit_macenko(target, background=background, beta=beta, alpha=alpha)
    fitted = fit_macenko(array, background=background, beta=beta, alpha=alpha)
    if not per_tile or array.ndim == 3:
        return _transform(array.reshape(-1, 3), fitted, reference, background).reshape(
            array.shape
        )
    out = np.empty_like(array)
    for i, tile in enumerate(array):
        pixels = tile.reshape(-1, 3)
        own = _fit(pixels, background=background, beta=beta, alpha=alpha, max_pixels=250_000)
        out[i] = _transform(pixels, own or fitted, reference, background).reshape(tile.shape)
    return out

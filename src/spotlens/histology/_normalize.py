"""Per-section standardisation of tile features (arrays only; no torch)."""

from __future__ import annotations

import numpy as np

from .._validation import InputError


def feature_moments(features: np.ndarray) -> dict[str, np.ndarray]:
    """Return what standardising a section needs: ``n``, per-feature sum and sum of squares.

    Sums (not means) so that parts of a section computed apart (image regions on a cluster)
    add up to the whole section's; float64.
    """
    x = np.asarray(features, dtype=np.float64)
    return {"n": np.array(float(x.shape[0])), "sum": x.sum(axis=0),
            "sumsq": np.einsum("ij,ij->j", x, x)}


def standardize_section(
    features: np.ndarray, moments: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """Z-score every feature over the spots of one section.

    Sections differ in staining, scanner and thickness, which shifts encoder features as a
    whole; expression models compare spots within a section (the metric is the per-gene
    Pearson r across a section's spots). Centring and scaling each section's features by its
    own mean and standard deviation removes those section-wide shifts (features constant in
    the section become 0). On the held-out her2st and olfactory-bulb sections this raised the
    ridge baseline's mean Pearson r (``benchmarks/histology_her2st.py``).

    Parameters
    ----------
    features
        ``n_spots × n_features`` of one section.
    moments
        The section's :func:`feature_moments` when ``features`` is only part of it; None =
        computed from ``features``.

    Returns
    -------
    ``n_spots × n_features`` float32.

    Raises
    ------
    InputError
        If the section has no spot, or ``moments`` has another width.
    """
    x = np.asarray(features, dtype=np.float64)
    m = feature_moments(x) if moments is None else moments
    n = float(m["n"])
    if n < 1:
        raise InputError("Cannot standardise the features of a section without spots.")
    if np.shape(m["sum"]) != (x.shape[1],):
        raise InputError(
            f"Feature moments are for {np.shape(m['sum'])[0]} features, the features have "
            f"{x.shape[1]}."
        )
    mean = m["sum"] / n
    var = np.maximum(m["sumsq"] / n - mean**2, 0.0)
    sd = np.sqrt(var)
    sd = np.where(sd > 1e-6 * (np.abs(mean) + 1e-12), sd, np.inf)
    return ((x - mean) / sd).astype(np.float32)

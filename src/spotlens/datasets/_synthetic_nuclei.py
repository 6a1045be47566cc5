"""Synthetic spots built from known nuclei: ground truth for the nucleus-level model.

:func:`synthetic_nuclei` draws sections of spots on a grid; each spot holds nuclei of known
cell type and known expression, and its counts are the Poisson sum of its nuclei's. A nucleus's
descriptor (what the model reads of its image) is its type's mean plus noise, so types can be
recovered from images only as well as the noise allows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import CELL_TYPE_KEY, NUCLEUS_SPOT_KEY, SPATIAL_KEY
from .._validation import InputError, check_int

#: descriptor width (the real descriptors': 9 morphology + 25 crop colour statistics)
N_DESCRIPTORS = 34
N_FILLER = 20


def synthetic_nuclei(*, n_sections: int = 3, n_spots: int = 100, n_types: int = 4,
                     n_genes: int = 30, nuclei_per_spot: float = 15.0,
                     outside_fraction: float = 0.3, descriptor_noise: float = 1.0,
                     n_features: int = 16, seed: int = 0) -> list[dict]:
    """Sections of spots whose counts are sums of nuclei of known type and expression.

    Parameters
    ----------
    n_sections, n_spots
        Sections, and spots per section (on a square grid, 200 px apart, radius 50 px).
    n_types, n_genes
        Cell types and modelled genes (plus 20 filler genes that carry the rest of the
        transcriptome, so that normalisation over all genes behaves as in real data).
    nuclei_per_spot
        Mean nuclei per spot (Poisson, at least 1).
    outside_fraction
        Extra nuclei outside every spot, as a fraction of those inside.
    descriptor_noise
        Standard deviation of the descriptor noise around each type's mean (unit-variance
        means): larger = types harder to tell from images.
    n_features
        Width of the spots' tile features (a noisy linear image of the spot's type mix).
    seed
        Seed of every draw.

    Returns
    -------
    One dict per section: ``spots`` (AnnData ``n_spots × (n_genes + 20)`` raw counts,
    ``obsm["spatial"]`` px, ``obsm["true_proportions"]`` DataFrame of the spot's nuclei's type
    shares), ``nuclei`` (AnnData ``n_nuclei × n_genes`` of true expected counts,
    ``obsm["spatial"]``, ``obsm["X_nucleus"]`` descriptors ``n_nuclei × 34``, ``obs["spot"]``,
    ``obs["cell_type"]``, ``obs["true_total"]``), ``features`` (``n_spots × n_features``),
    ``signatures`` (DataFrame ``n_types × n_genes``: expected counts of a unit-size nucleus).

    Raises
    ------
    InputError
        If a count is not a positive integer or ``outside_fraction`` is negative.

    Examples
    --------
    >>> sections = synthetic_nuclei(n_sections=2, n_spots=20)
    >>> sections[0]["nuclei"].obs["cell_type"].nunique() <= 4
    True
    """
    for name, v in (("n_sections", n_sections), ("n_spots", n_spots), ("n_types", n_types),
                    ("n_genes", n_genes), ("n_features", n_features)):
        check_int(name, v, minimum=1)
    if outside_fraction < 0:
        raise InputError(f"outside_fraction must be ≥ 0, got {outside_fraction}.")
    rng = np.random.default_rng(seed)
    types = [f"type_{k}" for k in range(n_types)]
    genes = [f"gene_{g:02d}" for g in range(n_genes)]
    # each type: a base profile and a few markers 8x up
    sig = rng.gamma(2.0, 0.5, size=(n_types, n_genes))
    for k in range(n_types):
        sig[k, rng.choice(n_genes, size=max(1, n_genes // n_types), replace=False)] *= 8.0
    rest = rng.uniform(20.0, 40.0, size=n_types) * sig.sum(1).mean()
    type_means = rng.normal(0.0, 1.0, size=(n_types, N_DESCRIPTORS)) * 1.5
    mixing = rng.normal(0.0, 1.0, size=(n_types, n_features))
    side = int(np.ceil(np.sqrt(n_spots)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_spots]
    sections = []
    for s in range(n_sections):
        # smooth type mixes over the grid: a few random centres of each type
        centres = rng.uniform(0, side, size=(n_types, 2))
        logits = -((grid[:, None, :] - centres[None]) ** 2).sum(-1) / (0.3 * side) ** 2
        props = np.exp(2.0 * logits + rng.normal(0, 0.3, size=logits.shape))
        props /= props.sum(1, keepdims=True)
        coords = grid * 200.0 + 300.0
        n_in = np.maximum(rng.poisson(nuclei_per_spot, size=n_spots), 1)
        spot = np.repeat(np.arange(n_spots), n_in)
        kind = np.array([rng.choice(n_types, p=props[i]) for i in spot], dtype=np.int64)
        r = 50.0 * np.sqrt(rng.uniform(0, 1, len(spot)))
        a = rng.uniform(0, 2 * np.pi, len(spot))
        xy = coords[spot] + np.c_[r * np.cos(a), r * np.sin(a)]
        n_out = int(round(outside_fraction * len(spot)))
        out_spot = rng.integers(0, n_spots, n_out)
        kind = np.concatenate([kind, [rng.choice(n_types, p=props[i]) for i in out_spot]])
        xy = np.vstack([xy, coords[out_spot] + rng.choice([-1, 1], (n_out, 2)) * 100.0
                        + rng.uniform(-25, 25, (n_out, 2))])
        spot = np.concatenate([spot, np.full(n_out, -1)])
        size = rng.lognormal(0.0, 0.2, size=len(kind))
        expr = size[:, None] * sig[kind]
        total = size * (sig[kind].sum(1) + rest[kind])
        inside = spot >= 0
        capture = rng.lognormal(0.0, 0.3, size=n_spots)
        lam = np.zeros((n_spots, n_genes + N_FILLER))
        np.add.at(lam[:, :n_genes], spot[inside], expr[inside])
        rest_sum = np.bincount(spot[inside], weights=(size * rest[kind])[inside],
                               minlength=n_spots)
        lam[:, n_genes:] = rest_sum[:, None] / N_FILLER
        counts = rng.poisson(lam * capture[:, None]).astype(np.float32)
        spot_names = pd.Index([f"s{s}_spot{i:03d}" for i in range(n_spots)])
        shares = np.zeros((n_spots, n_types))
        np.add.at(shares, (spot[inside], kind[inside]), 1.0)
        spots = AnnData(counts, obs=pd.DataFrame(index=spot_names),
                        var=pd.DataFrame(index=genes + [f"filler_{j}" for j in range(N_FILLER)]))
        spots.obsm[SPATIAL_KEY] = coords
        spots.obsm["true_proportions"] = pd.DataFrame(shares / shares.sum(1, keepdims=True),
                                                      index=spot_names, columns=types)
        names = pd.Index([f"s{s}_nucleus{i:05d}" for i in range(len(kind))])
        obs = pd.DataFrame({
            NUCLEUS_SPOT_KEY: pd.Categorical.from_codes(spot, categories=spot_names),
            CELL_TYPE_KEY: pd.Categorical.from_codes(kind, categories=types),
            "true_total": total}, index=names)
        nuclei = AnnData(expr.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))
        nuclei.obsm[SPATIAL_KEY] = xy
        nuclei.obsm["X_nucleus"] = (type_means[kind] + rng.normal(
            0, descriptor_noise, size=(len(kind), N_DESCRIPTORS))).astype(np.float32)
        features = props @ mixing + rng.normal(0, 0.3, size=(n_spots, n_features))
        sections.append({"spots": spots, "nuclei": nuclei, "features": features,
                         "signatures": pd.DataFrame(sig, index=types, columns=genes)})
    return sections

"""Cells per spot when the spatial assay captures less than the reference (issue 17, point 4)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from spotlens._validation import InputError
from spotlens.datasets import synthetic
from spotlens.deconv import cell_level, deconvolve
from spotlens.deconv._capture import capture_ratio, type_dispersion


def thinned(share: float, seed: int = 1, n_spots: int = 600, platform_effect: float = 0.0):
    """Spots of ``max(1, Poisson(6))`` cells whose counts keep ``share`` of the cells' RNA."""
    spatial, reference = synthetic(n_spots, n_genes=400, n_types=6, cells_per_spot=6.0,
                                   n_cells_per_type=150, counts_per_cell=2000.0, seed=seed,
                                   platform_effect=platform_effect)
    counts = sparse.csr_matrix(spatial.X).astype(np.int64)
    counts.data = np.random.default_rng(seed).binomial(counts.data, share)
    counts.eliminate_zeros()
    spatial.X = counts.astype(np.float32)
    return spatial, reference


def _codes(reference):
    labels = reference.obs["cell_type"].astype(str)
    types = sorted(labels.unique())
    return np.asarray([types.index(t) for t in labels]), types


def test_type_dispersion_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    r = rng.poisson(rng.gamma(2.0, 3.0, size=(40, 25))).astype(float)
    codes = np.repeat([0, 1, 2], [10, 10, 20])
    m, v, w = type_dispersion(sparse.csr_matrix(r), codes, 4)
    for k in range(3):
        cells = r[codes == k]
        lib = cells.sum(axis=1, keepdims=True)
        s = cells.sum(axis=0) / lib.sum()
        d = cells - lib * s
        np.testing.assert_allclose(m[k], cells.mean(axis=0))
        np.testing.assert_allclose(v[k], ((d**2) - cells * (1 - s)).sum(axis=1).mean())
        np.testing.assert_allclose(w[k], (d**2).sum(axis=1).mean() / len(cells))
    assert m[3].sum() == 0 and v[3] == 0 and w[3] == 0  # a type without cells


@pytest.mark.parametrize(("share", "platform_effect"), [(1.0, 0.0), (0.25, 0.0), (0.25, 0.3)])
def test_capture_ratio_recovered_around_the_type_level_fit(share, platform_effect):
    """The ratio is measured around the fitted proportions, which follow each spot's realised
    count shares (cells' library sizes vary); the cells' remaining scatter says how many.
    Genes captured differently by the two assays (log-normal factors, σ 0.3) are not read
    as scatter."""
    spatial, reference = thinned(share, platform_effect=platform_effect)
    codes, types = _codes(reference)
    m, v, w = type_dispersion(reference.X, codes, len(types))
    fit = deconvolve(spatial, reference, inplace=False, progress=False).proportions[types]
    c, abundance = capture_ratio(spatial.X, fit.to_numpy(), m, v, w)
    assert c == pytest.approx(share, rel=0.15)
    n_true = spatial.obs["n_cells"].to_numpy(float)
    assert (abundance / c).mean() == pytest.approx(n_true.mean(), rel=0.15)


def test_estimate_counts_the_cells_that_library_sizes_miss():
    """A quarter of each cell's RNA captured: library sizes count a quarter of the cells;
    the estimated capture ratio restores the count, and the cells placed follow."""
    spatial, reference = thinned(0.25)
    deconvolve(spatial, reference, progress=False)
    n_true = spatial.obs["n_cells"].to_numpy(float)
    default = cell_level(spatial, reference, inplace=False, progress=False)
    estimated = cell_level(spatial, reference, cells_per_spot="estimate", inplace=False,
                           progress=False)
    n_default = default.cell_counts.sum(axis=1).to_numpy(float)
    n_estimated = estimated.cell_counts.sum(axis=1).to_numpy(float)
    assert n_default.mean() < 0.5 * n_true.mean()
    assert abs(n_estimated.mean() - n_true.mean()) < 0.15 * n_true.mean()
    assert np.abs(n_estimated - n_true).mean() < 0.5 * np.abs(n_default - n_true).mean()
    # the weights count whole cells: they add up to the cells placed
    weights = np.asarray(estimated.weights.sum(axis=1)).ravel()
    assert weights.mean() == pytest.approx(n_estimated.mean(), rel=0.2)
    params = estimated.uns["params"]
    assert params["capture_ratio"] == pytest.approx(0.25, rel=0.15)
    assert params["capture_ratio_from"] == "estimate"
    assert default.uns["params"]["capture_ratio"] == 1.0


def test_a_mean_number_of_cells_sets_the_mean():
    spatial, reference = thinned(0.25, n_spots=300)
    deconvolve(spatial, reference, progress=False)
    before = spatial.copy()
    res = cell_level(spatial, reference, cells_per_spot=4, inplace=False, progress=False)
    totals = res.cell_counts.sum(axis=1).to_numpy(float)
    assert totals.mean() == pytest.approx(4.0, abs=0.3)  # rounding per spot
    assert res.uns["params"]["capture_ratio_from"] == "mean cells per spot"
    # spots hold cells in proportion to their counts
    lib = np.asarray(spatial.X.sum(axis=1)).ravel()
    assert np.corrcoef(lib, totals)[0, 1] > 0.8
    np.testing.assert_array_equal(spatial.X.toarray(), before.X.toarray())  # not modified


@pytest.mark.parametrize(("value", "message"), [
    (0, "cells_per_spot must be a finite number > 0"),
    (-2.0, "cells_per_spot must be a finite number > 0"),
    (float("nan"), "cells_per_spot must be a finite number > 0"),
    (True, "cells_per_spot must be None, 'estimate', a mean number"),
    ([4], "cells_per_spot must be None, 'estimate', a mean number"),
])
def test_bad_cells_per_spot_values_raise(value, message):
    spatial, reference = thinned(0.25, n_spots=60)
    deconvolve(spatial, reference, progress=False)
    with pytest.raises(InputError, match=message):
        cell_level(spatial, reference, cells_per_spot=value, progress=False)


def test_estimate_on_spots_without_scatter_is_a_clear_error():
    """Spots exactly at their fitted means (no scatter at all) carry no information on how
    many cells they hold: an error that says what to pass instead, not a wild count."""
    from spotlens.deconv._capture import cells_per_spot_from

    rng = np.random.default_rng(3)
    profiles = rng.dirichlet(np.ones(50), size=3) * 500
    codes = np.repeat([0, 1, 2], 30)
    cells = rng.poisson(np.repeat(profiles, 30, axis=0)).astype(float)
    props = rng.dirichlet(np.ones(3), size=200)
    m = type_dispersion(cells, codes, 3)[0]
    spots = 4.0 * props @ m
    with pytest.raises(InputError, match=r"counting noise.*cells_per_spot=8"):
        cells_per_spot_from("estimate", spots, props, cells, codes)

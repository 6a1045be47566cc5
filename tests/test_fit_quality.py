"""spotlens.deconv._fit_quality.spot_fit_quality: per-spot misfit to the reference."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from scipy import sparse, stats
from scipy.special import xlogy
from sklearn.metrics import roc_auc_score

from spotlens._validation import InputError
from spotlens.datasets import pseudo_spots
from spotlens.deconv import _fit_quality
from spotlens.deconv._fit_quality import spot_fit_quality

LYMPH = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "spacexr_lymphnode_visium"
    / "sc_reference.h5ad"
)


def poisson_nmf(y: np.ndarray, s: np.ndarray, n_iter: int = 200) -> np.ndarray:
    """Per-spot Poisson fit with fixed signatures: multiplicative updates (Lee & Seung 2001).

    ``y ≈ a s`` with ``a ≥ 0`` (``n_spots × n_types``, absolute counts per type); each update
    ``a ← a · ((y / a s) sᵀ) / (s 1)`` never increases the Poisson deviance.
    """
    a = np.full((y.shape[0], s.shape[0]), 1.0) * y.sum(axis=1, keepdims=True) / s.shape[0]
    total = s.sum(axis=1)
    for _ in range(n_iter):
        a *= ((y / np.maximum(a @ s, 1e-12)) @ s.T) / total
    return a


def signatures(n_types: int, n_genes: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-sum profiles, skewed like real ones (gamma 0.3), each type with 5 strong markers."""
    s = rng.gamma(0.3, 1.0, size=(n_types, n_genes)) + 1e-3
    for k in range(n_types):
        s[k, 5 * k : 5 * k + 5] *= 20.0
    return s / s.sum(axis=1, keepdims=True)


def simulate(
    s: np.ndarray, depths: np.ndarray, rng: np.random.Generator, dispersion: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Counts drawn from the model itself: ``y ~ Poisson(µ)`` or NB2(``µ``, ``φ``)."""
    x = rng.dirichlet(np.full(s.shape[0], 0.5), size=depths.size)
    mu = depths[:, None] * (x @ s)
    if dispersion > 0:
        mu = mu * rng.gamma(1.0 / dispersion, dispersion, size=mu.shape)
    return rng.poisson(mu).astype(np.float64), x


def fitted(y: np.ndarray, s: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
    """CSR counts, composition as fractions of the library, library sizes."""
    a = poisson_nmf(y, s)
    lib = y.sum(axis=1)
    return sparse.csr_matrix(y), a / lib[:, None], lib


@pytest.fixture(scope="module")
def two_depths():
    """400 spots, half at 400 and half at 20,000 UMI, 8 types × 300 genes, Poisson."""
    rng = np.random.default_rng(0)
    s = signatures(8, 300, rng)
    depths = np.where(np.arange(400) % 2 == 0, 400.0, 20_000.0)
    y, _ = simulate(s, depths, rng)
    return (*fitted(y, s), s, depths)


# --- model spots: calibrated at any depth ----------------------------------------------------


def test_model_spots_score_one_at_every_depth(two_depths):
    y, x, lib, s, depths = two_depths
    score, flag, info = spot_fit_quality(y, x, s, library=lib)
    assert info["dispersion"] < 0.01  # Poisson data: no overdispersion found
    for depth in (400.0, 20_000.0):
        at = depths == depth
        assert abs(score[at].mean() - 1.0) < 0.05, (depth, score[at].mean())
        assert flag[at].mean() <= 0.03, (depth, flag[at].mean())
    shallow, deep = score[depths == 400.0], score[depths == 20_000.0]
    assert abs(shallow.mean() - deep.mean()) < 0.05
    assert abs(flag[depths == 400.0].mean() - flag[depths == 20_000.0].mean()) <= 0.03
    # the flag threshold is what info reports
    np.testing.assert_array_equal(flag, score > info["threshold"])


def test_shallow_spots_calibrated_where_plain_deviance_is_not():
    """Why the expectation: at 100 UMI over 300 genes (Slide-seq depth) the deviance per gene is
    far below 1, so ``D / n_genes`` would call every shallow spot well fitted."""
    rng = np.random.default_rng(5)
    s = signatures(6, 300, rng)
    y, _ = simulate(s, np.full(300, 100.0), rng)
    counts, x, lib = fitted(y, s)
    score, flag, info = spot_fit_quality(counts, x, s, library=lib, dispersion=0.0)
    assert np.mean(info["deviance"] / s.shape[1]) < 0.8
    assert abs(np.mean(score) - 1.0) < 0.05
    assert flag.mean() <= 0.03


def test_overdispersed_spots_estimated_dispersion_removes_depth_trend():
    rng = np.random.default_rng(1)
    s = signatures(6, 250, rng)
    depths = np.where(np.arange(300) % 2 == 0, 400.0, 20_000.0)
    y, x_true = simulate(s, depths, rng, dispersion=0.1)
    counts, x, lib = fitted(y, s)
    score, flag, info = spot_fit_quality(counts, x, s, library=lib)
    assert 0.07 < info["dispersion"] < 0.13
    for depth in (400.0, 20_000.0):
        at = depths == depth
        assert abs(np.median(score[at]) - 1.0) < 0.1, (depth, np.median(score[at]))
        assert flag[at].mean() <= 0.03
    # a Poisson score would call every deep spot a misfit just for being deep
    poisson, _, _ = spot_fit_quality(counts, x, s, library=lib, dispersion=0.0)
    assert np.median(poisson[depths == 20_000.0]) > 5 * np.median(poisson[depths == 400.0])


# --- a type missing from the reference -------------------------------------------------------


def test_synthetic_missing_type_scores_high_and_is_flagged():
    rng = np.random.default_rng(2)
    s_all = signatures(7, 300, rng)
    n = 300
    x = rng.dirichlet(np.full(7, 0.5), size=n)
    share = np.where(np.arange(n) < 60, rng.uniform(0.5, 0.8, n), rng.uniform(0.0, 0.1, n))
    x[:, 6] = 0.0
    x = x / x.sum(axis=1, keepdims=True) * (1 - share)[:, None]
    x[:, 6] = share
    y = rng.poisson(rng.uniform(1_000, 5_000, n)[:, None] * (x @ s_all)).astype(float)
    s = s_all[:6]  # the reference lacks type 6
    counts, x_fit, lib = fitted(y, s)
    score, flag, _ = spot_fit_quality(counts, x_fit, s, library=lib)
    missing = share > 0.5
    assert roc_auc_score(missing, score) > 0.95
    assert flag[missing].mean() > 0.8
    assert flag[~missing].mean() < 0.1


@pytest.fixture(scope="module")
def lymph_missing_plasma():
    if not LYMPH.exists():
        pytest.skip(f"shared lymph-node reference not found at {LYMPH}")
    reference = ad.read_h5ad(LYMPH)
    # seed 2 puts B_Plasma as the dominant type of one region (checked in the test)
    spatial, half = pseudo_spots(
        reference, n_spots=400, regions=("dominant",) * 5 + ("diverse",), library_size=2_000,
        exclude_from_reference=("B_Plasma",), seed=2,
    )
    labels = half.obs["cell_type"].astype(str).to_numpy()
    counts = half.X.toarray()
    types = sorted(set(labels))
    s = np.vstack([
        (counts[labels == t] / np.maximum(counts[labels == t].sum(1, keepdims=True), 1)).mean(0)
        for t in types
    ])
    keep = s.sum(axis=0) > 0
    s = s[:, keep] / s[:, keep].sum(axis=1, keepdims=True)
    y = spatial.X[:, keep].toarray().astype(np.float64)
    return (*fitted(y, s), s, spatial.obsm["proportions_true"]["B_Plasma"].to_numpy())


@pytest.mark.slow
def test_lymph_node_spots_of_a_missing_type_stand_out(lymph_missing_plasma):
    """B_Plasma left out of the reference: plasma cells are dominated by immunoglobulin
    transcripts (IGKC, IGHG*, JCHAIN) that no other type of this reference expresses at that
    level, so no mixture of the remaining types can explain a plasma-dominated spot."""
    y, x, lib, s, share = lymph_missing_plasma
    missing = share > 0.5
    assert missing.sum() >= 20, "the simulation no longer has a B_Plasma-dominated region"
    score, flag, info = spot_fit_quality(y, x, s, library=lib)
    assert info["dispersion"] > 0  # real cells: overdispersed around the type means
    assert roc_auc_score(missing, score) > 0.9
    # measured: 37 % of the plasma-dominated spots flagged against 3 % of the others (with a
    # fixed dispersion of 0.1 it is 90 % against 8 %)
    assert flag[missing].mean() > 0.3
    assert flag[missing].mean() > 5 * flag[~missing].mean()


# --- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("phi", [0.0, 0.3])
def test_matches_direct_dense_computation(phi):
    """Oracle: deviance from the dense formula, expectation by summing scipy's pmf."""
    rng = np.random.default_rng(3)
    s = signatures(3, 40, rng)
    x = rng.dirichlet(np.ones(3), size=6)
    lib = rng.uniform(5, 3_000, size=6)
    mu = lib[:, None] * (x @ s)
    y = rng.poisson(mu).astype(float)
    _, _, info = spot_fit_quality(sparse.csr_matrix(y), x, s, library=lib, dispersion=phi)
    if phi == 0:
        dev = 2 * (xlogy(y, y / mu) - (y - mu))
    else:
        r = 1 / phi
        dev = 2 * (xlogy(y, y / mu) - (y + r) * np.log((y + r) / (mu + r)))
    np.testing.assert_allclose(info["deviance"], dev.sum(axis=1), rtol=1e-10)

    def expected_unit(m):
        ys = np.arange(int(m + 60 * np.sqrt(m + phi * m**2) + 60))
        p = stats.poisson.pmf(ys, m) if phi == 0 else stats.nbinom.pmf(ys, 1 / phi,
                                                                        1 / (1 + phi * m))
        d = 2 * (xlogy(ys, ys / m) - (ys - m)) if phi == 0 else 2 * (
            xlogy(ys, ys / m) - (ys + 1 / phi) * np.log((ys + 1 / phi) / (m + 1 / phi)))
        return p @ d

    expected = np.array([[expected_unit(m) for m in row] for row in mu]).sum(axis=1) - 3
    np.testing.assert_allclose(info["expected"], expected, rtol=2e-3)


def test_blocks_sparse_and_dense_agree(two_depths, monkeypatch):
    y, x, lib, s, _ = two_depths
    full = spot_fit_quality(y, x, s, library=lib)
    monkeypatch.setattr(_fit_quality, "_BLOCK", 37)
    blocked = spot_fit_quality(y.toarray(), x, s, library=lib)
    np.testing.assert_allclose(blocked[0], full[0], rtol=1e-12)
    np.testing.assert_array_equal(blocked[1], full[1])
    assert blocked[2]["dispersion"] == pytest.approx(full[2]["dispersion"], rel=1e-12)


def test_empty_spot_is_not_scored(two_depths):
    y, x, lib, s, _ = two_depths
    y = y.tolil()
    y[0, :] = 0
    lib = lib.copy()
    lib[0] = 0
    score, flag, info = spot_fit_quality(y.tocsr(), x, s, library=lib)
    assert np.isnan(score[0]) and not flag[0]
    assert info["n_scored"] == y.shape[0] - 1


def test_inputs_not_modified(two_depths):
    y, x, lib, s, _ = two_depths
    copies = y.copy(), x.copy(), lib.copy(), s.copy()
    spot_fit_quality(y, x, s, library=lib)
    for before, after in zip(copies, (y, x, lib, s), strict=True):
        a = before.toarray() if sparse.issparse(before) else before
        b = after.toarray() if sparse.issparse(after) else after
        np.testing.assert_array_equal(a, b)


# --- bad input -------------------------------------------------------------------------------


def _small():
    rng = np.random.default_rng(4)
    s = signatures(3, 20, rng)
    y, x = simulate(s, np.full(10, 500.0), rng)
    return sparse.csr_matrix(y), x, s


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda y, x, s: (y, x[:-1], s, {}), "x has 9 rows but counts has 10 spots"),
        (lambda y, x, s: (y, x, s[:, :-1], {}), "signature has 19 genes but counts has 20"),
        (lambda y, x, s: (y, x, s[:-1], {}), "signature has 2 rows but x has 3 columns"),
        (lambda y, x, s: (y, x, s, {"library": np.ones(3)}), "library has 3 entries"),
        (lambda y, x, s: (-y, x, s, {}), "counts contain negative values"),
        (lambda y, x, s: (y, -x, s, {}), "compositions x contain negative"),
        (lambda y, x, s: (y, np.where(x > 0.5, np.nan, x), s, {}), "compositions x contain NaN"),
        (lambda y, x, s: (y.toarray() * np.nan, x, s, {}), "counts contain NaN"),
        (lambda y, x, s: (y, x, np.full_like(s, np.inf), {}), "signatures contain NaN or inf"),
        (lambda y, x, s: (y, x, s, {"library": np.full(10, -1.0)}), "library sizes contain neg"),
        (lambda y, x, s: (y, x[:, 0], s, {}), "x must be a 2-D array"),
        (lambda y, x, s: (y, x, s, {"dispersion": -0.1}), "dispersion must be None"),
        (lambda y, x, s: (y, x, s, {"dispersion": np.nan}), "dispersion must be None"),
        (lambda y, x, s: (y, x, s, {"n_mads": 0}), "n_mads must be a finite number > 0"),
    ],
)
def test_bad_input_raises(change, match):
    y, x, s, kwargs = change(*_small())
    with pytest.raises(InputError, match=match):
        spot_fit_quality(y, x, s, **kwargs)


@pytest.mark.parametrize("phi", [0.0, 0.3])
def test_compiled_sums_equal_table_lookup_on_every_branch(phi):
    """The compiled row sums equal the NumPy table lookup, also for means below the table
    (counted as 0), above it (1/µ expansion) and floored means under a count."""
    rng = np.random.default_rng(5)
    n, g = 700, 30  # more than one thread's rows
    mu = np.exp(rng.uniform(np.log(1e-12), np.log(5e4), size=(n, g)))
    mu[0, :3] = [0.0, 1e-9, 2e3]
    counts = rng.poisson(np.minimum(mu, 1e4)).astype(float)
    counts[0, 0] = 2.0  # a count where the mean is 0: floored, finite
    y = sparse.csr_matrix(counts)
    grid, table, e_inf = _fit_quality._expected_deviance_table(phi)
    x, s, lib = mu, np.eye(g), np.ones(n)  # µ = lib · x S = mu
    dev, expected = _fit_quality._deviance_and_expectation(y, x, s, lib, phi, grid, table, e_inf)
    dense = y.toarray()
    safe = np.maximum(mu, _fit_quality._MU_FLOOR)
    ref_dev = (_fit_quality._zero_deviance(mu, phi).sum(1)
               + (np.where(dense > 0, _fit_quality._unit_deviance(dense, safe, phi)
                           - _fit_quality._zero_deviance(safe, phi), 0.0)).sum(1))
    ref_expected = _fit_quality._expected(mu, grid, table, e_inf).sum(1)
    assert np.all(np.isfinite(dev))
    np.testing.assert_allclose(dev, ref_dev, rtol=1e-10)
    np.testing.assert_allclose(expected, ref_expected, rtol=1e-12)


def test_small_panel_with_many_states_scores_every_spot():
    """33 osmFISH genes, the full reference (35 cell states over 11 types): counting each
    non-zero state as a fitted parameter would leave no degrees of freedom (the demo once
    scored 1 of 1,036 spots); counting the types present scores every spot with counts."""
    from spotlens.datasets import osmfish_cortex
    from spotlens.deconv import deconvolve

    spatial, reference = osmfish_cortex()
    spatial = spatial[:300].copy()
    deconvolve(spatial, reference, labels_key="cell_type", lambda_spatial=0.0, progress=False)
    assert spatial.uns["proportions_spotlens"]["params"]["n_states"] > spatial.n_vars
    score = spatial.obs["proportions_spotlens_fit_score"].to_numpy()
    assert np.isfinite(score).all()
    # a model the data fit: the typical spot scores about 1
    assert 0.7 < np.median(score) < 1.5


def test_n_parameters_replaces_the_count_of_nonzero_entries(two_depths):
    y, x, lib, s, _ = two_depths
    p = np.count_nonzero(x > 0, axis=1)
    default = spot_fit_quality(y, x, s, library=lib, dispersion=0.0)[2]["expected"]
    fewer = spot_fit_quality(y, x, s, library=lib, dispersion=0.0,
                             n_parameters=p - 1.0)[2]["expected"]
    np.testing.assert_allclose(fewer, default + 1.0)


@pytest.mark.parametrize(("value", "match"), [
    (np.ones(3), r"n_parameters has shape \(3,\)"),
    (np.full(10, -1.0), "n_parameters contain negative"),
    (np.full(10, np.nan), "n_parameters contain NaN"),
])
def test_bad_n_parameters_raise(value, match):
    y, x, s = _small()
    with pytest.raises(InputError, match=match):
        spot_fit_quality(y, x, s, n_parameters=value)

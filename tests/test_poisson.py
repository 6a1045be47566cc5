"""The count-likelihood solver: oracle, monotone objective, smoothing, CV and the adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, sparse

from spotlens._validation import InputError
from spotlens.deconv import deconvolve
from spotlens.deconv._graph import edge_weights, knn
from spotlens.deconv._count_fit import cross_validate_counts
from spotlens.deconv._poisson import CountProblem, solve_counts


def _problem(n_spots=60, n_genes=40, n_types=4, depth=300.0, seed=0):
    """Counts drawn from the model itself, with the composition they were drawn from."""
    rng = np.random.default_rng(seed)
    s_bar = rng.gamma(0.5, 1.0, size=(n_types, n_genes))
    s_bar /= s_bar.sum(axis=1, keepdims=True)
    x = rng.dirichlet(np.full(n_types, 0.7), size=n_spots)
    mean = depth * x @ s_bar
    counts = sparse.csr_matrix(rng.poisson(mean).astype(np.float64))
    return CountProblem.from_counts(counts, s_bar), x


def _graph(n_spots, k=4):
    side = int(np.ceil(np.sqrt(n_spots)))
    coords = np.column_stack([np.arange(n_spots) % side, np.arange(n_spots) // side]).astype(float)
    dist, idx = knn(coords, k, None)
    return edge_weights(dist, idx, 0.5, None)


def test_matches_an_independent_poisson_fit_per_spot():
    problem, _ = _problem(n_spots=5)
    res = solve_counts(problem, n_iter=2000, tol=1e-12)
    y = problem.counts.toarray()
    for i in range(5):
        n_i = problem.library[i]

        def nll(v, i=i, n_i=n_i):
            mu = n_i * (v @ problem.s_bar)
            return float((mu - y[i] * np.log(np.maximum(mu, 1e-300))).sum())

        oracle = optimize.minimize(nll, np.full(4, 0.25), method="L-BFGS-B",
                                   bounds=[(0, None)] * 4, options={"ftol": 1e-14, "gtol": 1e-10})
        assert nll(res.x[i]) <= oracle.fun + 1e-6 * abs(oracle.fun)
        np.testing.assert_allclose(res.x[i], oracle.x, atol=2e-3)


def test_objective_never_increases_with_smoothing_and_states():
    problem, _ = _problem(n_spots=64, n_types=6, seed=1)
    owner = np.array([0, 0, 1, 1, 2, 2])  # two states per type
    res = solve_counts(problem, w=_graph(64), penalty_ridge=0.1 * problem.scale,
                       penalty_spatial=0.05 * problem.scale, owner=owner, n_iter=300, tol=1e-10)
    steps = np.diff(res.objective)
    assert (steps <= 1e-9 * abs(res.objective[0])).all()
    assert res.objective[-1] < res.objective[0]


def test_kkt_conditions_without_penalties():
    problem, _ = _problem(seed=2)
    res = solve_counts(problem, n_iter=3000, tol=1e-13)
    x = res.x
    mu = problem.library[:, None] * (x @ problem.s_bar)
    y = problem.counts.toarray()
    grad = problem.library[:, None] * ((1.0 - y / np.maximum(mu, 1e-300)) @ problem.s_bar.T)
    active = x > 1e-3 * x.max(axis=1, keepdims=True)
    scale = problem.library[:, None] * np.ones_like(x)
    assert np.abs(grad[active] / scale[active]).max() < 1e-3  # stationary where positive
    assert (grad[~active] / scale[~active] > -1e-3).all()  # no descent direction at the bound


def test_recovers_the_composition_it_was_drawn_from():
    problem, truth = _problem(n_spots=200, depth=2000.0, seed=3)
    res = solve_counts(problem)
    est = res.x / res.x.sum(axis=1, keepdims=True)
    assert np.corrcoef(est.ravel(), truth.ravel())[0, 1] > 0.97


def test_smoothing_makes_neighbours_agree():
    problem, _ = _problem(n_spots=64, depth=100.0, seed=4)
    w = _graph(64)
    lap = sparse.diags(np.asarray(w.sum(axis=1)).ravel()) - w

    def roughness(lam):
        x = solve_counts(problem, w=w, penalty_spatial=lam * problem.scale, tol=1e-9).x
        return float(np.trace(x.T @ (lap @ x)))

    assert roughness(0.1) < roughness(0.01) < roughness(0.0)


def test_held_out_deviance_is_zero_only_for_a_perfect_prediction():
    problem, truth = _problem(n_spots=30, seed=5)
    exact = CountProblem.from_counts(
        sparse.csr_matrix(problem.library[:, None] * (truth @ problem.s_bar)), problem.s_bar
    )
    assert exact.held_out_deviance(truth) == pytest.approx(0.0, abs=1e-8)
    wrong = np.roll(truth, 1, axis=1)
    assert exact.held_out_deviance(wrong) > 1.0


def test_cross_validation_smooths_noisy_smooth_tissue_and_not_a_mosaic():
    rng = np.random.default_rng(6)
    side = 12
    n = side * side
    s_bar = rng.gamma(0.5, 1.0, size=(3, 50))
    s_bar /= s_bar.sum(axis=1, keepdims=True)
    w = _graph(n)
    smooth = np.repeat(np.array([[0.7, 0.2, 0.1]]), n, axis=0)  # one composition everywhere
    mosaic = np.eye(3)[rng.integers(0, 3, n)]  # each spot a different pure type
    chosen = {}
    for name, x in (("smooth", smooth), ("mosaic", mosaic)):
        counts = sparse.csr_matrix(rng.poisson(40.0 * x @ s_bar).astype(float))
        _, lam, table = cross_validate_counts(
            counts, s_bar, w, owner=None, ridge_grid=(0.0,), spatial_grid=(0.0, 0.01, 0.1, 1.0),
            n_folds=2, seed=0, n_iter=200, tol=1e-5,
        )
        assert table.error.notna().any()
        chosen[name] = lam
    assert chosen["smooth"] > 0
    assert chosen["mosaic"] < chosen["smooth"]


def test_deconvolve_records_the_likelihood_and_rejects_bad_values(synthetic):
    st, ref = synthetic.spatial, synthetic.reference
    auto = deconvolve(st, ref, inplace=False, progress=False)
    assert auto.uns["params"]["likelihood"] == "quasi_poisson"
    np.testing.assert_allclose(auto.proportions.sum(axis=1), 1.0)
    truth = synthetic.true_proportions.loc[st.obs_names, auto.proportions.columns].to_numpy()
    assert np.corrcoef(auto.proportions.to_numpy().ravel(), truth.ravel())[0, 1] > 0.9
    with pytest.raises(InputError, match="likelihood must be"):
        deconvolve(st, ref, likelihood="nb", progress=False)
    with pytest.raises(InputError, match="likelihood='gaussian' on a GPU"):
        deconvolve(st, ref, likelihood="poisson", device="torch", progress=False)


LYMPH = (Path(__file__).resolve().parents[2] / "shared" / "data" / "spacexr_lymphnode_visium"
         / "sc_reference.h5ad")


def test_deconvolve_flags_spots_of_a_type_the_reference_lacks():
    """End to end on the missing-type case: B_Plasma in the spots, not in the reference."""
    if not LYMPH.exists():
        pytest.skip(f"shared lymph-node reference not found at {LYMPH}")
    import anndata as ad

    from spotlens.datasets import pseudo_spots

    spatial, half = pseudo_spots(
        ad.read_h5ad(LYMPH), n_spots=400, regions=("dominant",) * 5 + ("diverse",),
        library_size=2_000, exclude_from_reference=("B_Plasma",), seed=2,
    )
    share = spatial.obsm["proportions_true"]["B_Plasma"].to_numpy()
    deconvolve(spatial, half, progress=False)
    key = "proportions_spotlens"
    score = spatial.obs[f"{key}_fit_score"].to_numpy()
    flag = spatial.obs[f"{key}_poorly_fit"].to_numpy()
    missing = share > 0.5
    assert missing.sum() >= 20
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(missing, score) > 0.9
    assert flag[missing].mean() > 5 * max(flag[~missing].mean(), 0.01)
    assert "threshold" in spatial.uns[key]["fit_quality"]


def test_auto_keeps_poisson_on_a_targeted_panel(synthetic, monkeypatch):
    """Quasi-Poisson needs many genes to estimate their dispersions; a small panel keeps Poisson."""
    import spotlens.deconv._run as api

    st, ref = synthetic.spatial, synthetic.reference
    res = deconvolve(st, ref, inplace=False, progress=False, fit_quality=False)
    n_genes = len(res.uns["genes"])
    assert res.uns["params"]["likelihood"] == "quasi_poisson"
    monkeypatch.setattr(api, "QUASI_MIN_GENES", n_genes + 1)
    res = deconvolve(st, ref, inplace=False, progress=False, fit_quality=False)
    assert res.uns["params"]["likelihood"] == "poisson"


def test_auto_choices_follow_the_slide_size(synthetic, monkeypatch):
    import spotlens.deconv._run as api

    st, ref = synthetic.spatial, synthetic.reference
    monkeypatch.setattr(api, "COUNT_MAX_SPOTS", st.n_obs - 1)
    monkeypatch.setattr(api, "FIT_QUALITY_MAX_SPOTS", st.n_obs - 1)
    res = deconvolve(st, ref, inplace=False, progress=False)
    assert res.uns["params"]["likelihood"] == "gaussian"
    assert res.uns["params"]["fit_quality"] is False
    assert res.fit_score.isna().all() and not res.poorly_fit.any()
    forced = deconvolve(st, ref, inplace=False, progress=False, fit_quality=True,
                        likelihood="poisson")
    assert forced.uns["params"]["likelihood"] == "poisson"
    assert forced.fit_score.notna().all()
    with pytest.raises(InputError, match="fit_quality must be"):
        deconvolve(st, ref, fit_quality="yes", progress=False)


# --- quasi-Poisson data term (gene weights from the dispersion) -----------------------------


def _scattered_problem(n_spots=300, n_genes=60, n_types=4, depth=2000.0, seed=3):
    """Counts with gene-wise extra-Poisson scatter: a gamma factor per spot and gene whose
    spread differs by gene (half the genes Poisson, half widely scattered)."""
    rng = np.random.default_rng(seed)
    s_bar = rng.gamma(0.5, 1.0, size=(n_types, n_genes))
    s_bar /= s_bar.sum(axis=1, keepdims=True)
    x = rng.dirichlet(np.full(n_types, 0.7), size=n_spots)
    phi = np.where(np.arange(n_genes) % 2 == 0, 0.0, 0.6)
    mean = depth * x @ s_bar
    gamma = rng.gamma(1.0 / np.maximum(phi, 1e-9), np.maximum(phi, 1e-9), size=mean.shape)
    counts = rng.poisson(mean * np.where(phi > 0, gamma, 1.0)).astype(np.float64)
    return sparse.csr_matrix(counts), s_bar, x, phi


def test_weighted_fit_matches_an_independent_fit_and_never_increases():
    counts, s_bar, _, _ = _scattered_problem(n_spots=6, seed=4)
    weight = np.linspace(0.05, 1.0, s_bar.shape[1])
    problem = CountProblem.from_counts(counts, s_bar, weight)
    res = solve_counts(problem, n_iter=3000, tol=1e-13)
    assert (np.diff(res.objective) <= 1e-9 * abs(res.objective[0])).all()
    y = counts.toarray()
    for i in range(6):
        n_i = problem.library[i]

        def nll(v, i=i, n_i=n_i):
            mu = n_i * (v @ s_bar)
            return float((weight * (mu - y[i] * np.log(np.maximum(mu, 1e-300)))).sum())

        oracle = optimize.minimize(nll, np.full(4, 0.25), method="L-BFGS-B",
                                   bounds=[(0, None)] * 4, options={"ftol": 1e-15, "gtol": 1e-10})
        assert nll(res.x[i]) <= oracle.fun + 1e-7 * abs(oracle.fun)
        np.testing.assert_allclose(res.x[i], oracle.x, atol=3e-3)


def test_equal_weights_give_the_poisson_fit():
    problem, _ = _problem(n_spots=30, seed=5)
    weighted = CountProblem.from_counts(problem.counts, problem.s_bar, np.full(40, 0.3))
    a = solve_counts(problem, n_iter=500, tol=1e-12).x
    b = solve_counts(weighted, n_iter=500, tol=1e-12).x
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    # the penalties' scale follows the weights, so a unit-free penalty means the same
    assert weighted.scale == pytest.approx(0.3 * problem.scale)


def test_gene_dispersion_separates_scattered_genes_and_shrinks_sparse_ones():
    from spotlens.deconv._dispersion import gene_dispersion

    counts, s_bar, x, phi = _scattered_problem()
    lib = np.asarray(counts.sum(axis=1)).ravel()
    truth = lib[:, None] * (x @ s_bar)
    est = gene_dispersion(counts, lambda lo, hi: truth[lo:hi])
    scattered, plain = est[phi > 0], est[phi == 0]
    assert np.median(scattered) > 0.35 and np.median(plain) < 0.05
    assert scattered.min() > plain.max()
    # at very low depth the raw estimates are noise: shrinkage pulls them together
    thin = counts.multiply(0.02).tocsr()
    thin.data = np.random.default_rng(0).poisson(thin.data).astype(np.float64)
    low = gene_dispersion(thin, lambda lo, hi: 0.02 * truth[lo:hi])
    assert np.std(low) < np.std(est)


def test_dispersion_weights_fit_scattered_data_better_than_poisson():
    """On counts whose genes scatter unevenly, down-weighting the scattered genes helps."""
    from spotlens.deconv._count_fit import with_dispersion

    counts, s_bar, x, phi = _scattered_problem(n_spots=400, seed=6)
    plain = CountProblem.from_counts(counts, s_bar)
    weighted, start = with_dispersion(plain, owner=None)
    assert np.median(weighted.weight[phi > 0]) < 0.5 * np.median(weighted.weight[phi == 0])
    assert (start > 0).all()
    po = solve_counts(plain, n_iter=2000, tol=1e-10).x
    qp = solve_counts(weighted, x0=start, n_iter=2000, tol=1e-10).x
    err = [np.abs(v / v.sum(1, keepdims=True) - x).mean() for v in (po, qp)]
    assert err[1] < 0.9 * err[0]


@pytest.mark.parametrize("weighted", [False, True])
def test_dense_and_sparse_passes_agree(monkeypatch, weighted):
    """Dense counts go through matrix products, sparse ones through the compiled pass: the
    statistics, the held-out deviance and the fit must not depend on which one ran."""
    import spotlens.deconv._poisson as poisson

    base, _ = _problem(n_spots=300, n_genes=50, depth=200.0, seed=7)
    weight = np.linspace(0.2, 1.0, 50) if weighted else None
    x = np.random.default_rng(1).random((300, 4))
    out = {}
    for path, density in (("dense", 0.0), ("sparse", 2.0)):
        monkeypatch.setattr(poisson, "DENSE_MIN_DENSITY", density)
        problem = CountProblem.from_counts(base.counts, base.s_bar, weight)
        assert (problem._dense is None) == (path == "sparse")
        acc, loglik = problem.statistics(x)
        acc_fast, zeros = problem.statistics(x, loglik=False)
        np.testing.assert_array_equal(acc_fast, acc)
        assert not zeros.any()
        fit = solve_counts(problem, w=_graph(300), penalty_spatial=0.05 * problem.scale,
                           n_iter=200, tol=1e-9)
        out[path] = acc, loglik, problem.held_out_deviance(x), fit.x
    for dense, sparse_ in zip(out["dense"][:3], out["sparse"][:3], strict=True):
        np.testing.assert_allclose(dense, sparse_, rtol=1e-9, atol=1e-12)
    # rounding differs, so the iterates do too, but both reach the one minimum
    np.testing.assert_allclose(out["dense"][3], out["sparse"][3], atol=2e-5)
    # the dense copy is never made for sparse counts or beyond its size cap
    monkeypatch.setattr(poisson, "DENSE_MIN_DENSITY", 0.4)
    thin = CountProblem.from_counts(sparse.random(100, 200, density=0.05, random_state=0,
                                                  format="csr"), base.s_bar[:, :1].repeat(200, 1))
    assert thin._dense is None
    monkeypatch.setattr(poisson, "DENSE_MAX_ENTRIES", 10)
    assert CountProblem.from_counts(base.counts, base.s_bar)._dense is None

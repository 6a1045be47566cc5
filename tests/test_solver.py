"""The pure solver kernel: oracle, monotonicity, optimality, backends."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import nnls

from spotlens.deconv._graph import color_graph, default_alpha, edge_weights, knn
from spotlens.deconv._ops import TorchOps
from spotlens.deconv._solver import solve


def _problem(n=150, n_types=5, n_genes=40, seed=0):
    """Non-negative signatures, spots = non-negative mixtures + noise, a kNN graph."""
    rng = np.random.default_rng(seed)
    s = rng.gamma(1.0, 1.0, size=(n_types, n_genes))
    x_true = rng.gamma(0.7, 1.0, size=(n, n_types)) * (rng.random((n, n_types)) < 0.6)
    y = np.maximum(x_true @ s + rng.normal(0, 0.5, size=(n, n_genes)), 0)
    xy = rng.uniform(0, 100, size=(n, 2))
    dist, idx = knn(xy, 6)
    w = edge_weights(dist, idx, default_alpha(dist), None)
    return y, s, w, color_graph(w, seed=0)


def _stats(y, s):
    return y @ s.T, s @ s.T, float((y * y).sum())


def _dense_objective(x, y, s, w, lam_r, lam_s):
    lap = np.diag(np.asarray(w.sum(axis=1)).ravel()) - w.toarray()
    return (
        np.sum((y - x @ s) ** 2) + lam_r * np.sum(x**2) + lam_s * np.trace(x.T @ lap @ x)
    )


def test_no_penalty_equals_scipy_nnls_per_spot():
    y, s, w, colors = _problem(n=60)
    b, gram, yy = _stats(y, s)
    res = solve(b, gram, yy, n_iter=5000, tol=1e-13)
    assert res.converged
    expected = np.stack([nnls(s.T, y[i])[0] for i in range(len(y))])
    np.testing.assert_allclose(res.x, expected, atol=1e-8)
    assert (expected == 0).sum() > 10  # the oracle has active constraints, not just lstsq
    # a graph that is present but weighted 0 changes nothing
    res_w = solve(b, gram, yy, w=w, colors=colors, penalty_spatial=0.0, n_iter=5000, tol=1e-13)
    np.testing.assert_array_equal(res_w.x, res.x)


def test_objective_never_increases_and_matches_dense_formula():
    y, s, w, colors = _problem()
    b, gram, yy = _stats(y, s)
    lam_r, lam_s = 0.3, 2.0
    x0 = np.random.default_rng(9).gamma(1.0, 2.0, size=b.shape)  # far from the optimum
    res = solve(b, gram, yy, w=w, colors=colors, penalty_ridge=lam_r, penalty_spatial=lam_s,
                x0=x0, n_iter=60, tol=1e-14)
    obj = res.objective
    assert len(obj) == res.n_sweeps + 1 and res.n_sweeps > 10
    assert obj[0] == pytest.approx(_dense_objective(x0, y, s, w, lam_r, lam_s), rel=1e-10)
    assert obj[-1] == pytest.approx(_dense_objective(res.x, y, s, w, lam_r, lam_s), rel=1e-10)
    steps = np.diff(obj)
    assert np.all(steps <= 1e-10 * abs(obj[0])), steps.max()
    assert obj[-1] < 0.5 * obj[0]


def test_kkt_conditions_at_convergence_with_both_penalties():
    y, s, w, colors = _problem(seed=1)
    b, gram, yy = _stats(y, s)
    lam_r, lam_s = 0.5, 3.0
    res = solve(b, gram, yy, w=w, colors=colors, penalty_ridge=lam_r, penalty_spatial=lam_s,
                n_iter=3000, tol=1e-12)
    assert res.converged
    x = res.x
    lap = np.diag(np.asarray(w.sum(axis=1)).ravel()) - w.toarray()
    grad = 2 * (x @ gram - b + lam_r * x + lam_s * lap @ x)
    scale = np.abs(b).max()
    assert np.all(x >= 0)
    assert (x == 0).sum() > 20 and (x > 0).sum() > 20  # both kinds of coordinates present
    assert grad.min() >= -1e-6 * scale  # dual feasibility
    np.testing.assert_allclose(grad[x > 0], 0, atol=1e-6 * scale)  # stationarity on the support
    assert np.abs(x * grad).max() <= 1e-6 * scale * max(1.0, x.max())  # complementary slackness


@pytest.mark.parametrize(
    ("dtype", "tol", "atol"),
    [("float64", 1e-9, 1e-8), ("float32", 1e-6, 1e-5)],
    ids=["float64", "float32"],
)
def test_torch_cpu_matches_numpy(dtype, tol, atol):
    pytest.importorskip("torch")
    y, s, w, colors = _problem(n=80, seed=2)
    b, gram, yy = _stats(y, s)
    kwargs = dict(w=w, colors=colors, penalty_ridge=0.2, penalty_spatial=1.5, n_iter=300)
    ref = solve(b, gram, yy, tol=1e-12, **kwargs)
    out = solve(b, gram, yy, tol=tol, ops=TorchOps("cpu", dtype), **kwargs)
    assert ref.converged and out.converged
    assert out.x.dtype == np.float64 and out.x.shape == ref.x.shape
    # max error relative to the largest entry of the solution
    np.testing.assert_allclose(out.x, ref.x, rtol=0, atol=atol * ref.x.max())
    assert out.objective[-1] == pytest.approx(ref.objective[-1], rel=atol)


def test_zero_spot_gets_zero_without_smoothing():
    y, s, w, colors = _problem(n=40, seed=3)
    y[7] = 0
    b, gram, yy = _stats(y, s)
    x0 = np.ones_like(b)  # start it away from zero
    for lam_r in (0.0, 0.5):
        res = solve(b, gram, yy, penalty_ridge=lam_r, x0=x0, n_iter=200, tol=1e-10)
        assert np.all(res.x[7] == 0)
        assert res.x[np.arange(40) != 7].sum() > 0
    # with smoothing it borrows from its neighbours instead
    res = solve(b, gram, yy, w=w, colors=colors, penalty_spatial=1.0, n_iter=500, tol=1e-10)
    assert res.x[7].sum() > 0


def test_solve_does_not_modify_its_inputs():
    y, s, w, colors = _problem(n=30, seed=4)
    b, gram, yy = _stats(y, s)
    x0 = np.full_like(b, 0.5)
    copies = [a.copy() for a in (b, gram, x0)]
    w_before = w.copy()
    solve(b, gram, yy, w=w, colors=colors, penalty_spatial=1.0, x0=x0, n_iter=5)
    for a, c in zip((b, gram, x0), copies, strict=True):
        np.testing.assert_array_equal(a, c)
    assert (w != w_before).nnz == 0


def _state_metric(n_states, n_types, seed=0):
    """``P = M Mᵀ`` for a random 0/1 map ``M`` of states to types (each type has a state)."""
    rng = np.random.default_rng(seed)
    owner = np.concatenate([np.arange(n_types), rng.integers(n_types, size=n_states - n_types)])
    m = np.eye(n_types)[owner]
    return m @ m.T


def test_state_metric_objective_matches_dense_formula_and_descends():
    y, s, w, colors = _problem(n=120, n_types=7, seed=5)
    b, gram, yy = _stats(y, s)
    metric = _state_metric(7, 3)
    lap = np.diag(np.asarray(w.sum(axis=1)).ravel()) - w.toarray()
    lam_r, lam_s = 0.2, 2.5
    res = solve(b, gram, yy, w=w, colors=colors, penalty_ridge=lam_r, penalty_spatial=lam_s,
                metric=metric, n_iter=400, tol=1e-12)
    x = res.x
    dense = (np.sum((y - x @ s) ** 2) + lam_r * np.sum(x**2)
             + lam_s * np.trace(metric @ x.T @ lap @ x))
    assert res.objective[-1] == pytest.approx(dense, rel=1e-10)
    assert np.all(np.diff(res.objective) <= 1e-10 * abs(res.objective[0]))
    # KKT of the metric problem: the gradient vanishes on the support, is ≥ 0 off it
    grad = 2 * (x @ gram - b + lam_r * x + lam_s * lap @ x @ metric)
    scale = np.abs(b).max()
    assert grad.min() >= -1e-6 * scale
    np.testing.assert_allclose(grad[x > 0], 0, atol=1e-6 * scale)


def test_threads_do_not_change_the_answer():
    # big enough that each colour class is split over threads
    y, s, w, colors = _problem(n=3000, n_types=6, n_genes=30, seed=6)
    b, gram, yy = _stats(y, s)
    kwargs = dict(w=w, colors=colors, penalty_ridge=0.1, penalty_spatial=1.0, n_iter=15, tol=0.0,
                  metric=_state_metric(6, 4))
    one = solve(b, gram, yy, n_threads=1, **kwargs)
    two = solve(b, gram, yy, n_threads=2, **kwargs)
    np.testing.assert_array_equal(one.x, two.x)
    np.testing.assert_allclose(one.objective, two.objective, rtol=1e-12)

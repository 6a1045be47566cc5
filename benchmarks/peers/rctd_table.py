"""Compute RCTD's Poisson–lognormal likelihood table locally, once (instead of downloading it).

rctd-py 0.4.0 (``rctd._likelihood.load_cached_q_matrices``) loads a 404 MB file
``q_matrices.npz`` from a GitHub release the first time it runs; this machine cannot reach
GitHub. The file holds, as NumPy arrays:

- ``X_vals``: the grid of expected counts lambda, shape ``(439,)``, from 1e-4 to 1600, with the
  non-uniform spacing that ``rctd._likelihood._calc_q_all_impl`` indexes into (spacexr's
  ``X_vals``). We take it from ``rctd._likelihood.build_x_vals`` so the indexing matches.
- ``Q_<s>`` for s in ``rctd._sigma.SIGMA_ALL`` (10..70 by 1, 72..200 by 2: 126 values, sigma =
  s / 100): ``Q[k, i] = log P(Y = k | lambda = X_vals[i], sigma)`` for k = 0 .. K_val + 2 with
  ``K_val = 1000`` (``RCTDConfig.K_val``), shape ``(1003, 439)``, float64.

The model (Cable et al., Nat Biotechnol 40, 517–526 (2022), spacexr ``prob_model.R::get_Q``)::

    P(Y = k | lambda, sigma) = ∫ Poisson(k; lambda · e^y) · p_sigma(y) dy,
    p_sigma(y) = h(y / sigma) / sigma,

with h the heavy-tailed density of spacexr ``ht_pdf_norm``: a standard normal for |z| < 3 and
``a / (|z| − 7/3)^2`` beyond (``a = 4/9 · e^{−9/2} / sqrt(2π)``), renormalised to integrate to 1.
spacexr integrates with a Riemann sum on y = −20 .. 20 in steps of 4e-3 (10,001 points), floors
the probability at 1e-300 and stores its log; we compute exactly that sum. Since the Poisson
factor does not depend on sigma, the sum for all 126 sigmas is one matrix product per lambda
(1003 × 10001 Poisson terms times 10001 × 126 prior weights): ~6.5 min on 2 shared cores,
instead of the 5·10^11 exponentials of the per-sigma loop.

Validation (printed, and the script fails if it does not hold):

1. against rctd-py's own port of ``get_Q`` (``rctd._likelihood._get_q_single``) for a few
   (k, sigma) rows: the same Riemann sum computed the other way round;
2. against direct adaptive numerical integration (``scipy.integrate.quad``) of the integral
   above at a few (k, lambda, sigma) where the probability is not negligible;
3. end to end: counts simulated as Poisson(lambda · e^{sigma·z}), z ~ N(0, 1), for sigma = 0.3,
   0.6, 1.0; the sigma on the table's grid maximising rctd's own spline-interpolated likelihood
   (``_calc_q_all_impl``) must be the true one (±0.05).

The output is written atomically to ``OUT/q_matrices.npz``. rctd-py reads it through its
documented environment variable ``RCTD_Q_MATRICES`` (a file, or a folder holding
``q_matrices.npz``), which the runner ``run_rctd.py`` sets; nothing in the package is patched.

Usage (in the rctd venv)::

    python benchmarks/peers/rctd_table.py --out ~/.cache/spotlens/peers/rctd
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import integrate
from scipy.special import gammaln
from scipy.stats import norm

N_Y = 5000  # y grid: (-N_Y .. N_Y) * GAMMA_STEP, as in spacexr get_Q
GAMMA_STEP = 4e-3
FLOOR = 1e-300


def ht_pdf_norm(z: np.ndarray) -> np.ndarray:
    """spacexr's heavy-tailed density (normal core, inverse-square tails beyond |z| = 3)."""
    z = np.asarray(z, dtype=np.float64)
    a = 4.0 / 9.0 * np.exp(-9.0 / 2.0) / np.sqrt(2.0 * np.pi)
    c = 7.0 / 3.0
    const = 1.0 / ((a / (3.0 - c) - norm.cdf(-3.0)) * 2.0 + 1.0)
    az = np.abs(z)
    with np.errstate(divide="ignore"):
        tail = const * a / (az - c) ** 2
    return np.where(az < 3.0, const * np.exp(-(z**2) / 2.0) / np.sqrt(2.0 * np.pi), tail)


def q_tables(x_vals: np.ndarray, sigmas: np.ndarray, k_max: int) -> np.ndarray:
    """Log-likelihood tables for all sigmas.

    Returns ``Q`` of shape ``n_sigmas × (k_max + 1) × n_lambda`` with
    ``Q[s, k, i] = log max(Σ_j Poisson(k; x_i e^{y_j}) p_s(y_j) Δ, 1e-300)``.
    """
    y = np.arange(-N_Y, N_Y + 1) * GAMMA_STEP  # n_y
    prior = np.stack([np.maximum(ht_pdf_norm(y / s) / s, FLOOR) for s in sigmas], axis=1)
    prior *= GAMMA_STEP  # n_y × n_sigmas
    k = np.arange(k_max + 1, dtype=np.float64)[:, None]
    lgk = gammaln(k + 1)
    ey = np.exp(y)[None, :]
    out = np.empty((len(sigmas), k_max + 1, len(x_vals)))
    for i, x in enumerate(x_vals):
        log_pois = k * (np.log(x) + y)[None, :] - x * ey - lgk  # (k_max+1) × n_y
        probs = np.exp(log_pois) @ prior  # (k_max+1) × n_sigmas
        out[:, :, i] = np.log(np.maximum(probs, FLOOR)).T
    return out


def direct(k: int, x: float, sigma: float) -> float:
    """P(Y = k | lambda = x, sigma) by adaptive quadrature over y in [-20, 20]."""
    def f(yy: float) -> float:
        return float(np.exp(k * (np.log(x) + yy) - x * np.exp(yy) - gammaln(k + 1))
                     * ht_pdf_norm(yy / sigma) / sigma)
    lim = N_Y * GAMMA_STEP
    pts = sorted({p for p in (-3 * sigma, 3 * sigma, np.log(max(k, 0.5) / x)) if -lim < p < lim})
    val, _ = integrate.quad(f, -lim, lim, points=pts, limit=500, epsabs=0, epsrel=1e-10)
    return val


def validate(tables: dict[str, np.ndarray], x_vals: np.ndarray) -> list[str]:
    """Check entries against rctd-py's own get_Q port and against quadrature; return failures."""
    from rctd._likelihood import _get_q_single

    bad = []
    for s, k in [(10, 0), (37, 3), (100, 1), (100, 25), (150, 200), (200, 1000)]:
        ours = tables[f"Q_{s}"][k]
        ref = np.log(np.maximum(_get_q_single(x_vals, k, s / 100.0), FLOOR))
        live = ref > -600  # away from the 1e-300 floor, where subnormal rounding differs
        err = float(np.max(np.abs(ours[live] - ref[live]))) if live.any() else 0.0
        print(f"  vs rctd _get_q_single  sigma={s / 100:.2f} k={k:4d}: max |dlog| = {err:.2e} "
              f"over {int(live.sum())} lambdas")
        if err > 1e-8:
            bad.append(f"get_Q sigma={s} k={k} err={err:.2e}")
    for s, k, x in [(100, 0, 0.5), (100, 5, 3.0), (50, 1, 0.01), (84, 40, 30.0),
                    (150, 300, 200.0), (20, 10, 10.0), (200, 2, 1000.0)]:
        i = int(np.argmin(np.abs(x_vals - x)))
        xi = float(x_vals[i])
        q = direct(k, xi, s / 100.0)
        ours = float(tables[f"Q_{s}"][k, i])
        err = abs(ours - np.log(q))
        print(f"  vs quadrature  sigma={s / 100:.2f} k={k:4d} lambda={xi:9.4f}: "
              f"table {ours:10.6f}  quad {np.log(q):10.6f}  |dlog| = {err:.1e}")
        if err > 1e-4:
            bad.append(f"quad sigma={s} k={k} lambda={xi} err={err:.2e}")
    # The table recovers sigma from simulated Poisson-lognormal counts (rctd's own interpolation).
    import torch
    from rctd._likelihood import _calc_q_all_impl, compute_spline_coefficients

    rng = np.random.default_rng(0)
    lam = np.exp(rng.uniform(np.log(0.05), np.log(50), 100_000))
    grid = list(range(10, 71, 5)) + list(range(80, 201, 10))
    for true in (0.3, 0.6, 1.0):
        y = rng.poisson(lam * np.exp(true * rng.standard_normal(lam.size)))
        y = torch.tensor(y, dtype=torch.float64)
        nll = []
        for s in grid:
            q = tables[f"Q_{s}"]
            sq = compute_spline_coefficients(q, x_vals)
            d0 = _calc_q_all_impl(y, torch.tensor(lam), torch.tensor(q), torch.tensor(sq),
                                  torch.tensor(x_vals))[0]
            nll.append(-float(d0.sum()))
        got = grid[int(np.argmin(nll))] / 100
        print(f"  simulated Poisson-lognormal counts, sigma {true}: maximum-likelihood sigma "
              f"on the table {got}")
        if abs(got - true) > 0.05:
            bad.append(f"sigma recovery true={true} got={got}")
    # Probabilities over k sum to ~1 where lambda is small enough that k <= 1002 holds the mass.
    for s in (30, 100, 200):
        tot = np.exp(tables[f"Q_{s}"]).sum(axis=0)
        xi = int(np.searchsorted(x_vals, 10.0))
        print(f"  sum_k P(k | lambda={x_vals[xi]:.2f}, sigma={s / 100:.2f}) = {tot[xi]:.6f}")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for q_matrices.npz")
    parser.add_argument("--k-val", type=int, default=1000, help="RCTDConfig.K_val (rows - 3)")
    parser.add_argument("--force", action="store_true", help="recompute even if present")
    parser.add_argument("--validate-only", action="store_true",
                        help="only check an existing OUT/q_matrices.npz")
    args = parser.parse_args(argv)
    from rctd._likelihood import build_x_vals
    from rctd._sigma import SIGMA_ALL

    dest = args.out / "q_matrices.npz"
    if args.validate_only:
        with np.load(dest) as f:
            tables = {k: f[k] for k in f.files}
        bad = validate(tables, tables.pop("X_vals"))
        print("VALIDATION FAILED:\n  " + "\n  ".join(bad) if bad else "validation passed")
        return 1 if bad else 0
    if dest.exists() and not args.force:
        print(f"{dest} exists; --force to recompute")
        return 0
    x_vals = build_x_vals()
    t0 = time.perf_counter()
    q = q_tables(x_vals, SIGMA_ALL / 100.0, args.k_val + 2)
    tables = {f"Q_{int(s)}": q[n] for n, s in enumerate(SIGMA_ALL)}
    print(f"computed {len(tables)} tables {q.shape[1:]} in {time.perf_counter() - t0:.0f} s")
    bad = validate(tables, x_vals)
    if bad:
        print("VALIDATION FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / ".q_matrices.tmp.npz"
    np.savez(tmp, X_vals=x_vals, **tables)
    os.replace(tmp, dest)
    print(f"wrote {dest} ({dest.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compiled row sums of :mod:`spotlens.deconv._fit_quality` (numba when present).

:func:`_row_deviance_sums` visits each fitted mean ``µ_ig`` of a block of spots once and adds
to its spot both ``d(0, µ_ig)`` (the deviance the entry would have with no count) and the
expected unit deviance ``E_φ[d(Y, µ_ig)]`` (linear interpolation in ``log µ`` on the table's
uniform grid, the ``1/µ`` expansion above it, 0 below it); then the spot's non-zero counts
correct the first sum to ``d(y, µ)``. The same sums as the NumPy expressions in
:func:`spotlens.deconv._fit_quality._deviance_and_expectation`, without the temporaries.
"""

from __future__ import annotations

import numpy as np

from ._ops import jit


def _row_deviance_sums(mu, indptr, indices, data, phi, poisson, mu_min, mu_max, mu_floor,
                       log_lo, step, table, e_inf, deviance, expected, lo, hi):
    """Per row ``i`` of ``lo:hi``: ``deviance[i] = Σ_g d(y_ig, µ_ig)``, ``expected[i] = Σ_g E[d]``.

    ``mu``: ``n_rows × n_genes`` fitted means; ``indptr, indices, data``: the rows' counts
    (CSR); ``table``: ``E_φ[d]`` at ``log µ = log_lo + j · step``.
    """
    n_genes = mu.shape[1]
    last = table.shape[0] - 1
    r = 0.0 if poisson else 1.0 / phi
    for i in range(lo, hi):
        dev = 0.0
        exp_sum = 0.0
        for g in range(n_genes):
            m = mu[i, g]
            if poisson:
                dev += 2.0 * m
            else:
                dev += (2.0 / phi) * np.log1p(phi * m)
            if m > mu_max:
                exp_sum += e_inf + (table[last] - e_inf) * mu_max / m
            elif m >= mu_min:
                pos = (np.log(m) - log_lo) / step
                left = int(np.floor(pos))
                if left < 0:
                    left = 0
                elif left > last - 1:
                    left = last - 1
                frac = pos - left
                if frac < 0.0:
                    frac = 0.0
                elif frac > 1.0:
                    frac = 1.0
                exp_sum += table[left] * (1.0 - frac) + table[left + 1] * frac
        for p in range(indptr[i], indptr[i + 1]):
            y = data[p]
            m = mu[i, indices[p]]
            if m < mu_floor:
                m = mu_floor
            ylog = y * np.log(y / m) if y > 0 else 0.0
            if poisson:
                dev += 2.0 * (ylog - (y - m)) - 2.0 * m
            else:
                dev += (2.0 * (ylog - (y + r) * np.log1p((y - m) / (m + r)))
                        - (2.0 / phi) * np.log1p(phi * m))
        deviance[i] = dev
        expected[i] = exp_sum


_row_deviance_sums = jit(_row_deviance_sums)

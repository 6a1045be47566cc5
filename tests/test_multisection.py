"""Several sections in one AnnData (``library_key``): one fit, no graph edge between sections.

Real data: two blocks of osmFISH pseudo-spots (the bundled example, real counts), one from each
half of the cortex section, moved onto the same coordinates, so that every spot of one section
lies exactly on a spot of the other. A graph that ignored the sections would link them there.
"""

from __future__ import annotations

import numpy as np
import pytest

from spotlens._validation import InputError
from spotlens.datasets import osmfish_cortex
from spotlens.deconv import deconvolve
from spotlens.deconv._graph import knn

KEY = "proportions_spotlens"
N_PER_SECTION = 150
# fixed penalties: "auto" would choose them on both sections together (a shared choice)
FIT = {"labels_key": "cell_type", "lambda_ridge": 0.01, "lambda_spatial": 0.1,
       "progress": False}
TIGHT = {"tol": 1e-9, "n_iter": 3000}  # converge to the unique optimum, whatever the path


@pytest.fixture(scope="module")
def two_sections():
    st, ref = osmfish_cortex()
    blocks = []
    for half in ("left", "right"):
        idx = np.flatnonzero(st.obs["half"].to_numpy() == half)
        xy = st.obsm["spatial"][idx]
        centre = np.median(xy, axis=0)
        blocks.append(np.sort(idx[np.argsort(np.linalg.norm(xy - centre, axis=1))
                                  [:N_PER_SECTION]]))
    both = st[np.concatenate(blocks)].copy()
    both.obs["section"] = ["A"] * N_PER_SECTION + ["B"] * N_PER_SECTION
    xy = both.obsm["spatial"].copy()
    b = both.obs["section"].to_numpy() == "B"
    # B moved onto A: the same 50 µm grid, so many spots of B sit exactly on spots of A
    xy[b] += 50 * np.round((np.median(xy[~b], axis=0) - np.median(xy[b], axis=0)) / 50)
    both.obsm["spatial"] = xy
    return both, ref


def _sections(adata):
    return adata.obs["section"].to_numpy()


def test_sections_overlap_exactly(two_sections):
    """The fixture is what the tests claim: the two sections share coordinates."""
    st, _ = two_sections
    sec = _sections(st)
    a = {tuple(p) for p in st.obsm["spatial"][sec == "A"]}
    b = {tuple(p) for p in st.obsm["spatial"][sec == "B"]}
    assert len(a & b) > N_PER_SECTION // 2


def test_no_graph_edge_links_two_sections(two_sections):
    st, ref = two_sections
    sec = _sections(st)
    # attention re-estimated during the fit: the graph written is the last one used
    fitted = st.copy()
    deconvolve(fitted, ref, library_key="section", attention_update_every=5, n_iter=20,
               cells_per_state=None, **FIT)
    w = fitted.obsp[f"{KEY}_connectivities"]
    rows, cols = w.nonzero()
    assert len(rows) > 0
    assert np.all(sec[rows] == sec[cols])
    # every spot keeps neighbours in its own section
    assert np.all(np.asarray((w > 0).sum(axis=1)).ravel() >= 1)
    assert fitted.uns[KEY]["params"]["library_key"] == "section"
    # without the sections, the same coordinates and k would link them
    _, idx = knn(st.obsm["spatial"], fitted.uns[KEY]["params"]["k_neighbors"])
    assert np.sum(sec[idx] != sec[:, None]) > N_PER_SECTION


@pytest.mark.parametrize(
    ("use_attention", "likelihood", "atol"),
    # least squares to 1e-6; the count likelihood's MM steps approach coordinates near 0
    # slowly, so it agrees to its solver precision (measured 3e-4)
    [(False, "gaussian", 1e-6), (True, "gaussian", 1e-6),
     pytest.param(True, "poisson", 1e-3, marks=pytest.mark.slow)],
)
def test_fitting_sections_together_equals_fitting_them_apart(
    two_sections, use_attention, likelihood, atol
):
    """Equal up to the shared hyperparameters: the penalties, and alpha (one distance scale)."""
    st, ref = two_sections
    sec = _sections(st)
    together = deconvolve(st, ref, library_key="section", use_attention=use_attention,
                          likelihood=likelihood, inplace=False, **FIT, **TIGHT)
    alpha = together.uns["params"]["alpha"]
    for name in ("A", "B"):
        m = sec == name
        alone = deconvolve(st[m].copy(), ref, use_attention=use_attention, alpha=alpha,
                           likelihood=likelihood, inplace=False, **FIT, **TIGHT)
        # the same graph, edge for edge (attention embedding fitted per section)
        diff = together.connectivities[m][:, m] - alone.connectivities
        assert abs(diff).max() < 1e-12
        # the same optimum (the solver visits spots in another order, hence a tolerance)
        np.testing.assert_allclose(together.proportions[m].to_numpy(),
                                   alone.proportions.to_numpy(), atol=atol)
        cells = alone.abundance.to_numpy()  # cells per spot: the same precision, relative
        np.testing.assert_allclose(together.abundance[m].to_numpy(), cells,
                                   atol=atol * max(1.0, cells.max()))


def test_library_key_bad_input(two_sections):
    st, ref = two_sections
    with pytest.raises(InputError, match="no obs column 'slide'"):
        deconvolve(st, ref, library_key="slide", **FIT)
    broken = st.copy()
    broken.obs.loc[broken.obs_names[0], "section"] = None
    with pytest.raises(InputError, match="missing section labels"):
        deconvolve(broken, ref, library_key="section", **FIT)

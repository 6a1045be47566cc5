"""Cell-level step: cell_level, assign_cells and cell_type_expression on planted cells.

Every spot of the synthetic pair is the exact sum of the counts of a known set of 2–6 reference
cells (like the bundled osmFISH example), so which cells a spot holds is known exactly.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import spotlens
from spotlens._validation import InputError
from spotlens.deconv import (
    CellLevelResult,
    assign_cells,
    cell_level,
    cell_type_expression,
    deconvolve,
)

N_TYPES, PER_TYPE, N_GENES = 5, 40, 60
WEIGHTS, COUNTS, ABUNDANCE = "cell_weights_spotlens", "cell_counts_spotlens", "abundance_spotlens"
# a fast, deterministic type-level fit: no spatial term (spots are not spatially coherent)
FIT = {"lambda_ridge": 0.01, "lambda_spatial": 0.0, "n_iter": 50, "cells_per_state": None,
       "progress": False}


def make_planted(seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """Reference of 5 types × 40 cells and spots summing 2–6 distinct reference cells each.

    Each type has a log-normal profile with 8 marker genes (8× up); each cell scales it gene by
    gene by its own log-normal factor (σ = 0.5) and draws Poisson counts of 40–120 per cell.
    Every reference cell is in exactly one spot (``reference.obs["spot"]``); the spot's counts
    are the sum of its cells' counts, ``spatial.obs["n_cells"]`` how many.
    """
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.0, size=(N_TYPES, N_GENES))
    for k in range(N_TYPES):
        base[k, 8 * k: 8 * (k + 1)] *= 8.0
    base /= base.sum(axis=1, keepdims=True)
    codes = np.repeat(np.arange(N_TYPES), PER_TYPE)
    profile = base[codes] * rng.lognormal(0.0, 0.5, size=(len(codes), N_GENES))
    profile /= profile.sum(axis=1, keepdims=True)
    x = rng.poisson(profile * rng.uniform(40, 120, size=len(codes))[:, None]).astype(np.float32)
    types = [f"T{k}" for k in range(N_TYPES)]
    genes = pd.Index([f"g{g:02d}" for g in range(N_GENES)])
    reference = ad.AnnData(
        sparse.csr_matrix(x),
        obs=pd.DataFrame({"cell_type": pd.Categorical([types[c] for c in codes])},
                         index=[f"cell{i:03d}" for i in range(len(codes))]),
        var=pd.DataFrame(index=genes),
    )
    order, groups = rng.permutation(len(codes)), []
    while len(order) >= 2:
        n = min(int(rng.integers(2, 7)), len(order))
        groups.append(order[:n])
        order = order[n:]
    names = [f"spot{i:02d}" for i in range(len(groups))]
    side = int(np.ceil(np.sqrt(len(groups))))
    spatial = ad.AnnData(
        sparse.csr_matrix(np.vstack([x[g].sum(axis=0) for g in groups])),
        obs=pd.DataFrame({"n_cells": [len(g) for g in groups]}, index=names),
        var=pd.DataFrame(index=genes),
    )
    spatial.obsm["spatial"] = np.array([[i % side, i // side] for i in range(len(groups))],
                                       dtype=float) * 100.0
    spot = np.full(len(codes), "", dtype=object)
    for name, g in zip(names, groups, strict=True):
        spot[g] = name
    reference.obs["spot"] = spot
    true_counts = pd.crosstab(reference.obs["spot"], reference.obs["cell_type"]).loc[names]
    spatial.obsm["true_cell_counts"] = true_counts.rename_axis(index=None, columns=None)
    return spatial, reference


@pytest.fixture(scope="module")
def _fitted():
    spatial, reference = make_planted()
    deconvolve(spatial, reference, **FIT)
    return spatial, reference


@pytest.fixture
def pair(_fitted):
    """Fresh copies of the planted pair after the type-level fit."""
    spatial, reference = _fitted
    return spatial.copy(), reference.copy()


def top_cell_recall(spatial, reference, weights) -> np.ndarray:
    """Per spot: fraction of its n true cells among its n highest-weighted (positive) cells."""
    w = sparse.csr_matrix(weights).toarray()
    spot = reference.obs["spot"].to_numpy()
    out = []
    for i, (name, n) in enumerate(zip(spatial.obs_names, spatial.obs["n_cells"], strict=True)):
        positive = np.flatnonzero(w[i] > 0)
        top = positive[np.argsort(-w[i, positive], kind="stable")[:n]]
        out.append(np.mean(np.isin(np.flatnonzero(spot == name), top)))
    return np.asarray(out)


def type_of_column(reference) -> np.ndarray:
    return reference.obs["cell_type"].astype(str).to_numpy()


# --- recovery and consistency ---------------------------------------------------------------


def test_planted_cells_are_recovered(pair):
    spatial, reference = pair
    cell_level(spatial, reference, progress=False)
    recall = top_cell_recall(spatial, reference, spatial.obsm[WEIGHTS])
    truth = spatial.obsm["true_cell_counts"]
    n = spatial.obs["n_cells"].to_numpy()
    # baselines: n random reference cells; n_k random cells of each true type k (types known)
    random = np.mean(n / reference.n_obs)
    type_oracle = np.mean((truth.to_numpy() ** 2 / PER_TYPE).sum(axis=1) / n)
    assert random < 0.025 and type_oracle < 0.06
    # measured 0.92–0.97 over seeds 0–9; knowing each spot's types exactly gives ~0.04
    assert recall.mean() > 0.85
    assert recall.mean() > 10 * type_oracle
    # and the cells per type are nearly exact (measured MAE 0.03–0.06 cells over seeds 0–9);
    # shuffling the weights among each spot's candidates drops the recall to ~0.1
    counts = spatial.obsm[COUNTS][truth.columns]
    assert np.abs(counts.to_numpy() - truth.to_numpy()).mean() < 0.15


def test_large_lambda_type_ties_each_types_weights_to_its_abundance(pair):
    spatial, reference = pair
    cell_level(spatial, reference, lambda_type=100.0, progress=False)
    abundance = spatial.obsm[ABUNDANCE]
    onehot = pd.get_dummies(type_of_column(reference))[abundance.columns].to_numpy(float)
    per_type = spatial.obsm[WEIGHTS] @ onehot
    present = abundance.to_numpy() >= 0.1  # types below min_abundance get no candidates
    assert present.sum() > 2 * len(abundance)
    # measured max deviation 0.005 cells at lambda_type=100 (0.04 at 10, 0.2 at 1)
    np.testing.assert_allclose(per_type[present], abundance.to_numpy()[present], atol=0.02)
    assert (per_type[~present] == 0).all()


def test_known_cells_per_spot_set_the_counts_and_the_cells_placed(pair):
    spatial, reference = pair
    rng = np.random.default_rng(1)
    # not the truth, so the counts must follow the column rather than the estimate
    nuclei = spatial.obs["n_cells"].to_numpy() + rng.integers(0, 3, spatial.n_obs)
    spatial.obs["n_nuclei"] = nuclei
    cell_level(spatial, reference, cells_per_spot="n_nuclei", progress=False)
    counts = spatial.obsm[COUNTS]
    np.testing.assert_array_equal(counts.sum(axis=1).to_numpy(), nuclei)
    assert counts.dtypes.map(pd.api.types.is_integer_dtype).all() and (counts >= 0).all().all()

    cells = assign_cells(spatial, reference, spot_diameter=40.0)
    placed = cells.obs.groupby("spot", observed=False).size().reindex(spatial.obs_names)
    np.testing.assert_array_equal(placed.to_numpy(), nuclei)
    by_type = pd.crosstab(cells.obs["spot"], cells.obs["cell_type"]).reindex(
        index=spatial.obs_names, columns=counts.columns, fill_value=0)
    np.testing.assert_array_equal(by_type.to_numpy(), counts.to_numpy())
    centre = spatial.obsm["spatial"][spatial.obs_names.get_indexer(cells.obs["spot"])]
    distance = np.linalg.norm(cells.obsm["spatial"] - centre, axis=1)
    assert distance.max() <= 40.0 / 2 + 1e-9
    assert cells.uns["spot_diameter"] == 40.0


def test_a_spot_without_counts_gets_no_made_up_cells(caplog):
    """Its types are unknown: it gets 0 cells (logged), never one of each type."""
    spatial, reference = make_planted()
    x = spatial.X.toarray()
    x[3] = 0
    spatial.X = sparse.csr_matrix(x)
    deconvolve(spatial, reference, **FIT)
    spatial.obs["n_nuclei"] = 8
    with caplog.at_level(logging.WARNING, logger="spotlens"):
        cell_level(spatial, reference, cells_per_spot="n_nuclei", progress=False)
    totals = spatial.obsm[COUNTS].sum(axis=1).to_numpy()
    assert totals[3] == 0 and (np.delete(totals, 3) == 8).all()
    assert "1 spots have a cell count in obs['n_nuclei'] but no estimate" in caplog.text
    placed = assign_cells(spatial, reference).obs["spot"].astype(str)
    assert "spot03" not in set(placed) and placed.value_counts().eq(8).all()


# --- spots smaller than a cell ------------------------------------------------------------------

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CEREBELLUM = "spacexr_cerebellum_slideseq"


def make_beads(seed: int = 0, keep: float = 0.05) -> tuple[ad.AnnData, ad.AnnData]:
    """The planted pair with each spot's counts thinned to ``keep`` (binomial): beads that
    capture a small part of their cells, so the estimated cells per spot are well below 1.
    Spot 3 has no counts at all."""
    spatial, reference = make_planted(seed)
    rng = np.random.default_rng(seed + 100)
    x = rng.binomial(spatial.X.toarray().astype(np.int64), keep).astype(np.float32)
    x[3] = 0
    spatial.X = sparse.csr_matrix(x)
    return spatial, reference


def test_spots_smaller_than_a_cell_get_one_cell_of_their_most_likely_type(caplog):
    """Estimated below one cell (as on Slide-seq): one cell per spot with counts, none without;
    never an empty result."""
    spatial, reference = make_beads()
    deconvolve(spatial, reference, **FIT)
    has_counts = np.asarray(spatial.X.sum(axis=1)).ravel() > 0
    estimate = spatial.obsm[ABUNDANCE].sum(axis=1).to_numpy()
    assert has_counts.sum() == spatial.n_obs - 1
    # below one cell everywhere, mostly below 0.5 (rounded, as before, to 0 cells)
    assert estimate[has_counts].max() < 1 and np.median(estimate[has_counts]) < 0.5
    with caplog.at_level(logging.WARNING, logger="spotlens"):
        cell_level(spatial, reference, progress=False)
    assert f"{spatial.n_obs - 1} of {spatial.n_obs - 1} spots with counts are estimated below " \
        "one cell" in caplog.text
    counts = spatial.obsm[COUNTS]
    np.testing.assert_array_equal(counts.sum(axis=1).to_numpy(), has_counts.astype(int))
    assert spatial.uns[WEIGHTS]["params"]["n_spots_raised_to_one_cell"] == spatial.n_obs - 1
    # the cell is of a type that is really in the spot (chance: the spot's share of 5 types)
    truth = spatial.obsm["true_cell_counts"][counts.columns].to_numpy()
    chosen = counts.to_numpy().argmax(axis=1)[has_counts]
    hit = truth[has_counts][np.arange(has_counts.sum()), chosen] > 0
    chance = ((truth[has_counts] > 0).sum(axis=1) / N_TYPES).mean()
    # measured 0.98–1.0 over seeds 0–5, chance 0.55–0.63
    assert hit.mean() > 0.85 and hit.mean() > chance + 0.25
    # each placed cell is a fitted candidate of the spot (weight > 0), one per spot with counts
    cells = assign_cells(spatial, reference)
    assert cells.n_obs == has_counts.sum()
    assert set(cells.obs["spot"].astype(str)) == set(spatial.obs_names[has_counts])
    assert (cells.obs["weight"] > 0).all()


def test_known_cells_per_spot_of_zero_everywhere_is_an_error(pair):
    spatial, reference = pair
    spatial.obs["n_nuclei"] = 0.3  # rounds to 0 in every spot
    with pytest.raises(InputError, match=r"0 cells in every spot.*cells_per_spot=.*"
                                         r"--cells-per-spot"):
        cell_level(spatial, reference, cells_per_spot="n_nuclei", progress=False)


def test_no_spot_with_counts_is_an_error_not_an_empty_result(pair):
    spatial, reference = pair
    spatial.X = sparse.csr_matrix(spatial.shape, dtype=np.float32)  # the fit came from other data
    with pytest.raises(InputError, match=r"No cell could be placed in any spot.*cells_per_spot="
                                         r".*--cells-per-spot"):
        cell_level(spatial, reference, progress=False)


def test_real_slideseq_beads_get_cells():
    """spacexr's Slide-seq cerebellum: 100 beads of ~120 UMI, estimated at ~0.13 cells each."""
    if not (REAL / CEREBELLUM).is_dir():
        pytest.skip(f"real data not found: {REAL / CEREBELLUM}")
    spatial, reference = spotlens.datasets.load_pair(CEREBELLUM, str(REAL))
    deconvolve(spatial, reference, progress=False)
    assert spatial.obsm[ABUNDANCE].sum(axis=1).median() < 0.5
    cell_level(spatial, reference, progress=False)
    counts = spatial.obsm[COUNTS]
    assert (counts.sum(axis=1) == 1).all()  # every bead has counts: one cell each
    per_type = counts.sum(axis=0)
    assert per_type.idxmax() == "Granule" and per_type["Granule"] >= 30  # measured 47 of 100
    # the cell is the bead's most likely type (measured 96 of 100 agree with the top proportion)
    top = spatial.obsm["proportions_spotlens"].idxmax(axis=1)
    assert (counts.idxmax(axis=1) == top).mean() > 0.85
    cells = assign_cells(spatial, reference)
    assert cells.n_obs == spatial.n_obs and (cells.obs["weight"] > 0).all()


# --- backed AnnData -----------------------------------------------------------------------------


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("backed", ["spatial", "reference", "both"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_backed_inputs_give_the_in_memory_result(pair, tmp_path, backed, dense):
    """An AnnData read with backed="r" (X on disk) works and gives the same numbers; the files
    are not written to and only the documented keys change."""
    spatial, reference = pair
    if dense:
        spatial.X, reference.X = spatial.X.toarray(), reference.X.toarray()
    expected = cell_level(spatial, reference, inplace=False, progress=False)
    paths = {"spatial": tmp_path / "st.h5ad", "reference": tmp_path / "ref.h5ad"}
    spotlens.io.write_h5ad(spatial, paths["spatial"])
    spotlens.io.write_h5ad(reference, paths["reference"])
    digests = {name: sha256(path) for name, path in paths.items()}
    on_disk = {name: ad.read_h5ad(path, backed="r") if backed in (name, "both") else
               ad.read_h5ad(path) for name, path in paths.items()}
    st, ref = on_disk["spatial"], on_disk["reference"]
    assert (backed in ("spatial", "both")) == st.isbacked
    assert (backed in ("reference", "both")) == ref.isbacked
    obsm_before, uns_before = set(st.obsm.keys()), set(st.uns.keys())

    result = cell_level(st, ref, inplace=False, progress=False)
    assert (result.weights != expected.weights).nnz == 0
    pd.testing.assert_frame_equal(result.cell_counts, expected.cell_counts)
    cell_level(st, ref, progress=False)
    assert set(st.obsm.keys()) == obsm_before | {WEIGHTS, COUNTS}
    assert set(st.uns.keys()) == uns_before | {WEIGHTS}

    cell_level(spatial, reference, progress=False)
    a, b = assign_cells(st, ref), assign_cells(spatial, reference)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_array_equal(sparse.csr_matrix(a.X).toarray(),
                                  sparse.csr_matrix(b.X).toarray())
    pd.testing.assert_frame_equal(cell_type_expression(st, ref, ["g01", "g30"]),
                                  cell_type_expression(spatial, reference, ["g01", "g30"]))
    for adata in on_disk.values():
        if adata.isbacked:
            adata.file.close()
    assert {name: sha256(path) for name, path in paths.items()} == digests


def test_backed_spatial_counts_are_still_validated(pair, tmp_path):
    spatial, reference = pair
    spatial.X = spatial.X * 0.5  # not raw counts
    spotlens.io.write_h5ad(spatial, tmp_path / "st.h5ad")
    st = ad.read_h5ad(tmp_path / "st.h5ad", backed="r")
    with pytest.raises(InputError, match="spatial counts holds non-integer values"):
        cell_level(st, reference, progress=False)
    st.file.close()


# --- assign_cells and cell_type_expression ---------------------------------------------------


def test_assign_cells_places_copies_of_reference_cells(pair):
    spatial, reference = pair
    cell_level(spatial, reference, progress=False)
    cells = assign_cells(spatial, reference)
    assert list(cells.obs.columns) == ["spot", "cell_type", "source_cell", "weight"]
    assert cells.obsm["spatial"].shape == (cells.n_obs, 2)
    assert cells.var_names.equals(reference.var_names)
    source = reference.obs_names.get_indexer(cells.obs["source_cell"])
    assert (source >= 0).all()
    np.testing.assert_array_equal(cells.obs["cell_type"].astype(str).to_numpy(),
                                  type_of_column(reference)[source])
    np.testing.assert_array_equal(cells.X.toarray(), reference.X[source].toarray())
    # the source cell's weight in its spot is what obs["weight"] reports
    w = spatial.obsm[WEIGHTS].toarray()
    rows = spatial.obs_names.get_indexer(cells.obs["spot"])
    np.testing.assert_allclose(cells.obs["weight"].to_numpy(), w[rows, source])
    # the planted spots are recovered at the level of the placed cells too
    hits = (reference.obs["spot"].to_numpy()[source] == cells.obs["spot"].astype(str)).mean()
    assert hits > 0.8


def test_cell_type_expression_splits_weights_times_counts(pair):
    spatial, reference = pair
    cell_level(spatial, reference, progress=False)
    genes = ["g03", "g17", "g42"]
    expression = cell_type_expression(spatial, reference, genes)
    assert expression.columns.names == ["gene", "cell_type"]
    assert len(expression.columns) == len(genes) * N_TYPES
    x = reference[:, genes].X.toarray()
    w = spatial.obsm[WEIGHTS]
    total = expression.T.groupby(level="gene").sum().T[genes].to_numpy()
    np.testing.assert_allclose(total, w @ x, rtol=1e-10)
    # each type's part comes from that type's cells only
    in_t2 = type_of_column(reference) == "T2"
    np.testing.assert_allclose(expression.xs("T2", axis=1, level="cell_type")[genes],
                               w[:, in_t2] @ x[in_t2], rtol=1e-10)


# --- memory and metacells ----------------------------------------------------------------------


def test_weights_are_sparse_with_few_candidates_per_type(pair):
    spatial, reference = pair
    result = cell_level(spatial, reference, n_candidates=3, inplace=False, progress=False)
    w = result.weights
    assert sparse.issparse(w) and w.format == "csr"
    assert w.shape == (spatial.n_obs, reference.n_obs)
    n_present = (spatial.obsm[ABUNDANCE].to_numpy() >= 0.1).sum(axis=1)
    assert (np.diff(w.indptr) <= 3 * n_present).all()
    assert (w.data > 0).all()


def test_metacells_summarise_a_large_reference(pair):
    spatial, reference = pair
    cell_level(spatial, reference, max_cells=50, progress=False)
    info = spatial.uns[WEIGHTS]
    metacell, columns = np.asarray(info["metacell"]), np.asarray(info["columns"]).astype(str)
    w = spatial.obsm[WEIGHTS]
    assert info["params"]["metacells"]
    assert 5 <= len(columns) < reference.n_obs and w.shape == (spatial.n_obs, len(columns))
    assert metacell.shape == (reference.n_obs,) and (metacell >= 0).all()
    assert set(metacell) == set(range(len(columns)))  # every metacell has members
    labels = type_of_column(reference)
    for m, name in enumerate(columns):  # one type per metacell, named "<type>#<rank>"
        assert set(labels[metacell == m]) == {name.rsplit("#", 1)[0]}
    cells = assign_cells(spatial, reference)
    source = reference.obs_names.get_indexer(cells.obs["source_cell"])
    assert (source >= 0).all()
    np.testing.assert_array_equal(cells.obs["cell_type"].astype(str).to_numpy(), labels[source])
    np.testing.assert_array_equal(
        cells.obs.groupby("spot", observed=False).size().reindex(spatial.obs_names).to_numpy(),
        spatial.obsm[COUNTS].sum(axis=1).to_numpy(),
    )


# --- mutation rule -----------------------------------------------------------------------------


def snapshot(adata):
    return {
        "obs": adata.obs.copy(), "X": adata.X.copy(), "obsm": set(adata.obsm.keys()),
        "uns": set(adata.uns.keys()), "layers": set(adata.layers.keys()),
        "var": adata.var.copy(),
    }


def assert_unchanged(adata, before, *, new_obsm=(), new_uns=()):
    pd.testing.assert_frame_equal(adata.obs, before["obs"])
    pd.testing.assert_frame_equal(adata.var, before["var"])
    assert (adata.X != before["X"]).nnz == 0
    assert set(adata.obsm.keys()) == before["obsm"] | set(new_obsm)
    assert set(adata.uns.keys()) == before["uns"] | set(new_uns)
    assert set(adata.layers.keys()) == before["layers"]


def test_inplace_false_returns_the_result_and_changes_nothing(pair):
    spatial, reference = pair
    st_before, ref_before = snapshot(spatial), snapshot(reference)
    props = spatial.obsm["proportions_spotlens"].copy()
    result = cell_level(spatial, reference, inplace=False, progress=False)
    assert isinstance(result, CellLevelResult)
    assert result.weights.shape == (spatial.n_obs, reference.n_obs)
    assert list(result.cell_counts.index) == list(spatial.obs_names)
    assert set(result.uns) == {"params", "columns", "metacell"}
    assert_unchanged(spatial, st_before)
    assert_unchanged(reference, ref_before)
    pd.testing.assert_frame_equal(spatial.obsm["proportions_spotlens"], props)

    # the same numbers as the in-place run
    assert cell_level(spatial, reference, progress=False) is None
    assert (spatial.obsm[WEIGHTS] != result.weights).nnz == 0
    pd.testing.assert_frame_equal(spatial.obsm[COUNTS], result.cell_counts)


def test_inplace_writes_only_the_documented_keys(pair):
    spatial, reference = pair
    st_before, ref_before = snapshot(spatial), snapshot(reference)
    cell_level(spatial, reference, key_added="cw_test", progress=False)
    assert_unchanged(spatial, st_before, new_obsm={"cw_test", "cw_test_cell_counts"},
                     new_uns={"cw_test"})
    assert_unchanged(reference, ref_before)
    # assign_cells and cell_type_expression read only
    st_mid = snapshot(spatial)
    assign_cells(spatial, reference, key="cw_test")
    cell_type_expression(spatial, reference, ["g00"], key="cw_test")
    assert_unchanged(spatial, st_mid)
    assert_unchanged(reference, ref_before)


def test_result_survives_an_h5ad_round_trip(pair, tmp_path):
    spatial, reference = pair
    cell_level(spatial, reference, progress=False)
    spotlens.io.write_h5ad(spatial, tmp_path / "st.h5ad")
    back = ad.read_h5ad(tmp_path / "st.h5ad")
    assert (sparse.csr_matrix(back.obsm[WEIGHTS]) != spatial.obsm[WEIGHTS]).nnz == 0
    assert list(back.uns[WEIGHTS]["columns"]) == list(reference.obs_names)
    assert np.asarray(back.uns[WEIGHTS]["metacell"]).dtype.kind == "i"
    a, b = assign_cells(spatial, reference), assign_cells(back, reference)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])


# --- bad input ----------------------------------------------------------------------------------


def test_cell_level_needs_the_type_level_result_first():
    spatial, reference = make_planted()
    with pytest.raises(InputError, match=r"Run spotlens\.deconv\.deconvolve"):
        cell_level(spatial, reference, progress=False)


def test_cell_level_rejects_a_result_from_another_reference(pair):
    spatial, reference = pair
    reference.obs["cell_type"] = reference.obs["cell_type"].cat.rename_categories({"T0": "X"})
    with pytest.raises(InputError, match="comes from another reference"):
        cell_level(spatial, reference, progress=False)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (None, "no obs column 'n_nuclei'"),
        (lambda n: np.array(["3"] * n, dtype=object), "must be numeric"),
        (lambda n: np.r_[-1.0, np.full(n - 1, 3.0)], "negative, NaN or infinite"),
        (lambda n: np.r_[np.nan, np.full(n - 1, 3.0)], "negative, NaN or infinite"),
    ],
    ids=["missing", "strings", "negative", "nan"],
)
def test_cell_level_rejects_bad_cells_per_spot(pair, values, message):
    spatial, reference = pair
    if values is not None:
        spatial.obs["n_nuclei"] = values(spatial.n_obs)
    with pytest.raises(InputError, match=message):
        cell_level(spatial, reference, cells_per_spot="n_nuclei", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_candidates": 0}, r"n_candidates must be an integer ≥ 1, got 0"),
        ({"n_candidates": 2.5}, r"n_candidates must be an integer"),
        ({"lambda_type": -1}, r"lambda_type must be a number ≥ 0, got -1"),
        ({"lambda_similar": float("nan")}, r"lambda_similar must be a number ≥ 0"),
    ],
)
def test_cell_level_rejects_bad_parameters(pair, kwargs, message):
    spatial, reference = pair
    with pytest.raises(InputError, match=message):
        cell_level(spatial, reference, progress=False, **kwargs)


def test_assign_cells_and_expression_need_cell_level_first(pair):
    spatial, reference = pair
    with pytest.raises(InputError, match=r"Run spotlens\.deconv\.cell_level first"):
        assign_cells(spatial, reference)
    with pytest.raises(InputError, match=r"Run spotlens\.deconv\.cell_level first"):
        cell_type_expression(spatial, reference, ["g00"])


def test_assign_cells_rejects_another_reference_and_bad_diameter(pair):
    spatial, reference = pair
    cell_level(spatial, reference, progress=False)
    with pytest.raises(InputError, match="not the one cell_level used"):
        assign_cells(spatial, reference[:-1].copy())
    with pytest.raises(InputError, match="spot_diameter must be > 0"):
        assign_cells(spatial, reference, spot_diameter=0)


def test_cell_type_expression_rejects_unknown_genes(pair):
    spatial, reference = pair
    cell_level(spatial, reference, progress=False)
    with pytest.raises(InputError, match=r"Genes not in the reference: \['Actb'\]"):
        cell_type_expression(spatial, reference, ["g00", "Actb"])


# --- kernel oracle -------------------------------------------------------------------------------


def test_gauss_seidel_weights_match_an_nnls_oracle():
    """solve_cell_weights against scipy's NNLS on the same objective written as least squares.

    Per spot: rows ``C`` (weighted, library-scaled candidate profiles) against ``y``;
    ``√(λ_ridge s) I``; per type ``√(λ_type s) 1ᵀ`` against ``√(λ_type s) A_ik``; per same-type
    pair ``√(λ_similar s K) (e_c − e_c')`` against 0 (so the sum is ``βᵀ L β``).
    """
    from scipy.optimize import nnls

    from spotlens.deconv._cell_search import embed, fit_score_space, search_cells
    from spotlens.deconv._cells import solve_cell_weights

    rng = np.random.default_rng(0)
    n, n_genes, n_cells, n_types = 4, 30, 24, 3
    profiles = rng.poisson(rng.lognormal(1, 1, (n_cells, n_genes))).astype(float)
    cell_type = np.repeat(np.arange(n_types), n_cells // n_types)
    embedding = rng.normal(size=(n_cells, 4))
    spots = profiles[rng.choice(n_cells, (n, 3))].sum(axis=1)
    counts = sparse.csr_matrix(rng.poisson(spots).astype(float))
    gene_w = rng.uniform(0.5, 2.0, n_genes)
    abundance = rng.uniform(0.5, 2.0, (n, n_types))
    space = fit_score_space(profiles)
    cand = search_cells(embed(counts, space), embed(profiles, space), cell_type,
                        abundance >= 0.1, n_candidates=5)
    assert cand.shape == (n, 15) and (cand >= 0).all()
    cand[1, -3:] = -1  # padding slots
    lam = {"lambda_ridge": 0.01, "lambda_type": 0.5, "lambda_similar": 0.3}
    beta = solve_cell_weights(counts, gene_w, profiles, cell_type, embedding, abundance, cand,
                              n_iter=5000, tol=1e-13, **lam)
    assert (beta[1, -3:] == 0).all()

    valid = cand >= 0
    pairs = [(i, a, b) for i in range(n) for a in range(15) for b in range(15)
             if a != b and valid[i, a] and valid[i, b]
             and cell_type[cand[i, a]] == cell_type[cand[i, b]]]
    bandwidth = np.median([((embedding[cand[i, a]] - embedding[cand[i, b]]) ** 2).sum()
                           for i, a, b in pairs])
    y_all = counts.toarray()
    for i in range(n):
        c = cand[i][valid[i]]
        m, types = len(c), cell_type[c]
        design = (profiles[c] * gene_w / y_all[i].sum()).T  # genes × candidates
        target = y_all[i] * gene_w / y_all[i].sum()
        s = (design**2).sum(axis=0).mean()
        rows, rhs = [design, np.sqrt(lam["lambda_ridge"] * s) * np.eye(m)], [target, np.zeros(m)]
        for k in np.unique(types):
            rows.append(np.sqrt(lam["lambda_type"] * s) * (types == k)[None, :].astype(float))
            rhs.append([np.sqrt(lam["lambda_type"] * s) * abundance[i, k]])
        for a in range(m):
            for b in range(a + 1, m):
                if types[a] == types[b]:
                    kernel = np.exp(-((embedding[c[a]] - embedding[c[b]]) ** 2).sum() / bandwidth)
                    row = np.zeros((1, m))
                    row[0, a], row[0, b] = 1.0, -1.0
                    rows.append(np.sqrt(lam["lambda_similar"] * s * kernel) * row)
                    rhs.append([0.0])
        expected, _ = nnls(np.vstack(rows), np.concatenate([np.ravel(r) for r in rhs]),
                           maxiter=10_000)
        np.testing.assert_allclose(beta[i][valid[i]], expected, atol=1e-8)

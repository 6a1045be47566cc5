"""Reference signatures: the documented formula, marker selection and bad input."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from spotlens._validation import InputError
from spotlens.pp import reference_signatures, shrink_profiles, signature_kernel

# 7 cells × 5 genes; gene "g_off" is never expressed, cell c6 has no counts at all.
HAND_COUNTS = np.array(
    [
        [4, 0, 1, 0, 5],  # A
        [8, 2, 0, 0, 0],  # A
        [1, 1, 1, 0, 1],  # A
        [0, 9, 3, 0, 0],  # B
        [0, 3, 3, 0, 6],  # B
        [2, 0, 0, 0, 8],  # C
        [0, 0, 0, 0, 0],  # C (empty cell)
    ],
    dtype=np.float32,
)
HAND_LABELS = ["A", "A", "A", "B", "B", "C", "C"]
HAND_GENES = ["g1", "g2", "g3", "g_off", "g5"]


def _hand_reference(dense: bool = False) -> ad.AnnData:
    x = HAND_COUNTS.copy() if dense else sparse.csr_matrix(HAND_COUNTS)
    return ad.AnnData(
        x,
        obs=pd.DataFrame({"cell_type": HAND_LABELS}, index=[f"c{i}" for i in range(7)]),
        var=pd.DataFrame(index=HAND_GENES),
    )


def _oracle_signature(counts: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """Per type: mean over cells of counts / (cell library), times the type's mean library."""
    rows = {}
    labels = np.asarray(labels)
    for t in sorted(set(labels)):
        cells = counts[labels == t].astype(float)
        libs = cells.sum(axis=1)
        normed = [
            c / lib if lib > 0 else np.zeros_like(c) for c, lib in zip(cells, libs, strict=True)
        ]
        rows[t] = np.mean(normed, axis=0) * libs.mean()
    return pd.DataFrame(rows).T


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_signature_is_mean_normalised_expression_times_mean_library(dense):
    sig = reference_signatures(
        _hand_reference(dense), n_genes_per_type=None, min_cells_per_type=2, shrink=False
    )
    expected = _oracle_signature(HAND_COUNTS, HAND_LABELS)
    expected.columns = HAND_GENES
    # the never-expressed gene is not informative; everything else is kept, in input order
    assert sig.genes.tolist() == ["g1", "g2", "g3", "g5"]
    assert sig.cell_types.tolist() == ["A", "B", "C"]
    np.testing.assert_allclose(sig.signature.to_numpy(), expected[sig.genes].to_numpy(), rtol=1e-12)
    libs = [(10 + 10 + 4) / 3, (12 + 12) / 2, (10 + 0) / 2]  # the empty cell counts as 0
    np.testing.assert_allclose(sig.library_size.to_numpy(), libs)
    assert sig.n_cells.tolist() == [3, 2, 2]


def test_signature_restricted_to_genes_keeps_library_over_all_genes():
    ref = _hand_reference()
    full = reference_signatures(ref, n_genes_per_type=None, min_cells_per_type=2, shrink=False)
    sub = reference_signatures(
        ref, genes=["g5", "g2", "g1"], n_genes_per_type=None, min_cells_per_type=2, shrink=False
    )
    assert sub.genes.tolist() == ["g5", "g2", "g1"]
    # library sizes are over every reference gene, so restricting genes does not rescale
    pd.testing.assert_frame_equal(sub.signature, full.signature[["g5", "g2", "g1"]])
    pd.testing.assert_series_equal(sub.library_size, full.library_size)


def test_signature_does_not_modify_reference():
    ref = _hand_reference()
    before = ref.copy()
    reference_signatures(ref, n_genes_per_type=None, min_cells_per_type=2)
    assert (ref.X != before.X).nnz == 0 and ref.X.dtype == before.X.dtype
    pd.testing.assert_frame_equal(ref.obs, before.obs)
    pd.testing.assert_frame_equal(ref.var, before.var)


def test_signature_kernel_statistics_match_numpy():
    rng = np.random.default_rng(3)
    counts = rng.poisson(2.0, size=(40, 12)).astype(float)
    counts[5] = 0
    codes = rng.integers(0, 3, size=40)
    mean_norm, var_norm, lib, n_cells = signature_kernel(sparse.csr_matrix(counts), codes, 3)
    libs = counts.sum(1)
    normed = np.divide(counts, libs[:, None], out=np.zeros_like(counts), where=libs[:, None] > 0)
    for k in range(3):
        sel = codes == k
        np.testing.assert_allclose(mean_norm[k], normed[sel].mean(0), atol=1e-14)
        np.testing.assert_allclose(var_norm[k], normed[sel].var(0), atol=1e-14)
        assert lib[k] == pytest.approx(libs[sel].mean())
        assert n_cells[k] == sel.sum()


def _gamma_profiles(rng, n_groups=20, n_genes=2000, shape=2.0):
    """True unit-sum profiles: gamma(shape) around a shared log-normal baseline."""
    base = rng.lognormal(0.0, 1.0, n_genes)
    p = base * rng.gamma(shape, 1.0 / shape, size=(n_groups, n_genes))
    return p / p.sum(axis=1, keepdims=True)


def test_shrinkage_recovers_true_profiles_better_than_shallow_means():
    # a shallow reference: 5,000 counts per group over 2,000 genes (about 2.5 per gene)
    rng = np.random.default_rng(0)
    truth = _gamma_profiles(rng)
    total = np.full(len(truth), 5000.0)
    observed = rng.poisson(truth * total[:, None]) / total[:, None]
    prior = np.repeat(observed.mean(axis=0, keepdims=True), len(truth), axis=0)
    shrunk, alpha = shrink_profiles(observed, total, prior)
    # the moment estimate finds the profiles' spread (1/shape = 0.5 around the baseline)
    assert 1.0 < alpha < 4.0
    err_raw = np.abs(observed - truth).sum()
    err_shrunk = np.abs(shrunk - truth).sum()
    assert err_shrunk < 0.8 * err_raw
    # a gene seen in some group is not left at an exact zero in another by sampling alone
    seen = prior[0] > 0
    assert (shrunk[:, seen] > 0).all() and (observed[:, seen] == 0).mean() > 0.05


def test_shrinkage_leaves_deep_profiles_alone_and_pools_pure_noise():
    rng = np.random.default_rng(1)
    truth = _gamma_profiles(rng, n_groups=5, n_genes=300)
    prior = np.repeat(truth.mean(axis=0, keepdims=True), 5, axis=0)
    deep = np.full(5, 1e9)
    observed = rng.poisson(truth * deep[:, None]) / deep[:, None]
    shrunk, _ = shrink_profiles(observed, deep, prior)
    np.testing.assert_allclose(shrunk, observed, rtol=1e-3)
    # groups that differ by Poisson noise only: alpha = inf, every group is the prior
    same = np.repeat(truth[:1], 5, axis=0)
    total = np.full(5, 2000.0)
    noisy = rng.poisson(same * total[:, None]) / total[:, None]
    pooled = np.repeat(noisy.mean(axis=0, keepdims=True), 5, axis=0)
    shrunk, alpha = shrink_profiles(noisy, total, pooled)
    assert alpha == np.inf
    np.testing.assert_array_equal(shrunk, pooled)


def test_shrunk_signatures_keep_deep_references_and_sum_of_states():
    ref = _marker_reference()  # about 2,000 counts per cell: shrinkage is negligible
    plain = reference_signatures(ref, n_genes_per_type=None, shrink=False)
    shrunk = reference_signatures(ref, n_genes_per_type=None)
    np.testing.assert_allclose(shrunk.signature, plain.signature, rtol=0.02)
    assert shrunk.states.shape == plain.states.shape


def _marker_reference(seed=0, n_types=4, n_markers=3, n_background=60, extra=None):
    """Types with ``n_markers`` private markers (15× up) on a shared background."""
    rng = np.random.default_rng(seed)
    n_genes = n_types * n_markers + n_background
    mean = np.full((n_types, n_genes), 20.0)
    for k in range(n_types):
        mean[k, k * n_markers:(k + 1) * n_markers] *= 15.0
    labels = np.repeat(np.arange(n_types), 25)
    counts = rng.poisson(mean[labels]).astype(np.float32)
    genes = [f"marker{k}_{m}" for k in range(n_types) for m in range(n_markers)]
    genes += [f"bg{j}" for j in range(n_background)]
    if extra is not None:
        counts = np.hstack([counts, extra(labels)])
        genes += [f"extra{j}" for j in range(counts.shape[1] - len(genes))]
    return ad.AnnData(
        sparse.csr_matrix(counts),
        obs=pd.DataFrame({"cell_type": [f"T{k}" for k in labels]},
                         index=[f"cell{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=genes),
    )


def _bursty(labels):
    """5 genes of T0 that are 0 or 10× a marker's mean in alternate cells (over-dispersed)."""
    rng = np.random.default_rng(1)
    on = (np.arange(len(labels)) % 2 == 0) & (labels == 0)
    mean = np.where(on, 20.0 * 15 * 10, 1.0)[:, None] * np.ones((1, 5))
    return rng.poisson(mean).astype(np.float32)


def test_informative_genes_are_exactly_the_markers():
    ref = _marker_reference()
    sig = reference_signatures(ref, n_genes_per_type=3)
    markers = {g for g in ref.var_names if g.startswith("marker")}
    assert set(sig.genes) == markers  # default drop_overdispersed=0.01 drops < 1 of 12 genes


def test_unexpressed_gene_does_not_warn_during_selection():
    # a gene with no counts in any reference cell is routine in real data
    ref = _marker_reference(extra=lambda labels: np.zeros((len(labels), 1), dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sig = reference_signatures(ref, n_genes_per_type=3)
    assert "extra0" not in sig.genes
    assert {g for g in ref.var_names if g.startswith("marker")} == set(sig.genes)


def test_overdispersed_markers_are_dropped_in_the_documented_fraction():
    # 4 types × 25 markers; 5 markers of T0 are bursty (0 or 10× mean in alternate cells)
    ref = _marker_reference(n_markers=25, n_background=40, extra=_bursty)
    sig = reference_signatures(ref, n_genes_per_type=30, drop_overdispersed=0.05)
    kept = set(sig.genes)
    # 105 candidate markers (100 + 5 bursty); 5 % of them, rounded down, is 5: the bursty ones
    assert not kept & {f"extra{j}" for j in range(5)}
    assert {g for g in ref.var_names if g.startswith("marker")} <= kept


def _bursty_everywhere(labels):
    """5 genes of every type that are 0 or 10× a marker's mean in alternate cells."""
    rng = np.random.default_rng(2)
    on = np.arange(len(labels)) % 2 == 0
    mean = np.where(on, 20.0 * 15 * 10, 1.0)[:, None] * np.ones((1, 5))
    return rng.poisson(mean).astype(np.float32)


def test_small_panel_drops_bursty_genes_but_keeps_bursty_markers():
    # 4 types × 25 markers + 40 background + 5 extra genes = 145 genes ≤ 200 × 4: every expressed
    # gene is kept, less 5 % of them (7) among genes that mark no type
    broad = _marker_reference(n_markers=25, n_background=40, extra=_bursty_everywhere)
    sig = reference_signatures(broad, drop_overdispersed=0.05)
    assert len(sig.genes) == broad.n_vars - 7
    assert not set(sig.genes) & {f"extra{j}" for j in range(5)}
    assert {g for g in broad.var_names if g.startswith("marker")} <= set(sig.genes)
    # the same burst in one type only makes the genes strong markers of it: they stay
    marking = _marker_reference(n_markers=25, n_background=40, extra=_bursty)
    kept = set(reference_signatures(marking, drop_overdispersed=0.05).genes)
    assert {f"extra{j}" for j in range(5)} <= kept
    assert len(kept) == marking.n_vars - 7
    # n_genes_per_type=None keeps everything
    everything = reference_signatures(broad, n_genes_per_type=None, drop_overdispersed=0.05)
    assert len(everything.genes) == broad.n_vars


def test_genes_not_in_reference():
    with pytest.raises(InputError, match=r"Genes not in the reference: \['nope'\]"):
        reference_signatures(_hand_reference(), genes=["g1", "nope"], min_cells_per_type=2)


def test_too_few_informative_genes():
    with pytest.raises(InputError, match="Only 1 informative genes for 3 cell types"):
        reference_signatures(
            _hand_reference(), genes=["g1", "g_off"], n_genes_per_type=None, min_cells_per_type=2
        )


def test_reference_signatures_rejects_log_normalised_reference():
    ref = _hand_reference(dense=True)
    ref.X = np.log1p(ref.X)
    with pytest.raises(InputError, match="reference counts holds non-integer values"):
        reference_signatures(ref, min_cells_per_type=2)


def test_reference_signatures_rare_type():
    with pytest.raises(InputError, match=r"'B' \(2 cells\), 'C' \(2 cells\)"):
        reference_signatures(_hand_reference(), min_cells_per_type=3)


# -- a reference that stays on disk (anndata.read_h5ad(path, backed="r")) ----------------------


@pytest.fixture
def small_blocks(monkeypatch):
    """Read the reference 7 cells (of 150 genes) at a time, so it spans many blocks."""
    from spotlens.pp import _reference_counts

    monkeypatch.setattr(_reference_counts, "CHUNK_VALUES", 150 * 7)


def _signature_parts(sig):
    return sig.signature, sig.states, sig.library_size, sig.n_cells, sig.state_type


@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
def test_backed_reference_gives_the_in_memory_signatures(synthetic, small_blocks, tmp_path,
                                                          monkeypatch, dense):
    ref = synthetic.reference
    if dense:
        ref.X = ref.X.toarray()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    # cells_per_state=10 splits the 30-cell types into states: the second (column) pass runs
    kwargs = {"labels_key": "cell_type", "genes": ref.var_names[5:], "cells_per_state": 10}
    backed = ad.read_h5ad(tmp_path / "ref.h5ad", backed="r")
    try:
        on_disk = reference_signatures(backed, **kwargs)
    finally:
        backed.file.close()
    in_memory = reference_signatures(ref, **kwargs)
    assert len(in_memory.states) > len(in_memory.signature)
    for got, want in zip(_signature_parts(on_disk), _signature_parts(in_memory), strict=True):
        assert got.equals(want)  # identical, not merely close
    # and the block-wise sums are the one-block sums up to round-off
    from spotlens.pp import _reference_counts

    monkeypatch.setattr(_reference_counts, "CHUNK_VALUES", 1 << 24)
    whole = reference_signatures(ref, **kwargs)
    np.testing.assert_allclose(whole.states.to_numpy(), in_memory.states.to_numpy(), rtol=1e-12)


def test_backed_reference_is_checked_with_the_in_memory_message(synthetic, small_blocks,
                                                                 tmp_path):
    ref = synthetic.reference
    ref.X = ref.X.astype(np.float32)
    ref.X.data[-3] += 0.5  # a fractional count in the last block
    ref.write_h5ad(tmp_path / "ref.h5ad")
    backed = ad.read_h5ad(tmp_path / "ref.h5ad", backed="r")
    try:
        with pytest.raises(InputError, match=r"reference counts holds non-integer values"):
            reference_signatures(backed, labels_key="cell_type")
    finally:
        backed.file.close()


def test_deconvolve_with_a_backed_reference_equals_in_memory(synthetic, tmp_path):
    from spotlens.deconv import deconvolve

    synthetic.reference.write_h5ad(tmp_path / "ref.h5ad")
    kwargs = {"labels_key": "cell_type", "lambda_ridge": 0.01, "lambda_spatial": 0.1,
              "n_iter": 5, "progress": False, "inplace": False}
    backed = ad.read_h5ad(tmp_path / "ref.h5ad", backed="r")
    try:
        on_disk = deconvolve(synthetic.spatial, backed, **kwargs)
    finally:
        backed.file.close()
    in_memory = deconvolve(synthetic.spatial, synthetic.reference, **kwargs)
    pd.testing.assert_frame_equal(on_disk.proportions, in_memory.proportions, check_exact=True)


def test_dense_float64_reference_is_not_copied_whole(monkeypatch):
    """A large dense reference is read in blocks: extra memory follows the block, not the
    reference (blocks made small here so that a test-sized reference spans many)."""
    import tracemalloc

    import spotlens.pp._reference_counts as reading

    monkeypatch.setattr(reading, "CHUNK_VALUES", 1 << 17)

    rng = np.random.default_rng(0)
    n_cells, n_genes = 6000, 400
    labels = np.repeat([f"t{k}" for k in range(6)], n_cells // 6)
    profile = rng.gamma(0.5, 1.0, size=(6, n_genes))
    x = rng.poisson(profile[np.repeat(np.arange(6), n_cells // 6)] * 3).astype(np.float64)
    ref = ad.AnnData(X=x, obs=pd.DataFrame({"cell_type": labels},
                                           index=[f"c{i}" for i in range(n_cells)]),
                     var=pd.DataFrame(index=[f"g{g}" for g in range(n_genes)]))
    size = x.nbytes  # 19 MB
    reference_signatures(ref, genes=ref.var_names[:50])  # warm up imports and caches
    tracemalloc.start()
    try:
        reference_signatures(ref, cells_per_state=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.6 * size, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB reference"

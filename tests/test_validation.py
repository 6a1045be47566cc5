"""The ``check_*`` helpers: accept what is valid, refuse what is not, and say what is wrong."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from spotlens._validation import (
    InputError,
    check_coordinates,
    check_counts,
    check_labels,
    check_not_empty,
    check_shared_genes,
    check_unique_names,
    get_matrix,
)

COUNTS = np.array([[0, 1, 2], [3, 0, 40], [0, 0, 7]], dtype=np.float32)


def _adata(n_obs=4, n_vars=3, **obs):
    a = ad.AnnData(
        np.ones((n_obs, n_vars), dtype=np.float32),
        obs=pd.DataFrame(obs or None, index=[f"o{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_vars)]),
    )
    return a


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize("fmt", ["dense", "int", "csr", "csc", "coo", "lil", "dok", "bsr"])
def test_check_counts_accepts_integer_counts_in_every_storage(fmt):
    m = {
        "dense": COUNTS,
        "int": COUNTS.astype(np.int64),
    }.get(fmt)
    if m is None:
        m = sparse.csr_matrix(COUNTS).asformat(fmt)
    before = m.copy()
    check_counts(m, what="test counts")  # must not raise
    after_dense = m.toarray() if sparse.issparse(m) else m
    before_dense = before.toarray() if sparse.issparse(before) else before
    np.testing.assert_array_equal(after_dense, before_dense)  # input untouched


@pytest.mark.parametrize("sparse_input", [False, True])
def test_check_counts_rejects_log_normalised_values(sparse_input):
    m = np.log1p(COUNTS / COUNTS.sum(1, keepdims=True) * 1e4)
    m = sparse.csr_matrix(m) if sparse_input else m
    with pytest.raises(InputError, match="non-integer values.*raw counts"):
        check_counts(m, what="spatial counts")


def test_check_counts_tolerates_float_round_off_of_integers():
    check_counts(COUNTS.astype(np.float64) + 1e-6, what="counts")


@pytest.mark.parametrize("fmt", ["dense", "csr", "lil"])
def test_check_counts_rejects_negative_values(fmt):
    m = COUNTS.copy()
    m[1, 1] = -2
    m = m if fmt == "dense" else sparse.csr_matrix(m).asformat(fmt)
    with pytest.raises(InputError, match=r"negative values \(min -2\)"):
        check_counts(m, what="counts")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_counts_rejects_non_finite_values(bad):
    m = COUNTS.copy()
    m[0, 0] = bad
    m[2, 1] = bad
    with pytest.raises(InputError, match="2 NaN or infinite values"):
        check_counts(sparse.csr_matrix(m), what="counts")


def test_check_counts_rejects_non_numeric():
    with pytest.raises(InputError, match="non-numeric"):
        check_counts(np.array([["a", "b"]], dtype=object), what="counts")


def test_check_counts_message_names_which_input():
    with pytest.raises(InputError, match="^The reference counts holds non-integer"):
        check_counts(np.array([[0.5, 1.0]]), what="reference counts")


@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
def test_check_counts_reads_a_backed_matrix_in_chunks(tmp_path, monkeypatch, dense):
    """X of an AnnData read with backed="r" is checked like the same matrix in memory (it was
    refused as "non-numeric values (object)")."""
    from spotlens import _validation

    monkeypatch.setattr(_validation, "CHUNK_VALUES", 6)  # two rows of 3 genes per chunk
    counts = np.tile(COUNTS, (4, 1))  # 12 cells × 3 genes
    bad = counts.copy()
    bad[9, 2] = 2.5  # in the last chunk
    for name, x in (("ok", counts), ("bad", bad)):
        ad.AnnData(x if dense else sparse.csr_matrix(x)).write_h5ad(tmp_path / f"{name}.h5ad")
    ok = ad.read_h5ad(tmp_path / "ok.h5ad", backed="r")
    wrong = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    try:
        check_counts(ok.X, what="reference counts")  # must not raise
        with pytest.raises(InputError, match=r"holds non-integer values \(e.g. 2.5\)"):
            check_counts(wrong.X, what="reference counts")
    finally:
        ok.file.close()
        wrong.file.close()


# ---------------------------------------------------------------- labels


def test_check_labels_returns_strings_in_order():
    a = _adata(6, cell_type=pd.Categorical(["B", "A", "B", "A", "A", "B"]))
    labels = check_labels(a, "cell_type", min_cells_per_type=3)
    assert labels.tolist() == ["B", "A", "B", "A", "A", "B"]
    assert labels.map(type).eq(str).all()
    assert isinstance(a.obs["cell_type"].dtype, pd.CategoricalDtype)  # input untouched


def test_check_labels_ignores_unused_categories():
    cats = pd.Categorical(["A", "A", "B", "B"], categories=["A", "B", "C_unused"])
    a = _adata(4, cell_type=cats)
    labels = check_labels(a, "cell_type", min_cells_per_type=2)
    assert set(labels) == {"A", "B"}


def test_check_labels_missing_column_lists_what_is_there():
    a = _adata(4, celltype=["A", "A", "B", "B"])
    with pytest.raises(InputError, match=r"no obs column 'cell_type' \(columns: 'celltype'\)"):
        check_labels(a, "cell_type", min_cells_per_type=1)


def test_check_labels_nan_counts_the_unlabelled_cells():
    a = _adata(5, cell_type=["A", None, "B", np.nan, "B"])
    with pytest.raises(InputError, match=r"^2 reference cells have no label \(NaN\)"):
        check_labels(a, "cell_type", min_cells_per_type=1)


@pytest.mark.parametrize("text", ["nan", "NaN", "None", "", "  ", "NA", "null"])
@pytest.mark.parametrize("categorical", [False, True])
def test_check_labels_text_that_means_missing_is_a_missing_label(text, categorical):
    """A label written as "nan" (e.g. after astype(str) or a CSV round trip) is not a type."""
    values = ["A", text, "B", "A", text, "B"]
    a = _adata(6, cell_type=pd.Categorical(values) if categorical else values)
    with pytest.raises(InputError, match=(
        rf"^2 reference cells have no label in obs\['cell_type'\] \(2 '{text}'\).*"
        r"Drop those cells.*or give them their cell type")):
        check_labels(a, "cell_type", min_cells_per_type=1)


def test_check_labels_counts_nan_and_text_together():
    a = _adata(6, cell_type=["A", "nan", "B", np.nan, "None", "B"])
    with pytest.raises(InputError, match=r"^3 reference cells have no label .*\(1 NaN, "):
        check_labels(a, "cell_type", min_cells_per_type=1)


def test_check_labels_keeps_types_that_merely_contain_nan():
    a = _adata(4, cell_type=["Nanog+", "Nanog+", "Non-neuronal", "Non-neuronal"])
    assert set(check_labels(a, "cell_type", min_cells_per_type=1)) == {"Nanog+", "Non-neuronal"}


def test_check_labels_rare_type_names_type_and_count():
    a = _adata(7, cell_type=["A"] * 5 + ["Rare"] * 2)
    with pytest.raises(InputError, match=r"fewer than 3 reference cells: 'Rare' \(2 cells\)"):
        check_labels(a, "cell_type", min_cells_per_type=3)


def test_check_labels_single_type():
    a = _adata(4, cell_type=["A"] * 4)
    with pytest.raises(InputError, match="single cell type \\('A'\\)"):
        check_labels(a, "cell_type", min_cells_per_type=1)


# ---------------------------------------------------------------- coordinates


def test_check_coordinates_returns_float64_copy():
    a = _adata(3)
    a.obsm["spatial"] = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int32)
    xy = check_coordinates(a, "spatial")
    assert xy.dtype == np.float64 and xy.shape == (3, 2)
    xy[0, 0] = 99
    assert a.obsm["spatial"][0, 0] == 1


def test_check_coordinates_missing_key_lists_keys():
    a = _adata(3)
    a.obsm["X_umap"] = np.zeros((3, 2))
    with pytest.raises(InputError, match=r"no obsm\['spatial'\] \(obsm keys: 'X_umap'\)"):
        check_coordinates(a, "spatial")


@pytest.mark.parametrize(
    ("coords", "message"),
    [
        (np.arange(3.0), r"must be n_spots × 2 \(x, y\), got shape \(3, 1\)"),
        (np.zeros((3, 3)), "has 3 columns.*2-D coordinates"),
    ],
    ids=["1-D", "3 columns"],
)
def test_check_coordinates_wrong_shape(coords, message):
    a = _adata(3)
    a.obsm["spatial"] = coords
    with pytest.raises(InputError, match=message):
        check_coordinates(a, "spatial")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_check_coordinates_non_finite(bad):
    a = _adata(3)
    a.obsm["spatial"] = np.array([[0.0, 0.0], [1.0, bad], [2.0, 2.0]])
    with pytest.raises(InputError, match="NaN or infinite coordinates"):
        check_coordinates(a, "spatial")


# ---------------------------------------------------------------- names, emptiness, genes


def test_check_unique_names_duplicate_obs_and_var():
    a = _adata(3)
    a.obs_names = ["s1", "s1", "s2"]
    message = r"duplicate spot names, e.g. \['s1'\].*obs_names_make_unique"
    with pytest.raises(InputError, match=message):
        check_unique_names(a, what="spatial data", obs_name="spot")
    b = _adata(3)
    b.var_names = ["g", "g", "h"]
    message = r"duplicate gene names, e.g. \['g'\].*var_names_make_unique"
    with pytest.raises(InputError, match=message):
        check_unique_names(b, what="reference", obs_name="cell")


def test_repeated_gene_names_message_counts_them_and_gives_both_fixes():
    b = _adata(3, 5)
    b.var_names = ["g", "g", "h", "h", "k"]
    with pytest.raises(InputError, match=(
        r"duplicate gene names, e\.g\. \['g', 'h'\] \(2 repeated\); genes are matched by "
        r"name.*Sum the repeated columns into one gene.*var_names_make_unique")):
        check_unique_names(b, what="reference", obs_name="cell")


@pytest.mark.parametrize("side", ["spatial", "reference"])
def test_deconvolve_refuses_repeated_gene_names_naming_them(synthetic, side):
    from spotlens.deconv import deconvolve

    adata = getattr(synthetic, side)
    names = list(adata.var_names)
    names[3] = names[2]
    adata.var_names = names
    what = "spatial data" if side == "spatial" else "reference"
    with pytest.raises(InputError, match=(
        rf"The {what} has duplicate gene names, e\.g\. \['{names[2]}'\] \(1 repeated\).*"
        r"var_names_make_unique")):
        deconvolve(synthetic.spatial, synthetic.reference, labels_key="cell_type",
                   progress=False)


def test_deconvolve_refuses_labels_written_as_nan(synthetic):
    from spotlens.deconv import deconvolve

    labels = synthetic.reference.obs["cell_type"].astype(str).to_numpy().copy()
    labels[[0, 5, 9]] = "nan"
    synthetic.reference.obs["cell_type"] = labels
    with pytest.raises(InputError, match=r"^3 reference cells have no label .*\(3 'nan'\)"):
        deconvolve(synthetic.spatial, synthetic.reference, labels_key="cell_type",
                   progress=False)


def test_check_not_empty():
    with pytest.raises(InputError, match="is empty: it has 0 spots"):
        check_not_empty(_adata(0), what="spatial data", obs_name="spots")
    with pytest.raises(InputError, match="is empty: it has 0 genes"):
        check_not_empty(_adata(3, 0), what="reference", obs_name="cells")
    with pytest.raises(InputError, match="must be an AnnData object, got ndarray"):
        check_not_empty(np.zeros((2, 2)), what="reference", obs_name="cells")


def test_check_shared_genes_keeps_spatial_order():
    shared = check_shared_genes(
        ["g5", "g1", "g3", "g9", "g0"], ["g0", "g1", "x", "g3", "g5"], min_genes=3, n_types=2
    )
    assert shared.tolist() == ["g0", "g1", "g3", "g5"]


def test_check_shared_genes_too_few_shows_both_gene_id_styles():
    with pytest.raises(InputError, match=r"share 0 genes; at least 10.*ENSMUSG0.*Gad1"):
        check_shared_genes(
            ["ENSMUSG01", "ENSMUSG02"], ["Gad1", "Gfap"], min_genes=10, n_types=3
        )
    # the number of cell types raises the floor
    with pytest.raises(InputError, match="share 12 genes; at least 15"):
        genes = [f"g{i}" for i in range(12)]
        check_shared_genes(genes, genes, min_genes=10, n_types=15)


def test_get_matrix_layer_and_missing_layer():
    a = _adata(3)
    a.layers["counts"] = np.full((3, 3), 2.0)
    assert get_matrix(a, "counts", what="x") is a.layers["counts"]
    with pytest.raises(InputError, match=r"no layer 'raw' \(layers: 'counts'\)"):
        get_matrix(a, "raw", what="spatial data")

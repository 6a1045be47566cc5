"""The ``spotlens`` command line, run in-process with typer's CliRunner."""

from __future__ import annotations

import re
import sys
import types

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from typer.testing import CliRunner

from spotlens._metrics import accuracy
from spotlens.cli import app

OUTPUTS = ("spatial.h5ad", "proportions.csv", "proportions.png")
# fixed penalties and few sweeps keep a run to about a second
FAST = ["--lambda-ridge", "0.01", "--lambda-spatial", "0.3", "--n-iter", "20", "--no-progress"]

runner = CliRunner()


@pytest.fixture
def data(bundled_files):
    """Paths of the bundled osmFISH part (conftest.py): 100 spots, 11 types of 25 cells."""
    return bundled_files


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_deconvolve_writes_the_three_outputs(data, tmp_path):
    spatial, reference = data
    out = tmp_path / "results"
    result = run("deconvolve", "-s", spatial, "-r", reference, "--labels-key", "cell_type",
                 "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    assert all((out / name).is_file() for name in OUTPUTS)

    table = pd.read_csv(out / "proportions.csv", index_col=0)
    st = ad.read_h5ad(spatial)
    assert list(table.index) == list(st.obs_names)
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-6)
    assert (table.to_numpy() >= 0).all()
    written = ad.read_h5ad(out / "spatial.h5ad")
    np.testing.assert_allclose(written.obsm["proportions_spotlens"].to_numpy(), table.to_numpy())
    assert written.uns["proportions_spotlens"]["params"]["lambda_spatial"] == 0.3
    # one INFO line per stage on stderr, the written paths on stdout
    assert all(f"stage {i}/5" in result.stderr for i in range(1, 6))
    assert str(out / "proportions.csv") in result.stdout
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_options_reach_deconvolve(data, tmp_path):
    spatial, reference = data
    result = run("deconvolve", "-s", spatial, "-r", reference, "-o", tmp_path, "--no-attention",
                 "--k-neighbors", "4", "--seed", "3", "-q", *FAST)
    assert result.exit_code == 0, result.output
    params = ad.read_h5ad(tmp_path / "spatial.h5ad").uns["proportions_spotlens"]["params"]
    assert (params["use_attention"], params["k_neighbors"], params["seed"]) == (False, 4, 3)
    assert "stage 1/5" not in result.stderr  # --quiet keeps warnings only


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--labels-key", "celltype"], "no obs column 'celltype'"),
        (["--device", "gpu"], "Unknown device 'gpu'"),
        (["--spatial-key", "xy"], "no obsm['xy']"),
        (["--layer", "counts"], "no layer 'counts'"),
    ],
)
def test_bad_input_exits_2_with_one_line(data, tmp_path, args, message):
    spatial, reference = data
    result = run("deconvolve", "-s", spatial, "-r", reference, "-o", tmp_path, *args, *FAST)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "proportions.csv").exists()


def test_missing_file_exits_2(tmp_path):
    result = run("deconvolve", "-s", tmp_path / "nope.h5ad", "-r", tmp_path / "ref.h5ad",
                 "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "error: The spatial data path" in result.stderr and "does not exist" in result.stderr


def test_bad_penalty_is_a_usage_error(tmp_path):
    result = run("deconvolve", "-s", "a.h5ad", "-r", "b.h5ad", "-o", tmp_path,
                 "--lambda-ridge", "lots")
    assert result.exit_code == 2
    assert "--lambda-ridge" in result.stderr and "'auto'" in result.stderr


def test_demo_prints_accuracy_of_what_it_wrote(data, tmp_path, monkeypatch):
    """The demo on a part of the bundled example and its truth (the whole one takes longer)."""
    spatial, reference = data
    st, ref = ad.read_h5ad(spatial), ad.read_h5ad(reference)
    truth = st.obsm["true_proportions"].copy()
    fake = types.ModuleType("spotlens.datasets")
    fake.osmfish_cortex = lambda: (st, ref)
    monkeypatch.setitem(sys.modules, "spotlens.datasets", fake)

    result = run("demo", "-o", tmp_path, "--no-progress")
    assert result.exit_code == 0, result.output
    assert all((tmp_path / name).is_file() for name in OUTPUTS)
    pred = pd.read_csv(tmp_path / "proportions.csv", index_col=0)
    scores = accuracy(pred, truth)
    for label, metric in (("Pearson r", "pearson_r"), ("RMSE", "rmse"), ("mean JSD", "mean_jsd")):
        printed = re.search(rf"^  {label}\s+(-?[\d.]+)", result.stdout, flags=re.MULTILINE)
        assert printed and float(printed.group(1)) == pytest.approx(scores[metric], abs=5e-4)


def test_help_describes_commands_and_options():
    top = run("--help")
    assert top.exit_code == 0
    assert "deconvolve" in top.stdout and "demo" in top.stdout
    sub = run("deconvolve", "--help")
    for option in ("--spatial", "--reference", "--labels-key", "--out", "--lambda-ridge",
                   "--no-attention", "--device", "--n-iter", "--overwrite",
                   "--min-cells-per-type", "--n-genes-per-type"):
        assert option in sub.stdout


def test_accuracy_metrics():
    truth = pd.DataFrame({"A": [1.0, 0.0, 0.5], "B": [0.0, 1.0, 0.5]}, index=["s1", "s2", "s3"])
    perfect = accuracy(truth.iloc[::-1], truth)  # rows are matched by name, not position
    assert perfect["rmse"] == 0 and perfect["mean_jsd"] == 0 and perfect["pearson_r"] == 1
    swapped = accuracy(truth[["B", "A"]].set_axis(["A", "B"], axis=1), truth)
    assert swapped["mean_jsd"] == pytest.approx(2 / 3)  # s1, s2 disjoint (1), s3 equal (0)
    missing_type = accuracy(truth[["A"]], truth)  # B scored as 0 in pred
    assert missing_type["rmse"] == pytest.approx(np.sqrt((1 + 0.25) / 6))
    from spotlens._validation import InputError

    with pytest.raises(InputError, match="no spot names"):
        accuracy(truth.set_axis(["x", "y", "z"]), truth)
    with pytest.raises(InputError, match="no cell-type names"):
        accuracy(truth.set_axis(["C", "D"], axis=1), truth)


# --- cell level --------------------------------------------------------------------------------

CELL_OUTPUTS = ("cells.h5ad", "cells.png")


def test_cell_level_writes_the_cells_and_the_weights(data, tmp_path):
    spatial, reference = data
    result = run("deconvolve", "-s", spatial, "-r", reference, "-o", tmp_path, "--cell-level",
                 "--n-candidates", "4", *FAST)
    assert result.exit_code == 0, result.output
    assert all((tmp_path / name).is_file() for name in OUTPUTS + CELL_OUTPUTS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert str(tmp_path / "cells.h5ad") in result.stdout
    assert "cell level 1/3" in result.stderr

    st, ref = ad.read_h5ad(tmp_path / "spatial.h5ad"), ad.read_h5ad(reference)
    w = st.obsm["cell_weights_spotlens"]
    assert sparse.issparse(w) and w.shape == (st.n_obs, ref.n_obs)
    info = st.uns["cell_weights_spotlens"]
    assert list(info["columns"]) == list(ref.obs_names)  # the columns are the reference cells
    assert np.asarray(info["metacell"]).dtype.kind == "i" and (info["metacell"] == -1).all()
    assert info["params"]["n_candidates"] == 4
    n_types = ref.obs["cell_type"].nunique()
    assert np.diff(sparse.csr_matrix(w).indptr).max() <= 4 * n_types
    # the proportions are still there, unchanged by the cell-level step
    table = pd.read_csv(tmp_path / "proportions.csv", index_col=0)
    np.testing.assert_allclose(st.obsm["proportions_spotlens"].to_numpy(), table.to_numpy())

    cells = ad.read_h5ad(tmp_path / "cells.h5ad")
    counts = st.obsm["cell_counts_spotlens"]
    placed = cells.obs.groupby("spot", observed=False).size().reindex(st.obs_names, fill_value=0)
    np.testing.assert_array_equal(placed.to_numpy(), counts.sum(axis=1).to_numpy())
    source = ref.obs_names.get_indexer(cells.obs["source_cell"])
    assert (source >= 0).all()
    np.testing.assert_array_equal(cells.obs["cell_type"].astype(str),
                                  ref.obs["cell_type"].astype(str).to_numpy()[source])
    assert (tmp_path / "cells.png").stat().st_size > 10_000


def test_cells_per_spot_column_sets_the_cells_placed(data, tmp_path):
    spatial, reference = data
    st = ad.read_h5ad(spatial)
    st.obs["n_nuclei"] = np.random.default_rng(0).integers(1, 6, st.n_obs)
    st.write_h5ad(tmp_path / "with_nuclei.h5ad")
    out = tmp_path / "out"
    result = run("deconvolve", "-s", tmp_path / "with_nuclei.h5ad", "-r", reference, "-o", out,
                 "--cell-level", "--cells-per-spot", "n_nuclei", *FAST)
    assert result.exit_code == 0, result.output
    written = ad.read_h5ad(out / "spatial.h5ad")
    assert written.uns["cell_weights_spotlens"]["params"]["cells_per_spot"] == "n_nuclei"
    cells = ad.read_h5ad(out / "cells.h5ad")
    placed = cells.obs.groupby("spot", observed=False).size().reindex(st.obs_names, fill_value=0)
    np.testing.assert_array_equal(placed.to_numpy(), st.obs["n_nuclei"].to_numpy())


def test_cells_per_spot_number_is_the_mean_cells_placed(data, tmp_path):
    spatial, reference = data
    out = tmp_path / "out"
    result = run("deconvolve", "-s", spatial, "-r", reference, "-o", out, "--cell-level",
                 "--cells-per-spot", "3", *FAST)
    assert result.exit_code == 0, result.output
    params = ad.read_h5ad(out / "spatial.h5ad").uns["cell_weights_spotlens"]["params"]
    assert params["cells_per_spot"] == 3.0
    assert params["capture_ratio_from"] == "mean cells per spot"
    cells = ad.read_h5ad(out / "cells.h5ad")
    per_spot = cells.obs.groupby("spot", observed=False).size()
    assert per_spot.mean() == pytest.approx(3.0, abs=0.3)


def test_cells_per_spot_zero_exits_2_before_fitting(data, tmp_path):
    spatial, reference = data
    out = tmp_path / "out"
    result = run("deconvolve", "-s", spatial, "-r", reference, "-o", out, "--cell-level",
                 "--cells-per-spot", "0", *FAST)
    assert result.exit_code == 2
    assert "must be a finite number > 0" in result.stderr
    assert "stage 1/5" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("nope", None, "The spatial data has no obs column 'nope' for --cells-per-spot"),
        ("label", "text", "obs['label'] must be numeric"),
        ("n_nuclei", -1, "obs['n_nuclei'] has negative, NaN or infinite cell counts"),
    ],
)
def test_bad_cells_per_spot_exits_2_before_fitting(data, tmp_path, column, values, message):
    spatial, reference = data
    st = ad.read_h5ad(spatial)
    if values is not None:
        st.obs[column] = values
    st.write_h5ad(tmp_path / "st.h5ad")
    out = tmp_path / "out"
    result = run("deconvolve", "-s", tmp_path / "st.h5ad", "-r", reference, "-o", out,
                 "--cell-level", "--cells-per-spot", column, *FAST)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.output
    assert "stage 1/5" not in result.stderr  # refused before the type-level fit
    assert not out.exists()  # the folder it created is removed again


def test_cell_level_options_need_cell_level(data, tmp_path):
    spatial, reference = data
    result = run("deconvolve", "-s", spatial, "-r", reference, "-o", tmp_path,
                 "--n-candidates", "5", *FAST)
    assert result.exit_code == 2
    assert "error: --cells-per-spot and --n-candidates apply to the cell-level step; add " \
           "--cell-level." in result.stderr
    result = run("deconvolve", "-s", spatial, "-r", reference, "-o", tmp_path, "--cell-level",
                 "--n-candidates", "0", *FAST)
    assert result.exit_code == 2 and "--n-candidates" in result.stderr
    assert not (tmp_path / "proportions.csv").exists()


@pytest.fixture(scope="module")
def osmfish_part():
    """40 spots of the bundled osmFISH example, their cells and 12 other cells per type."""
    from spotlens.datasets import osmfish_cortex

    st, ref = osmfish_cortex()
    xy = st.obsm["spatial"]
    keep = np.argsort(np.linalg.norm(xy - np.median(xy, axis=0), axis=1), kind="stable")[:40]
    st = st[np.sort(keep)].copy()
    member = ref.obs["spot"].isin(st.obs_names).to_numpy()
    rng = np.random.default_rng(0)
    others = [rng.choice(np.flatnonzero(~member & (ref.obs["cell_type"] == t).to_numpy()), 12,
                         replace=False) for t in ref.obs["cell_type"].cat.categories]
    ref = ref[np.sort(np.concatenate([np.flatnonzero(member), *others]))].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].cat.remove_unused_categories()
    return st, ref


def test_demo_cell_level_prints_recall_and_count_error(osmfish_part, tmp_path, monkeypatch):
    st, ref = osmfish_part[0].copy(), osmfish_part[1].copy()
    fake = types.ModuleType("spotlens.datasets")
    fake.osmfish_cortex = lambda: (st, ref)
    monkeypatch.setitem(sys.modules, "spotlens.datasets", fake)

    result = run("demo", "-o", tmp_path, "--cell-level", "--no-progress", "-q")
    assert result.exit_code == 0, result.output
    assert all((tmp_path / name).is_file() for name in OUTPUTS + CELL_OUTPUTS)
    assert "Pearson r" in result.stdout

    # recompute both scores from the written files, independently of the CLI's code
    written = ad.read_h5ad(tmp_path / "spatial.h5ad")
    w = written.obsm["cell_weights_spotlens"].toarray()
    spot_of_cell = ref.obs["spot"].to_numpy()
    recall = []
    for i, (name, n) in enumerate(zip(written.obs_names, written.obs["n_cells"], strict=True)):
        ranked = [j for j in np.argsort(-w[i], kind="stable") if w[i, j] > 0][:n]
        recall.append(sum(spot_of_cell[j] == name for j in ranked) / n)
    truth = written.obsm["true_cell_counts"]
    pred = written.obsm["cell_counts_spotlens"].reindex(columns=truth.columns, fill_value=0)
    error = np.abs(pred.to_numpy() - truth.to_numpy()).mean()
    random = np.mean(written.obs["n_cells"].to_numpy() / ref.n_obs)

    printed = re.search(r"^  recall\s+([\d.]+).*random ([\d.]+)", result.stdout, re.MULTILINE)
    assert printed, result.stdout
    assert float(printed.group(1)) == pytest.approx(np.mean(recall), abs=5e-4)
    assert float(printed.group(2)) == pytest.approx(random, abs=5e-4)
    printed = re.search(r"^  count MAE\s+([\d.]+)", result.stdout, re.MULTILINE)
    assert printed and float(printed.group(1)) == pytest.approx(error, abs=5e-4)
    assert np.mean(recall) > 5 * random  # real cells are found, not drawn at random


def test_deconvolve_likelihood_flag(data, tmp_path):
    spatial, reference = data
    result = run("deconvolve", "-s", spatial, "-r", reference, "-o", tmp_path / "ls",
                 "--likelihood", "gaussian", *FAST)
    assert result.exit_code == 0, result.output
    written = ad.read_h5ad(tmp_path / "ls" / "spatial.h5ad")
    assert written.uns["proportions_spotlens"]["params"]["likelihood"] == "gaussian"
    bad = run("deconvolve", "-s", spatial, "-r", reference, "-o", tmp_path / "bad",
              "--likelihood", "nb", *FAST)
    assert bad.exit_code == 2
    assert "nb" in bad.output


# --- errors in the command line's terms --------------------------------------------------------


def error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_label_error_names_the_flag_not_the_keyword(data, tmp_path):
    spatial, reference = data
    result = run("deconvolve", "-s", spatial, "-r", reference, "-o", tmp_path / "out",
                 "--labels-key", "celltype", *FAST)
    assert result.exit_code == 2
    line = error_line(result)
    assert "Pass --labels-key naming the column" in line
    assert "labels_key" not in line


def test_min_cells_per_type_has_a_flag_and_errors_name_it(data, tmp_path):
    spatial, reference = data  # 25 reference cells of each type
    result = run("deconvolve", "-s", spatial, "-r", reference, "-o", tmp_path / "out",
                 "--min-cells-per-type", "30", *FAST)
    assert result.exit_code == 2
    line = error_line(result)
    assert "fewer than 30 reference cells" in line and "lower --min-cells-per-type" in line
    assert "min_cells_per_type" not in line
    missing = run("deconvolve", "-s", spatial, "-r", reference, "-o", tmp_path / "out",
                  "--reference-layer", "counts", *FAST)
    assert "Leave out --reference-layer to use X" in error_line(missing)


def test_counts_in_raw_are_read_with_layer_raw(data, tmp_path):
    spatial, reference = data
    st = ad.read_h5ad(spatial)
    counts = st.X.copy()
    st.raw = st.copy()
    st.X = np.log1p(np.asarray(st.X.todense() if sparse.issparse(st.X) else st.X) / 7.0)
    st.write_h5ad(tmp_path / "normalised.h5ad")

    refused = run("deconvolve", "-s", tmp_path / "normalised.h5ad", "-r", reference,
                  "-o", tmp_path / "out", *FAST)
    assert refused.exit_code == 2
    line = error_line(refused)
    assert "--layer counts" in line and "--layer raw" in line  # a route the CLI has
    assert "layer=" not in line and "adata.raw" not in line

    result = run("deconvolve", "-s", tmp_path / "normalised.h5ad", "-r", reference,
                 "-o", tmp_path / "out", "--layer", "raw", "-q", *FAST)
    assert result.exit_code == 0, result.output
    written = ad.read_h5ad(tmp_path / "out" / "spatial.h5ad")
    np.testing.assert_array_equal(sparse.csr_matrix(written.X).toarray(),
                                  sparse.csr_matrix(counts).toarray())
    assert "proportions_spotlens" in written.obsm

    no_raw = run("deconvolve", "-s", spatial, "-r", reference, "-o", tmp_path / "out2",
                 "--reference-layer", "raw", *FAST)
    assert no_raw.exit_code == 2
    assert "--reference-layer raw reads the counts held in .raw, but the reference has no " \
           ".raw" in error_line(no_raw)


def test_cli_message_rewrites_parameters_as_the_commands_flags():
    import typer

    from spotlens.cli._messages import cli_message

    command = typer.main.get_command(app).commands["deconvolve"]
    cases = {
        "Pass labels_key= naming the column.": "Pass --labels-key naming the column.",
        "The spatial data has no layer 'x'. Pass layer=None to use X.":
            "The spatial data has no layer 'x'. Leave out --layer to use X.",
        "The reference counts holds non-integer values: pass the raw counts, e.g. "
        "layer='counts', or adata.raw.to_adata().":
            "The reference counts holds non-integer values: pass the raw counts, e.g. "
            "--reference-layer counts, or --reference-layer raw (the counts in .raw).",
        "likelihood='poisson' runs on the CPU only; use device='cpu' without client=, or "
        "likelihood='gaussian' on a GPU.":
            "--likelihood poisson runs on the CPU only; use --device cpu, or "
            "--likelihood gaussian on a GPU.",
        "Pass cells_per_spot= (CLI: --cells-per-spot COLUMN) naming a column.":
            "Pass --cells-per-spot naming a column.",
        "Pass cells_per_spot= (--cells-per-spot, a column of obs).":
            "Pass --cells-per-spot (a column of obs).",
        "Use more shared genes, or n_genes_per_type=None to keep every expressed gene.":
            "Use more shared genes, or --n-genes-per-type all to keep every expressed gene.",
        "use_attention=False is slower; leave bin_size=None.":
            "--no-attention is slower; leave out --bin-size.",
        "Pass cells_per_spot= (--cells-per-spot on the command line) naming a column.":
            "Pass --cells-per-spot naming a column.",
        # left alone: quoted names, attributes, parameters without a flag, plain words
        "obs['labels_key'] is empty; pass key= naming its key_added; the layer holds X.":
            "obs['labels_key'] is empty; pass key= naming its key_added; the layer holds X.",
        "raise n_iter or tol=1e-05": "raise --n-iter or tol=1e-05",
    }
    for api, cli in cases.items():
        assert cli_message(api, command) == cli
    assert cli_message("Pass labels_key=.", None) == "Pass labels_key=."  # no command running


def test_input_error_is_importable_from_the_package():
    from spotlens import InputError
    from spotlens._validation import InputError as Defined

    assert InputError is Defined and issubclass(InputError, ValueError)

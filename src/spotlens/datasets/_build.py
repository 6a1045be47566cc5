"""Rebuild the bundled osmFISH example from its source folder (maintainers only).

Run as::

    python -m spotlens.datasets._build /path/to/osmfish_cortex_pseudospots [out_dir]

The source folder holds ``spatial.h5ad``, ``sc_reference.h5ad``, ``truth.csv``,
``truth_cell_counts.csv`` and ``truth_fine.csv`` (see ``data/README.md``). The ground truth is
recomputed exactly from the cells' spot membership and checked against the CSV files, which are
rounded to 6 decimals.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from .._keys import SPATIAL_KEY
from ._bundled import (
    REFERENCE_FILE,
    SPATIAL_FILE,
    TRUE_COUNTS,
    TRUE_COUNTS_FINE,
    TYPES,
    TYPES_FINE,
)

_TOLERANCE = 1e-5


def _cell_counts(
    reference: ad.AnnData, spots: pd.Index, column: str, types: pd.Index
) -> pd.DataFrame:
    """``n_spots × n_types`` number of reference cells of each type in each spot."""
    table = pd.crosstab(reference.obs["spot"].astype(str), reference.obs[column].astype(str))
    table = table.reindex(index=spots, columns=types)
    if table.isna().any().any():
        raise ValueError(f"spots or {column} types missing from the reference's spot membership")
    table.index.name = None
    table.columns.name = None
    return table.astype(np.int64)


def _proportions(counts: pd.DataFrame) -> pd.DataFrame:
    return counts.div(counts.sum(axis=1), axis=0).astype(np.float64)


def _check_close(mine: pd.DataFrame, theirs: pd.DataFrame, name: str) -> None:
    theirs = theirs.loc[mine.index, mine.columns]
    diff = float(np.abs(mine.to_numpy() - theirs.to_numpy()).max())
    if diff > _TOLERANCE:
        raise ValueError(f"{name}: recomputed truth differs from the CSV by {diff:g}")


def _compact(adata: ad.AnnData) -> ad.AnnData:
    """CSR float32 integer counts, categorical obs, no empty slots."""
    x = sparse.csr_matrix(adata.X, dtype=np.float32)
    x.eliminate_zeros()
    x.sort_indices()
    if not np.array_equal(x.data, np.round(x.data)):
        raise ValueError("counts are not integers")
    out = ad.AnnData(X=x, obs=adata.obs.copy(), var=pd.DataFrame(index=adata.var_names.copy()))
    out.obsm[SPATIAL_KEY] = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    return out


def build(source: Path, out: Path) -> tuple[Path, Path]:
    """Write the bundled spatial and reference h5ad files; return their paths."""
    spatial = ad.read_h5ad(source / "spatial.h5ad")
    reference = ad.read_h5ad(source / "sc_reference.h5ad")
    truth = pd.read_csv(source / "truth.csv", index_col=0)
    truth_counts = pd.read_csv(source / "truth_cell_counts.csv", index_col=0)
    truth_fine = pd.read_csv(source / "truth_fine.csv", index_col=0)

    spots = spatial.obs_names
    coarse = pd.Index(sorted(reference.obs["cell_type"].astype(str).unique()))
    fine = pd.Index(sorted(reference.obs["cell_type_fine"].astype(str).unique()))
    counts = _cell_counts(reference, spots, "cell_type", coarse)
    counts_fine = _cell_counts(reference, spots, "cell_type_fine", fine)
    if not (counts.to_numpy() == truth_counts.loc[spots, coarse].to_numpy()).all():
        raise ValueError("truth_cell_counts.csv disagrees with the reference's spot membership")
    _check_close(_proportions(counts), truth, "truth.csv")
    _check_close(_proportions(counts_fine), truth_fine, "truth_fine.csv")

    membership = sparse.csr_matrix(
        (np.ones(reference.n_obs), (spots.get_indexer(reference.obs["spot"].astype(str)),
                                    np.arange(reference.n_obs))),
        shape=(spatial.n_obs, reference.n_obs),
    )
    summed = (membership @ sparse.csr_matrix(reference.X, dtype=np.float64)).toarray()
    if not np.array_equal(summed, sparse.csr_matrix(spatial.X).toarray()):
        raise ValueError("spot counts are not the sum of their cells' counts")

    # Stored as integer arrays with the type names in uns (compact, and no "/" in h5 keys);
    # the loader turns them into the documented DataFrames and derives the proportions.
    st = _compact(spatial)
    st.obsm[TRUE_COUNTS] = counts.to_numpy().astype(np.int16)
    st.obsm[TRUE_COUNTS_FINE] = counts_fine.to_numpy().astype(np.int16)
    st.uns[TYPES] = coarse.to_numpy(dtype=object)
    st.uns[TYPES_FINE] = fine.to_numpy(dtype=object)
    ref = _compact(reference)

    out.mkdir(parents=True, exist_ok=True)
    paths = out / SPATIAL_FILE, out / REFERENCE_FILE
    for adata, path in zip((st, ref), paths, strict=True):
        adata.write_h5ad(path, compression="gzip", compression_opts=9)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``source [out_dir]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit(__doc__)
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / "data"
    for path in build(Path(argv[0]), out):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

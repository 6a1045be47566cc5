"""Shared fixtures: a small part of the bundled real example and a synthetic pair with truth.

The real pair is cut from the osmFISH cortex example shipped inside the package
(:func:`spotlens.datasets.osmfish_cortex`), so every contract test runs in a fresh clone; only
tests of real-data results need ``../shared/data`` and skip, saying why, without it. Real data
are read once per session and handed to each test as a copy, so no test can leak a mutation
into another. The synthetic factory returns the ground truth it simulated from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

#: The part of the bundled osmFISH example the contract tests run on (see ``bundled_part``).
BUNDLED_SPOTS = 100
BUNDLED_CELLS_PER_TYPE = 25


@dataclass(frozen=True)
class SyntheticPair:
    """A simulated spatial dataset, its reference and the truth it was drawn from.

    Attributes
    ----------
    spatial
        ``n_spots × n_genes`` raw counts, grid coordinates in ``obsm["spatial"]``.
    reference
        ``n_cells × n_genes`` raw counts, types in ``obs["cell_type"]``.
    true_proportions
        ``n_spots × n_types`` cell fractions per spot (rows sum to 1), columns = type names.
    true_cells
        ``n_spots`` number of cells simulated in each spot.
    profiles
        ``n_types × n_genes`` expected counts per cell of each type.
    """

    spatial: ad.AnnData
    reference: ad.AnnData
    true_proportions: pd.DataFrame
    true_cells: pd.Series
    profiles: pd.DataFrame

    def copy(self) -> SyntheticPair:
        return SyntheticPair(
            self.spatial.copy(), self.reference.copy(), self.true_proportions.copy(),
            self.true_cells.copy(), self.profiles.copy(),
        )


def make_synthetic(
    *,
    n_types: int = 8,
    n_genes: int = 150,
    grid: tuple[int, int] = (20, 15),
    cells_per_spot: float = 8.0,
    cells_per_type: int = 30,
    library_range: tuple[float, float] = (30.0, 90.0),
    marker_fold: float = 6.0,
    seed: int = 0,
) -> SyntheticPair:
    """Poisson counts of known, spatially smooth proportions × cells × type profiles.

    Each type has a library size in ``library_range`` counts per cell (default 30–90, so a spot
    of ~9 cells has ~500 counts, like a sparse Visium spot), a log-normal baseline over all
    genes and six marker genes (``marker_fold`` × up). Spot proportions are a softmax of smooth
    random fields (sums of Gaussian bumps), so neighbouring spots are alike; each spot holds
    1 + Poisson(``cells_per_spot``) cells. Reference cells are Poisson draws from the same
    profiles with a log-normal per-cell size factor.
    """
    rng = np.random.default_rng(seed)
    types = [f"type_{k}" for k in range(n_types)]
    genes = [f"gene_{g:03d}" for g in range(n_genes)]

    base = rng.lognormal(0.0, 1.0, size=(n_types, n_genes))
    n_markers = 6
    for k in range(n_types):
        base[k, k * n_markers:(k + 1) * n_markers] *= marker_fold
    lib = rng.uniform(*library_range, size=n_types)
    profiles = base / base.sum(axis=1, keepdims=True) * lib[:, None]

    nx, ny = grid
    xx, yy = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float))
    coords = np.column_stack([xx.ravel(), yy.ravel()]) * 100.0  # 100 µm spacing
    n_spots = coords.shape[0]
    field = np.zeros((n_spots, n_types))
    for k in range(n_types):
        for _ in range(3):
            centre = rng.uniform([0, 0], [nx * 100.0, ny * 100.0])
            width = rng.uniform(250, 600)
            height = rng.normal(0, 2.0)
            field[:, k] += height * np.exp(-((coords - centre) ** 2).sum(1) / (2 * width**2))
    logits = 1.5 * field
    props = np.exp(logits - logits.max(axis=1, keepdims=True))
    props /= props.sum(axis=1, keepdims=True)

    n_cells = rng.poisson(cells_per_spot, size=n_spots) + 1
    mu = (props * n_cells[:, None]) @ profiles
    counts = rng.poisson(mu).astype(np.float32)
    spot_names = [f"spot_{i:04d}" for i in range(n_spots)]
    spatial = ad.AnnData(
        X=sparse.csr_matrix(counts),
        obs=pd.DataFrame(index=spot_names),
        var=pd.DataFrame(index=genes),
    )
    spatial.obsm["spatial"] = coords

    ref_types = np.repeat(np.arange(n_types), cells_per_type)
    size = rng.lognormal(0.0, 0.3, size=ref_types.size)
    ref_counts = rng.poisson(profiles[ref_types] * size[:, None]).astype(np.float32)
    reference = ad.AnnData(
        X=sparse.csr_matrix(ref_counts),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical([types[k] for k in ref_types], categories=types)},
            index=[f"cell_{i:04d}" for i in range(ref_types.size)],
        ),
        var=pd.DataFrame(index=genes),
    )
    truth = pd.DataFrame(props, index=spot_names, columns=types)
    return SyntheticPair(
        spatial, reference, truth, pd.Series(n_cells, index=spot_names, name="n_cells"),
        pd.DataFrame(profiles, index=types, columns=genes),
    )


@pytest.fixture(scope="session")
def _synthetic_session() -> SyntheticPair:
    return make_synthetic()


@pytest.fixture
def synthetic(_synthetic_session) -> SyntheticPair:
    """A fresh copy of the synthetic pair (8 types, 150 genes, 300 spots on a grid)."""
    return _synthetic_session.copy()


@pytest.fixture
def make_pair():
    """The synthetic factory itself, for tests that need other sizes (see ``make_synthetic``)."""
    return make_synthetic


def bundled_part(
    n_spots: int = BUNDLED_SPOTS, cells_per_type: int = BUNDLED_CELLS_PER_TYPE, seed: int = 0
) -> tuple[ad.AnnData, ad.AnnData]:
    """A contiguous patch of the bundled osmFISH cortex and a stratified sample of its cells.

    The ``n_spots`` pseudo-spots nearest the section's median position (neighbours of each
    other, so the spot graph is that of a real slide) and ``cells_per_type`` reference cells of
    each of the 11 coarse types drawn without replacement with ``seed``: small enough that a fit
    with fixed penalties takes under a second, real enough to carry real sparsity, depth and
    type overlap. Keys are those of :func:`spotlens.datasets.osmfish_cortex` (raw counts in
    ``X``, µm in ``obsm["spatial"]``, ``obs["cell_type"]``, ground truth in
    ``obsm["true_proportions"]``); every spot has counts.
    """
    from spotlens.datasets import osmfish_cortex

    spatial, reference = osmfish_cortex()
    xy = np.asarray(spatial.obsm["spatial"])
    near = np.argsort(np.linalg.norm(xy - np.median(xy, axis=0), axis=1), kind="stable")
    spatial = spatial[np.sort(near[:n_spots])].copy()
    rng = np.random.default_rng(seed)
    labels = reference.obs["cell_type"]
    cells = [rng.choice(np.flatnonzero((labels == t).to_numpy()), cells_per_type, replace=False)
             for t in labels.cat.categories]
    reference = reference[np.sort(np.concatenate(cells))].copy()
    return spatial, reference


@pytest.fixture(scope="session")
def _bundled_session() -> tuple[ad.AnnData, ad.AnnData]:
    return bundled_part()


@pytest.fixture
def bundled(_bundled_session) -> tuple[ad.AnnData, ad.AnnData]:
    """Fresh copies of the real pair the contract tests use (see ``bundled_part``).

    Spatial: 100 osmFISH pseudo-spots × 33 genes (raw counts, 103–2,503 per spot); reference:
    275 cells × 33 genes, 11 types of 25 cells in ``obs["cell_type"]``.
    """
    spatial, reference = _bundled_session
    return spatial.copy(), reference.copy()


@pytest.fixture(scope="session")
def bundled_files(_bundled_session, tmp_path_factory) -> tuple[Path, Path]:
    """The same pair written once as ``spatial.h5ad`` and ``sc_reference.h5ad``, for the CLI.

    Read-only for tests: a test that needs a changed file writes its own copy.
    """
    folder = tmp_path_factory.mktemp("bundled_part")
    spatial, reference = _bundled_session
    spatial.write_h5ad(folder / "spatial.h5ad")
    reference.write_h5ad(folder / "sc_reference.h5ad")
    return folder / "spatial.h5ad", folder / "sc_reference.h5ad"


def _local_client(*, processes: bool):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=processes,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def process_client():
    """A 2-worker ``distributed`` LocalCluster with worker processes (nothing shared with the
    test, as on a real cluster)."""
    yield from _local_client(processes=True)


@pytest.fixture(scope="module")
def thread_client():
    """A 2-worker LocalCluster on threads of this process (cheaper to start)."""
    yield from _local_client(processes=False)

"""The digitiser of benchmarks/vignette_check.py reads back values from plots it did not make.

The benchmark compares spotlens with values read off the spacexr vignettes' plots; these tests
draw such plots (matplotlib, with a colour bar or light grey gridlines as ggplot draws them)
from known values and check that positions and colours are read back.
"""

from __future__ import annotations

import importlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def vc():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("vignette_check")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _render(fig) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB")).astype(float)


def _hex_grid(n_side: int, seed: int) -> np.ndarray:
    """Spot centres on a jittered grid (spots far enough apart to be drawn as separate points)."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2) * 100.0
    return g + rng.uniform(-10, 10, g.shape) + 1000.0


def test_continuous_plot_is_read_back(vc):
    coords = _hex_grid(15, seed=0)
    values = np.random.default_rng(1).uniform(0.0, 0.5, len(coords))
    fig, ax = plt.subplots(figsize=(6.7, 4.8))
    sc = ax.scatter(coords[:, 0], coords[:, 1], c=values, s=6, cmap="jet", vmin=0, vmax=0.5,
                    linewidths=0)
    fig.colorbar(sc, ax=ax)
    image = _render(fig)
    bar_x = int(image.shape[1] * 0.78)
    centres, colours = vc.points(image, (0, 0, bar_x, image.shape[0]))
    assert len(centres) == len(coords)
    idx, dist = vc.register_all(centres, coords)
    assert dist.max() < 1.5
    assert len(set(idx)) == len(coords)  # every spot found its own point
    read = vc.colour_bar(image, bar_x, (0.0, 0.5))(colours)[idx]
    assert np.corrcoef(read, values)[0, 1] > 0.99
    assert np.abs(read - values).max() < 0.03


def test_subset_plot_is_registered_by_its_gridlines(vc):
    coords = _hex_grid(12, seed=2)
    shown = np.random.default_rng(3).choice(len(coords), 40, replace=False)
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.set_facecolor("white")
    ax.scatter(coords[shown, 0], coords[shown, 1], s=8, color="#E68FAC", linewidths=0,
               zorder=3)
    ax.set_xticks(np.arange(500, 3000, 500))
    ax.set_yticks(np.arange(500, 3000, 500))
    ax.grid(color="#EBEBEB", linewidth=1.0)
    ax.set_axisbelow(True)
    image = _render(fig)
    h, w = image.shape[:2]
    centres, _ = vc.points(image, (int(0.13 * w) + 3, int(0.12 * h) + 3, int(0.9 * w) - 3,
                                   int(0.88 * h) - 3))
    assert len(centres) == len(shown)
    idx, dist = vc.register_subset(centres, coords, image, step=500.0)
    assert dist.max() < 1.5
    assert sorted(idx) == sorted(shown)


def test_umi_shares_weigh_cells_by_their_umi(vc):
    import anndata as ad
    import pandas as pd

    ref = ad.AnnData(np.ones((4, 2)), obs=pd.DataFrame(
        {"cell_type": ["a", "a", "b", "b"], "nUMI": [1000.0, 1000.0, 3000.0, 3000.0]},
        index=[f"c{i}" for i in range(4)]))
    cells = pd.DataFrame({"a": [0.5, 1.0], "b": [0.5, 0.0]}, index=["s1", "s2"])
    umi = vc.umi_shares(cells, ref)
    np.testing.assert_allclose(umi.loc["s1"].to_numpy(), [0.25, 0.75])
    np.testing.assert_allclose(umi.loc["s2"].to_numpy(), [1.0, 0.0])

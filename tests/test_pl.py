"""spotlens.pl.proportions: one map per cell type plus the dominant type."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spotlens
from spotlens._validation import InputError

TYPES = ["Astro", "Neuron", "Oligo"]
KEY = "proportions_spotlens"


@pytest.fixture
def st():
    """6 spots on a 3 × 2 grid; spot s5 has no counts (NaN proportions)."""
    xy = np.array([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]], dtype=float) * 100
    props = np.array([
        [0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1],
        [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [np.nan, np.nan, np.nan],
    ])
    names = [f"s{i}" for i in range(6)]
    adata = ad.AnnData(np.ones((6, 2), dtype=np.float32), obs=pd.DataFrame(index=names))
    adata.obsm["spatial"] = xy
    adata.obsm[KEY] = pd.DataFrame(props, index=names, columns=TYPES)
    return adata


def panels(fig):
    """The map axes (the colourbar axes has no title)."""
    return [ax for ax in fig.axes if ax.get_title()]


def test_one_panel_per_type_then_dominant(st):
    fig = spotlens.pl.proportions(st)
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == [*TYPES, "dominant cell type"]
    for ax in axes:
        assert ax.yaxis_inverted()  # image orientation: y grows downwards
        assert ax.get_aspect() == 1.0
        lo, hi = ax.get_xlim()
        assert lo < 0 and hi > 200  # every spot is inside the frame
    # one shared 0–1 colour scale, with a colourbar labelled "proportion"
    for ax in axes[:-1]:
        norm = ax.collections[0].norm
        assert (norm.vmin, norm.vmax) == (0.0, 1.0)
    colorbars = [ax for ax in fig.axes if ax not in axes]
    assert len(colorbars) == 1 and colorbars[0].get_ylabel() == "proportion"


def test_dominant_panel_colours_the_argmax_type(st):
    fig = spotlens.pl.proportions(st)
    ax = panels(fig)[-1]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["Astro", "Neuron", "Oligo", "no counts"]
    colours = ax.collections[0].get_facecolors()
    # s0 and s1 are both Astro-dominated: same colour; s2 (Neuron) differs; s5 is the grey
    np.testing.assert_array_equal(colours[0], colours[1])
    assert not np.array_equal(colours[0], colours[2])
    assert not np.array_equal(colours[5], colours[0])


def test_cell_types_select_and_order_panels(st):
    fig = spotlens.pl.proportions(st, cell_types=["Oligo", "Astro"], ncols=2)
    assert [ax.get_title() for ax in panels(fig)] == ["Oligo", "Astro", "dominant cell type"]
    with pytest.raises(InputError, match="Unknown cell types"):
        spotlens.pl.proportions(st, cell_types=["Microglia"])


def test_missing_key_names_the_function_that_writes_it(st):
    del st.obsm[KEY]
    with pytest.raises(InputError, match=r"spotlens\.deconv\.deconvolve"):
        spotlens.pl.proportions(st)


def test_bad_arguments_are_rejected(st):
    with pytest.raises(InputError, match="ncols"):
        spotlens.pl.proportions(st, ncols=0)
    with pytest.raises(InputError, match="spot_size"):
        spotlens.pl.proportions(st, spot_size=-1)
    with pytest.raises(InputError, match="obsm"):
        spotlens.pl.proportions(st, spatial_key="X_umap")


def test_saves_a_png_without_touching_pyplot(st, tmp_path):
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    fig = spotlens.pl.proportions(st, spot_size=80)
    spotlens.io.save_figure(fig, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert plt.get_fignums() == open_before  # no figure left open in pyplot

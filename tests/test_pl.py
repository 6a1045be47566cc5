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
    fig = spotlens.pl.proportions(st, vmax=1.0)
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == [*TYPES, "dominant cell type"]
    for ax in axes:
        assert ax.yaxis_inverted()  # image orientation: y grows downwards
        assert ax.get_aspect() == 1.0
        lo, hi = ax.get_xlim()
        assert lo < 0 and hi > 200  # every spot is inside the frame
    # vmax=1.0: one shared 0–1 colour scale, with a single colourbar labelled "proportion"
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


# --- spotlens.pl.cells -------------------------------------------------------------------------

DIAMETER = 50.0


@pytest.fixture
def placed():
    """3 spots (footprint 50 units) and 7 cells of types A/B/C inside them, as assign_cells."""
    centres = np.array([[0, 0], [100, 0], [0, 100]], dtype=float)
    spots = ad.AnnData(np.ones((3, 2), dtype=np.float32),
                       obs=pd.DataFrame(index=["s0", "s1", "s2"]))
    spots.obsm["spatial"] = centres
    spot = np.array([0, 0, 0, 1, 1, 2, 2])
    offset = np.array([[5, 5], [-10, 0], [0, 12], [3, -4], [-8, 8], [10, 0], [0, -15]], float)
    cell_type = pd.Categorical(["A", "A", "B", "C", "B", "A", "C"], categories=["A", "B", "C"])
    cells = ad.AnnData(
        np.ones((7, 2), dtype=np.float32),
        obs=pd.DataFrame({"spot": pd.Categorical(np.array(["s0", "s1", "s2"])[spot]),
                          "cell_type": cell_type, "weight": np.linspace(0.2, 1.4, 7)},
                         index=[f"cell_{i}" for i in range(7)]),
    )
    cells.obsm["spatial"] = centres[spot] + offset
    cells.uns["spot_diameter"] = DIAMETER
    return cells, spots


def map_axes(fig):
    return [ax for ax in fig.axes if ax.get_title()]


def test_cells_draws_footprints_in_data_units_and_dots_by_type(placed):
    from matplotlib.collections import EllipseCollection

    cells, spots = placed
    fig = spotlens.pl.cells(cells, spots)
    (ax,) = map_axes(fig)  # 3 spots: no zoom panel
    assert ax.get_title() == "7 cells in 3 spots"
    assert ax.yaxis_inverted() and ax.get_aspect() == 1.0
    discs, dots = ax.collections[0], ax.collections[-1]
    # footprints: one light grey disc per spot, DIAMETER wide in data units
    assert isinstance(discs, EllipseCollection)
    np.testing.assert_array_equal(discs.get_offsets(), spots.obsm["spatial"])
    np.testing.assert_allclose(discs.get_widths(), DIAMETER)
    grey = discs.get_facecolors()[0]
    assert grey[0] == grey[1] == grey[2] and grey[0] > 0.85
    # cells: at their positions, one colour per type, in the legend in category order
    np.testing.assert_array_equal(dots.get_offsets(), cells.obsm["spatial"])
    colours = [tuple(c) for c in dots.get_facecolors()]
    by_type = {t: {colours[i] for i in np.flatnonzero(cells.obs["cell_type"] == t)}
               for t in ["A", "B", "C"]}
    assert all(len(c) == 1 for c in by_type.values())
    used = set.union(*by_type.values())
    assert len(used) == 3 and tuple(grey) not in used
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["A", "B", "C"]
    assert legend.get_title().get_text() == "cell_type"
    # every footprint is inside the frame
    (x0, x1), (y1, y0) = ax.get_xlim(), ax.get_ylim()
    assert x0 <= -DIAMETER / 2 and x1 >= 100 + DIAMETER / 2
    assert y0 <= -DIAMETER / 2 and y1 >= 100 + DIAMETER / 2


def test_cells_zoom_box_adds_a_panel_and_marks_it(placed):
    from matplotlib.patches import Rectangle

    cells, spots = placed
    fig = spotlens.pl.cells(cells, spots, zoom=(-30, -30, 30, 30))
    overview, zoomed = map_axes(fig)
    assert zoomed.get_xlim() == (-30, 30) and zoomed.get_ylim() == (30, -30)
    assert zoomed.get_title() == "zoom: 3 cells, 1 spots"
    assert zoomed.get_aspect() == 1.0
    boxes = [p for p in overview.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 1 and boxes[0].get_xy() == (-30, -30) and boxes[0].get_width() == 60


def test_cells_auto_zoom_on_a_large_slide():
    """15 × 15 spots: 'auto' zooms on a 5 × 5 block of spots, where both types are."""
    grid = np.array([[x, y] for y in range(15) for x in range(15)], dtype=float) * 100
    spots = ad.AnnData(np.ones((len(grid), 1), dtype=np.float32),
                       obs=pd.DataFrame(index=[f"s{i}" for i in range(len(grid))]))
    spots.obsm["spatial"] = grid
    rng = np.random.default_rng(0)
    which = np.repeat(np.arange(len(grid)), 3)
    # one type everywhere except a second type in the spots near (1000, 1000)
    near = np.linalg.norm(grid[which] - [1000, 1000], axis=1) <= 100
    cells = ad.AnnData(
        np.ones((len(which), 1), dtype=np.float32),
        obs=pd.DataFrame({"cell_type": np.where(near, "rare", "common")},
                         index=[f"c{i}" for i in range(len(which))]),
    )
    cells.obsm["spatial"] = grid[which] + rng.uniform(-20, 20, (len(which), 2))
    cells.uns["spot_diameter"] = 55.0
    overview, zoomed = map_axes(spotlens.pl.cells(cells, spots))
    (x0, x1), (y1, y0) = zoomed.get_xlim(), zoomed.get_ylim()
    # 4 pitches between the outer centres, plus a footprint and a 10 % margin
    assert x1 - x0 == pytest.approx(400 + 1.1 * 55) and y1 - y0 == pytest.approx(400 + 1.1 * 55)
    xy = cells.obsm["spatial"]
    inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
    assert set(cells.obs["cell_type"][inside]) == {"rare", "common"}  # shows both types
    assert zoomed.get_title() == f"zoom: {inside.sum()} cells, 25 spots"
    assert len(map_axes(spotlens.pl.cells(cells, spots, zoom=None))) == 1


def test_cells_numeric_colour_and_no_spots(placed):
    cells, _ = placed
    fig = spotlens.pl.cells(cells, color="weight", zoom=None)
    (ax,) = map_axes(fig)
    assert ax.get_title() == "7 cells"
    assert len(ax.collections) == 1  # dots only, no footprints
    colorbars = [a for a in fig.axes if a is not ax]
    assert len(colorbars) == 1 and colorbars[0].get_ylabel() == "weight"
    norm = ax.collections[0].norm
    assert (norm.vmin, norm.vmax) == pytest.approx((0.2, 1.4))


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        ("no_positions", {}, r"cells\.obsm has no 'spatial'"),
        (None, {"color": "state"}, "cells.obs has no column 'state'"),
        (None, {"spatial_key": "xy"}, r"no obsm\['xy'\]"),
        (None, {"zoom": (30, 30, -30, -30)}, "x_min < x_max"),
        (None, {"zoom": 0}, "positive number of spots"),
        (None, {"zoom": -3}, r"^zoom must be a positive number of spots, got -3\.$"),
        (None, {"zoom": np.int64(0)}, r"zoom must be a positive number of spots, got np\.int64"),
        (None, {"zoom": "big"}, "zoom must be 'auto'"),
        (None, {"cell_size": -1}, "cell_size must be a positive number"),
        (None, {"spot_size": float("nan")}, "spot_size must be a positive number"),
    ],
)
def test_cells_rejects_bad_input(placed, change, kwargs, message):
    cells, spots = placed
    if change == "no_positions":
        del cells.obsm["spatial"]
    with pytest.raises(InputError, match=message):
        spotlens.pl.cells(cells, spots, **kwargs)


def test_cells_needs_anndata(placed):
    cells, spots = placed
    with pytest.raises(InputError, match="cells needs an AnnData"):
        spotlens.pl.cells(cells.obs)
    with pytest.raises(InputError, match="spatial needs an AnnData"):
        spotlens.pl.cells(cells, spots.obsm["spatial"])


def test_cells_saves_a_png_without_touching_pyplot(placed, tmp_path):
    import matplotlib.pyplot as plt

    cells, spots = placed
    open_before = plt.get_fignums()
    spotlens.io.save_figure(spotlens.pl.cells(cells, spots), tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert plt.get_fignums() == open_before


# --- colours: one palette per set of cell types, stored in uns as scanpy does -----------------

COLORS = "proportions_spotlens_colors"


def dominant_rgb(fig, spot):
    """RGB of a spot in the dominant-type panel."""
    ax = [ax for ax in fig.axes if ax.get_title() == "dominant cell type"][0]
    return tuple(ax.collections[0].get_facecolors()[spot][:3])


def cells_at(spatial, types, spots, *, categories=None):
    """Cells of the given types placed at the centres of the given spots of ``spatial``."""
    cells = ad.AnnData(
        np.ones((len(types), 1), dtype=np.float32),
        obs=pd.DataFrame({"cell_type": pd.Categorical(types, categories=categories)},
                         index=[f"c{i}" for i in range(len(types))]),
    )
    cells.obsm["spatial"] = spatial.obsm["spatial"][spots] + 5.0
    cells.uns["spot_diameter"] = 50.0
    return cells


def cell_rgb(fig, cells, cell_type):
    dots = fig.axes[0].collections[-1]
    (i,) = np.flatnonzero(cells.obs["cell_type"] == cell_type)[:1]
    return tuple(dots.get_facecolors()[i][:3])


def test_a_type_keeps_its_colour_when_other_types_stop_dominating(st):
    from matplotlib.colors import to_rgb

    full = spotlens.pl.proportions(st)
    # the palette is written once, scanpy-style: hex colours aligned with the columns
    stored = st.uns[COLORS]
    assert len(stored) == len(TYPES) and len(set(stored)) == len(TYPES)
    assert dominant_rgb(full, 2) == to_rgb(stored[TYPES.index("Neuron")])
    # a slide where Astro dominates nowhere (s2: Neuron, s4: Oligo), no stored palette
    part = st[[2, 4]].copy()
    del part.uns[COLORS]
    again = spotlens.pl.proportions(part)
    assert dominant_rgb(again, 0) == dominant_rgb(full, 2)  # Neuron
    assert dominant_rgb(again, 1) == dominant_rgb(full, 4)  # Oligo
    # a repeated call reuses the stored palette: same object, same colours
    third = spotlens.pl.proportions(st)
    assert st.uns[COLORS] is stored
    assert dominant_rgb(third, 2) == dominant_rgb(full, 2)


def test_cells_take_the_colours_of_their_types_in_the_proportions(st):
    # no Astro cells, categories in another order than the proportions' columns
    cells = cells_at(st, ["Oligo", "Neuron", "Oligo"], [4, 2, 4],
                     categories=["Oligo", "Neuron"])
    uns_before = set(st.uns)
    fig = spotlens.pl.cells(cells, st, zoom=None)
    assert set(st.uns) == uns_before  # spatial is only read
    spots = spotlens.pl.proportions(st)
    assert cell_rgb(fig, cells, "Neuron") == dominant_rgb(spots, 2)
    assert cell_rgb(fig, cells, "Oligo") == dominant_rgb(spots, 4)
    # written for scanpy, aligned with the cells' categories; reused on the next call
    assert cells.uns["cell_type_colors"] == [st.uns[COLORS][2], st.uns[COLORS][1]]
    st.uns[COLORS] = ["#000000", "#111111", "#222222"]
    fig = spotlens.pl.cells(cells, st, zoom=None)
    assert cell_rgb(fig, cells, "Neuron") == dominant_rgb(spots, 2)  # cells' own palette wins


def test_a_stored_palette_is_used_and_extended_not_overwritten(st):
    from matplotlib.colors import to_rgb

    st.uns[COLORS] = ["red", "lime", "blue"]
    fig = spotlens.pl.proportions(st)
    assert dominant_rgb(fig, 0) == to_rgb("red") and dominant_rgb(fig, 2) == to_rgb("lime")
    assert st.uns[COLORS] == ["red", "lime", "blue"]  # left as the user set it
    # one stored colour for three types: it is kept, the new types get colours not yet used
    st.uns[COLORS] = ["#ff7f0e"]  # the colour the default would give the second type
    fig = spotlens.pl.proportions(st)
    assert st.uns[COLORS][0] == "#ff7f0e" and len(set(st.uns[COLORS])) == 3
    assert dominant_rgb(fig, 0) == to_rgb("#ff7f0e")
    assert len({dominant_rgb(fig, i) for i in (0, 2, 4)}) == 3


def test_plotting_changes_nothing_but_the_palette(st):
    obs, obsm = st.obs.copy(), {k: v.copy() for k, v in st.obsm.items()}
    spotlens.pl.proportions(st, dominant=False)
    assert COLORS not in st.uns  # no categorical colours drawn: nothing written
    spotlens.pl.proportions(st)
    assert set(st.uns) == {COLORS}
    pd.testing.assert_frame_equal(st.obs, obs)
    for k, v in obsm.items():
        np.testing.assert_array_equal(np.asarray(st.obsm[k]), np.asarray(v))


def test_a_broken_palette_is_reported_with_the_fix(st):
    st.uns[COLORS] = ["not a colour", "red", "blue"]
    with pytest.raises(InputError, match=r"del adata\.uns\['proportions_spotlens_colors'\]"):
        spotlens.pl.proportions(st)


# --- colour scale per panel --------------------------------------------------------------------

def colorbar_top(fig, title):
    """Top of the colour bar of the panel titled ``title``, as read off the figure."""
    ax = [ax for ax in fig.axes if ax.get_title() == title][0]
    return ax.collections[0].colorbar.ax.get_ylim()[1]


def test_each_panel_has_its_own_scale_and_colourbar_by_default(st):
    fig = spotlens.pl.proportions(st)
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == len(TYPES)
    assert all(cb.get_ylabel() == "proportion" for cb in colorbars)
    # rare Oligo (at most 0.4) is not squashed into the bottom of a 0–1 scale
    assert colorbar_top(fig, "Oligo") == pytest.approx(0.4)
    assert colorbar_top(fig, "Neuron") == pytest.approx(0.8)
    oligo = [ax for ax in fig.axes if ax.get_title() == "Oligo"][0].collections[0]
    assert oligo.norm(0.4) == pytest.approx(1.0)  # its richest spot gets the top colour


def test_vmax_forms(st):
    fig = spotlens.pl.proportions(st, vmax="p50")
    assert colorbar_top(fig, "Astro") == pytest.approx(0.3)  # median of 0.7 0.6 0.1 0.2 0.3
    fig = spotlens.pl.proportions(st, vmax=[1.0, "p100", None], dominant=False)
    assert [colorbar_top(fig, t) for t in TYPES] == pytest.approx([1.0, 0.8, 0.4])
    fig = spotlens.pl.proportions(st, vmax=0.5)
    assert len([ax for ax in fig.axes if ax.get_label() == "<colorbar>"]) == 1
    assert colorbar_top(fig, "Oligo") == pytest.approx(0.5)
    for bad in ["max", "p0", "p101", -1, 0, float("nan"), True, [1.0, 1.0]]:
        with pytest.raises(InputError, match="vmax must be|vmax holds"):
            spotlens.pl.proportions(st, vmax=bad)


def test_a_type_absent_everywhere_gets_a_usable_scale(st):
    st.obsm[KEY]["Oligo"] = [0.0, 0.0, 0.0, 0.0, 0.0, np.nan]
    fig = spotlens.pl.proportions(st)
    assert colorbar_top(fig, "Oligo") == pytest.approx(1.0)


# --- ax=: draw into axes of your own -----------------------------------------------------------

def test_proportions_draws_into_given_axes(st):
    from matplotlib.figure import Figure

    mine = Figure(layout="constrained")
    axs = mine.subplots(2, 2)
    fig = spotlens.pl.proportions(st, ax=axs)  # a 2-D array, filled row by row
    assert fig is mine
    assert [ax.get_title() for ax in axs.ravel()] == [*TYPES, "dominant cell type"]
    assert all(ax.collections for ax in axs.ravel())
    one = Figure().subplots()
    fig = spotlens.pl.proportions(st, cell_types="Oligo", dominant=False, ax=one)
    assert fig is one.figure and one.get_title() == "Oligo"


def test_proportions_rejects_the_wrong_axes(st):
    from matplotlib.figure import Figure

    with pytest.raises(InputError, match=r"ax holds 2 Axes but this plot draws 4 panel"):
        spotlens.pl.proportions(st, ax=Figure().subplots(1, 2))
    with pytest.raises(InputError, match="different figures"):
        spotlens.pl.proportions(st, cell_types="Oligo", ax=[Figure().subplots(),
                                                            Figure().subplots()])
    with pytest.raises(InputError, match="ax must be a matplotlib Axes"):
        spotlens.pl.proportions(st, ax="left")


def test_cells_draws_into_given_axes(placed):
    from matplotlib.figure import Figure

    cells, spots = placed
    mine = Figure()
    one = mine.subplots()
    assert spotlens.pl.cells(cells, spots, ax=one) is mine
    assert one.get_title() == "7 cells in 3 spots" and len(mine.axes) == 1
    two = Figure().subplots(1, 2)
    fig = spotlens.pl.cells(cells, spots, zoom=(-30, -30, 30, 30), ax=two)
    assert fig is two[0].figure and two[1].get_title() == "zoom: 3 cells, 1 spots"
    with pytest.raises(InputError, match="ax holds 1 Axes but this plot draws 2 panel"):
        spotlens.pl.cells(cells, spots, zoom=(-30, -30, 30, 30), ax=Figure().subplots())


@pytest.fixture
def expression():
    adata = ad.AnnData(np.arange(12, dtype=np.float32).reshape(4, 3),
                       obs=pd.DataFrame(index=[f"s{i}" for i in range(4)]),
                       var=pd.DataFrame(index=["G1", "G2", "G3"]))
    adata.obsm["spatial"] = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], dtype=float)
    return adata


def test_overlay_draws_into_given_axes(expression):
    from matplotlib.figure import Figure

    mine = Figure()
    axs = mine.subplots(1, 2)
    assert spotlens.pl.overlay(expression, ["G2", "G1"], ax=axs) is mine
    assert [ax.get_title() for ax in axs] == ["G2", "G1"]
    np.testing.assert_allclose(axs[0].collections[0].get_array(), [1, 4, 7, 10])
    with pytest.raises(InputError, match="ax holds 2 Axes but this plot draws 1 panel"):
        spotlens.pl.overlay(expression, "G1", ax=axs)


# --- proportions_to_obs: results scanpy can colour by --------------------------------------------

def test_proportions_to_obs_copies_each_type(st):
    spotlens.pl.proportions_to_obs(st)
    for t in TYPES:
        np.testing.assert_array_equal(st.obs[t].to_numpy(), st.obsm[KEY][t].to_numpy())
        assert st.obs[t].dtype == np.float64
    assert np.isnan(st.obs.loc["s5", "Astro"])
    spotlens.pl.proportions_to_obs(st, prefix="prop_", cell_types=["Oligo"])
    assert list(st.obs.columns) == [*TYPES, "prop_Oligo"]


def test_proportions_to_obs_refuses_to_clobber(st):
    st.obs["Neuron"] = "annotated"
    with pytest.raises(InputError, match=r"already has columns \['Neuron'\].*overwrite=True"):
        spotlens.pl.proportions_to_obs(st)
    assert list(st.obs.columns) == ["Neuron"]  # nothing written on error
    spotlens.pl.proportions_to_obs(st, overwrite=True)
    assert st.obs["Neuron"].tolist()[:2] == [0.2, 0.3]
    genes = ad.AnnData(st.X, obs=st.obs[[]], var=pd.DataFrame(index=["Astro", "Mbp"]))
    genes.obsm[KEY] = st.obsm[KEY]
    with pytest.raises(InputError, match=r"genes in adata\.var_names.*prefix"):
        spotlens.pl.proportions_to_obs(genes)
    with pytest.raises(InputError, match=r"spotlens\.deconv\.deconvolve"):
        spotlens.pl.proportions_to_obs(st, key="proportions_rctd")


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # scanpy's use of matplotlib
def test_scanpy_spatial_colours_by_the_copied_proportions(st):
    sc = pytest.importorskip("scanpy")
    import matplotlib.pyplot as plt

    spotlens.pl.proportions_to_obs(st)
    axs = sc.pl.spatial(st, color=["Astro", "Oligo"], spot_size=80, show=False)
    try:
        drawn = np.ma.masked_invalid(axs[1].collections[0].get_array()).compressed()
        np.testing.assert_allclose(np.sort(drawn), [0.1, 0.1, 0.1, 0.1, 0.4])  # scanpy sorts
    finally:
        plt.close("all")

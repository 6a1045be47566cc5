"""Multi-scale tile features and per-section standardisation."""

from __future__ import annotations

import numpy as np
import pytest

from spotlens._validation import InputError
from spotlens.histology._features import multiscale_features
from spotlens.histology._normalize import feature_moments, standardize_section
from spotlens.histology._tiles import check_tile_scales


def test_standardize_section_zscores_each_feature():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(200, 4))
    x[:, 2] = 7.0  # constant in this section
    z = standardize_section(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, [0, 1, 3]].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, [0, 1, 3]].std(axis=0), 1, atol=1e-4)
    assert np.all(z[:, 2] == 0)
    # a section-wide shift and scale of the features (another stain, another scanner) is gone
    np.testing.assert_allclose(standardize_section(2.5 * x + 40), z, atol=1e-4)
    assert np.all(x[:, 2] == 7.0)  # input untouched


def test_standardize_parts_with_the_whole_sections_moments():
    """Regions of a slide standardised apart equal the whole slide standardised at once."""
    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, 1.0, size=(300, 6))
    parts = [x[:120], x[120:250], x[250:]]
    moments = [feature_moments(p) for p in parts]
    total = {k: sum(m[k] for m in moments) for k in moments[0]}
    stitched = np.vstack([standardize_section(p, total) for p in parts])
    np.testing.assert_allclose(stitched, standardize_section(x), atol=1e-5)
    # a part standardised by itself is not the same thing
    assert not np.allclose(standardize_section(parts[0]), standardize_section(x)[:120], atol=1e-2)
    with pytest.raises(InputError, match="6 features"):
        standardize_section(x[:, :3], total)
    with pytest.raises(InputError, match="without spots"):
        standardize_section(np.empty((0, 6)))


def test_wider_tiles_see_the_tissue_around_the_spot():
    # a red 40-px square centred on the spot, blue everywhere else
    image = np.zeros((400, 400, 3), dtype=np.uint8)
    image[..., 2] = 255
    image[180:220, 180:220] = (255, 0, 0)
    centre = np.array([[199.5, 199.5]])
    feats = multiscale_features(image, centre, 40.0, None, scales=(1, 2, 4), out_px=32)
    dim = feats.shape[1] // 3
    red_mean = [feats[0, k * dim] for k in range(3)]  # first colour feature: mean of R
    # scale 1 is the square only; scale 2 has it on a quarter of the area, scale 4 a 16th
    assert red_mean[0] == pytest.approx(255, abs=3)
    assert red_mean[1] == pytest.approx(255 / 4, abs=6)
    assert red_mean[2] == pytest.approx(255 / 16, abs=4)


def test_tile_scales_are_checked():
    assert check_tile_scales([1, 2.0, 4]) == (1.0, 2.0, 4.0)
    for bad in ([], [0, 1], [1, 1], ["a"], [np.inf]):
        with pytest.raises(InputError, match="tile_scales"):
            check_tile_scales(bad)
    with pytest.raises(InputError, match="side_px"):
        multiscale_features(np.zeros((10, 10, 3), np.uint8), [[5, 5]], 0.0, None)


def test_multiscale_features_in_chunks_equal_one_pass(monkeypatch):
    import spotlens.histology._features as features

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    centres = rng.uniform(20, 100, size=(11, 2))
    whole = multiscale_features(image, centres, 12.0, None, scales=(1, 2), out_px=16)
    monkeypatch.setattr(features, "_SPOTS_PER_CHUNK", 4)
    chunked = multiscale_features(image, centres, 12.0, None, scales=(1, 2), out_px=16)
    assert chunked.shape == (11, 2 * 25)
    np.testing.assert_array_equal(chunked, whole)

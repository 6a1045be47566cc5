"""Cell-type colours kept in ``uns`` the way scanpy keeps them, so they stay the same everywhere.

scanpy stores the colours of a categorical ``obs[key]`` as ``uns[f"{key}_colors"]``: a list of
colours aligned with the categories. spotlens does the same for the cell types of a proportions
table ``obsm[key]``: ``uns[f"{key}_colors"]`` is aligned with its columns (e.g.
``uns["proportions_spotlens_colors"]``), and for the cells of
:func:`spotlens.deconv.assign_cells` ``uns["cell_type_colors"]`` is aligned with the categories
of ``obs["cell_type"]``, which is what ``sc.pl.spatial(cells, color="cell_type")`` reads.

A stored palette is always reused, never overwritten; a palette is written only when it is
missing, or extended (existing entries kept) when there are more types than stored colours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from anndata import AnnData

from .._validation import InputError


def _palette(n: int) -> list[str]:
    """Return ``n`` distinct colours (tab10; tab20 dark shades, then light; tab20b, tab20c).

    Beyond 60 colours the list repeats.
    """
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if n <= 10:
        names = ["tab10"]
    elif n <= 20:
        names = ["tab20"]
    else:
        names = ["tab20", "tab20b", "tab20c"]
    colors = [to_hex(c) for name in names for c in colormaps[name].colors]
    if n > 10:  # tab20 pairs a dark and a light shade of each hue: all dark ones first
        colors[:20] = colors[0:20:2] + colors[1:20:2]
    return [colors[i % len(colors)] for i in range(n)]


def _stored(adata: AnnData, uns_key: str) -> list[str] | None:
    """Return ``adata.uns[uns_key]`` as hex colours (None when absent), or raise if invalid."""
    from matplotlib.colors import to_hex

    if uns_key not in adata.uns:
        return None
    value = adata.uns[uns_key]
    try:
        entries = [value] if isinstance(value, str) else list(value)
        return [to_hex(c, keep_alpha=False) for c in entries]
    except (TypeError, ValueError):
        raise InputError(
            f"adata.uns[{uns_key!r}] must be a list of colours (e.g. '#1f77b4'), one per cell "
            f"type, got {value!r}. Fix it, or delete it (del adata.uns[{uns_key!r}]) to get the "
            "default palette."
        ) from None


def resolve_colors(
    names: Sequence[str],
    stored: Sequence[str] | None = None,
    seed: Mapping[str, str] | None = None,
) -> list[str]:
    """Return one colour per name: the stored ones first, then colours not used yet.

    Parameters
    ----------
    names
        ``n_types`` names, in the order of the columns or categories.
    stored
        Colours already stored, aligned with the first ``len(stored)`` names (extra ones are
        ignored, as scanpy does).
    seed
        Colours to prefer for names without a stored colour (e.g. the palette of another
        AnnData with the same types), used when not already taken.

    Returns
    -------
    ``n_types`` hex colours. Without ``stored`` and ``seed`` this is :func:`_palette` of
    ``n_types``; a name's new colour is the first default colour no other name uses.
    """
    from matplotlib.colors import to_hex

    stored = list(stored or [])[: len(names)]
    used = set(stored)
    colors = list(stored)
    defaults = iter(_palette(len(names)))
    for name in names[len(stored):]:
        wanted = to_hex(seed[name]) if seed and name in seed else None
        if wanted is None or wanted in used:
            wanted = next((c for c in defaults if c not in used), None)
            if wanted is None:  # more types than distinct colours: repeat them
                wanted = _palette(len(colors) + 1)[-1]
        used.add(wanted)
        colors.append(wanted)
    return colors


def type_colors(
    adata: AnnData,
    uns_key: str,
    names: Sequence[str],
    *,
    seed: Mapping[str, str] | None = None,
    write: bool = True,
) -> dict[str, str]:
    """Return ``{name: hex colour}`` from ``adata.uns[uns_key]``, filling in what is missing.

    With ``write``, ``adata.uns[uns_key]`` is set to the list of colours aligned with ``names``
    only when it was missing or shorter than ``names`` (existing entries are kept); a complete
    stored palette is left as it is.

    Raises
    ------
    InputError
        ``adata.uns[uns_key]`` holds something that is not a list of colours.
    """
    names = [str(n) for n in names]
    stored = _stored(adata, uns_key)
    colors = resolve_colors(names, stored, seed)
    if write and (stored is None or len(stored) < len(names)):
        adata.uns[uns_key] = colors
    return dict(zip(names, colors, strict=True))

"""The one place where AnnData key names are built."""

from __future__ import annotations

DEFAULT_METHOD = "spotlens"
SPATIAL_KEY = "spatial"
CONNECTIVITIES_KEY = "spatial_connectivities"


def proportions_key(method: str = DEFAULT_METHOD) -> str:
    """Return ``obsm`` key of cell-type proportions (rows sum to 1)."""
    return f"proportions_{method}"


def abundance_key(key_added: str) -> str:
    """Return ``obsm`` key of estimated cells per spot and type (from the proportions key)."""
    if key_added.startswith("proportions_"):
        return "abundance_" + key_added[len("proportions_") :]
    return f"{key_added}_abundance"


def zero_counts_key(key_added: str) -> str:
    """Return ``obs`` key flagging spots that had no counts over the genes used."""
    return f"{key_added}_zero_counts"


def fit_score_key(key_added: str) -> str:
    """Return ``obs`` key of each spot's goodness-of-fit score (1 = a typical spot)."""
    return f"{key_added}_fit_score"


def poorly_fit_key(key_added: str) -> str:
    """Return ``obs`` key flagging spots far outside what the reference explains."""
    return f"{key_added}_poorly_fit"

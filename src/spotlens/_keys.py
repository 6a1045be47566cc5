"""The one place where AnnData key names are built."""

from __future__ import annotations

import re

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


#: ``uns`` key of the table that :func:`spotlens.io.write_h5ad` writes when it stores names
#: under :func:`storage_name` (columns ``where``, ``stored``, ``name``), so readers restore them.
STORED_NAMES_KEY = "spotlens_stored_names"

_STORED_ESCAPE = re.compile("%(25|2F)")


def storage_name(name: str) -> str:
    """Return ``name`` as an h5ad file can hold it as a key: ``/`` → ``%2F``, ``%`` → ``%25``.

    anndata stores ``obsm``/``uns`` keys and DataFrame column names as HDF5 names, where ``/``
    separates groups (anndata's next release refuses it). This percent-encoding is reversible
    (:func:`name_from_storage`) and leaves names without ``/`` or ``%`` unchanged. Only storage
    uses it: labels in memory, tables and plots keep the user's names (``"T/NK"``).

    Examples
    --------
    >>> storage_name("Microglia/Macrophage")
    'Microglia%2FMacrophage'
    >>> name_from_storage(storage_name("CD4+/CD8- 5%"))
    'CD4+/CD8- 5%'
    """
    return name.replace("%", "%25").replace("/", "%2F")


def name_from_storage(stored: str) -> str:
    """Return the name that :func:`storage_name` encoded as ``stored``."""
    return _STORED_ESCAPE.sub(lambda m: "%" if m.group(1) == "25" else "/", stored)

"""Names with ``/`` in ``.h5ad`` files: written percent-encoded, restored on reading.

anndata stores the keys of ``obsm``/``varm``/``obsp``/``varp``/``layers``/``uns`` and the column
names of DataFrames (``obs``, ``var``, DataFrames in ``obsm``/``varm``/``uns``) as HDF5 names,
in which ``/`` separates groups: anndata 0.12 warns and its next release refuses. Cell-type
labels such as ``"Microglia/Macrophage"`` become such names (the columns of
``obsm["proportions_spotlens"]``). :func:`escape_names` stores them under
:func:`~spotlens._keys.storage_name` (``"Microglia%2FMacrophage"``) and records each change in
``uns[STORED_NAMES_KEY]`` (a table ``where``/``stored``/``name``); :func:`restore_names` undoes
it after reading, so the labels users see never change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

import pandas as pd
from anndata import AnnData

from .._keys import STORED_NAMES_KEY, storage_name

logger = logging.getLogger("spotlens")

#: AnnData parts whose DataFrame columns (``obs``, ``var``) or mapping keys (the others) are
#: HDF5 names; DataFrames inside ``obsm``/``varm`` and mappings inside ``uns`` are walked too.
PARTS = ("obs", "var", "obsm", "varm", "obsp", "varp", "layers", "uns")
RECORD_COLUMNS = ["where", "stored", "name"]


def escape_names(parts: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Return ``parts`` with every container holding a name with ``/`` replaced by an encoded copy.

    Parameters
    ----------
    parts
        The AnnData parts to write, by name (``"obs"``, ``"obsm"``, ``"uns"``, ... as in
        :data:`PARTS`); not modified (a container that changes is copied, arrays are shared).

    Returns
    -------
    parts
        New mapping of parts. In a container (mapping or DataFrame columns) where a name holds
        ``/``, every name is encoded with :func:`~spotlens._keys.storage_name` (names without
        ``/`` or ``%`` stay as they are); each change is a row of
        ``uns[STORED_NAMES_KEY]`` (``where``: the container's path of stored names joined by
        ``/``, e.g. ``"obsm/proportions_spotlens"``; ``stored``; ``name``), after the rows
        already there.
    changed
        The original names that were encoded.
    """
    rows: list[tuple[str, str, str]] = []
    out = dict(parts)
    for part in PARTS:
        if out.get(part) is not None:
            out[part] = _escape(out[part], (part,), rows)
    if rows:
        uns = dict(out.get("uns") or {})
        before = uns.get(STORED_NAMES_KEY)
        new = pd.DataFrame(rows, columns=RECORD_COLUMNS)
        if isinstance(before, pd.DataFrame) and list(before.columns) == RECORD_COLUMNS:
            new = pd.concat([before, new], ignore_index=True)
        new.index = new.index.astype(str)
        uns[STORED_NAMES_KEY] = new
        out["uns"] = uns
    return out, [name for _, _, name in rows]


def _escape(value: Any, where: tuple[str, ...], rows: list) -> Any:
    if isinstance(value, pd.DataFrame):
        if not any(isinstance(c, str) and "/" in c for c in value.columns):
            return value
        names = [storage_name(c) if isinstance(c, str) else c for c in value.columns]
        rows.extend(("/".join(where), s, c) for s, c in zip(names, value.columns, strict=True)
                    if s != c)
        frame = value.copy(deep=False)
        frame.columns = names
        return frame
    if not isinstance(value, Mapping):
        return value
    slashed = any(isinstance(k, str) and "/" in k for k in value)
    out = {}
    for key, item in value.items():
        stored = storage_name(key) if slashed and isinstance(key, str) else key
        if stored != key:
            rows.append(("/".join(where), stored, key))  # before its children: see restore
        out[stored] = _escape(item, (*where, str(stored)), rows)
    if not slashed and all(out[k] is value[k] for k in value):
        return value
    return out


def restore_names(adata: AnnData) -> None:
    """Undo :func:`escape_names` on a freshly read AnnData, in place, and drop the record.

    Rows are undone last to first, so names inside a renamed container are restored before
    the container's own name. A row whose container is not found (the file was edited) is
    skipped with a logged warning.
    """
    record = adata.uns.pop(STORED_NAMES_KEY, None) if STORED_NAMES_KEY in adata.uns else None
    if record is None:
        return
    if not isinstance(record, pd.DataFrame) or list(record.columns) != RECORD_COLUMNS:
        logger.warning("uns[%r] is not a table of stored names; names are left as stored",
                       STORED_NAMES_KEY)
        return
    for where, stored, name in reversed(list(record.itertuples(index=False, name=None))):
        container = _find(adata, str(where).split("/"))
        if isinstance(container, pd.DataFrame) and stored in container.columns:
            container.columns = [name if c == stored else c for c in container.columns]
        elif isinstance(container, MutableMapping) and stored in container:
            items = list(container.items())
            container.clear()
            for key, item in items:
                container[name if key == stored else key] = item
        else:
            logger.warning("stored name %r not found in %s; left as stored", stored, where)


def _find(adata: AnnData, path: list[str]) -> Any:
    if path[0] not in PARTS:
        return None
    value: Any = getattr(adata, path[0])
    for key in path[1:]:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value

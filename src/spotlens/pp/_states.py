"""Cell states within each reference cell type (k-means on a PCA of the reference)."""

from __future__ import annotations

import numpy as np


def cell_states(
    embedding: np.ndarray,
    codes: np.ndarray,
    n_types: int,
    *,
    cells_per_state: int,
    max_states_per_type: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split each cell type into transcriptional states.

    Type ``k`` with ``n_k`` cells gets ``min(max_states_per_type, max(1, n_k // cells_per_state))``
    states by k-means on the cells' embedding, so every state averages about ``cells_per_state``
    cells or more and its signature stays precise.

    Parameters
    ----------
    embedding
        ``n_cells × d`` embedding of the reference cells.
    codes
        ``n_cells`` type codes in ``[0, n_types)``.
    n_types
        Number of types.
    cells_per_state
        Cells per state (≥ 1).
    max_states_per_type
        Upper bound on states per type.
    seed
        k-means seed.

    Returns
    -------
    state_codes
        ``n_cells`` state codes in ``[0, n_states)``; the states of one type are contiguous.
    state_type
        ``n_states`` type code of each state.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    state_codes = np.empty(len(codes), dtype=np.int64)
    state_type: list[int] = []
    for k in range(n_types):
        members = np.flatnonzero(codes == k)
        n_states = int(min(max_states_per_type, max(1, len(members) // cells_per_state)))
        if n_states > 1:
            # small k-means problems: OpenMP start-up costs more than it saves
            with threadpool_limits(limits=1):
                km = KMeans(n_states, n_init=4, random_state=seed)
                labels = km.fit_predict(embedding[members])
            # k-means may leave a cluster empty only in degenerate cases; renumber densely
            _, labels = np.unique(labels, return_inverse=True)
            n_states = int(labels.max()) + 1
        else:
            labels = np.zeros(len(members), dtype=np.int64)
        state_codes[members] = len(state_type) + labels
        state_type.extend([k] * n_states)
    return state_codes, np.asarray(state_type, dtype=np.int64)

"""Example data: a bundled real dataset with ground truth, real pairs, and simulations.

- :func:`osmfish_cortex` / :func:`osmfish_heldout`: osmFISH mouse cortex pseudo-spots with known
  cell-type proportions, shipped with the package.
- :func:`load_pair`: real spatial/reference pairs read from the shared data folder (not shipped).
- :func:`synthetic`: simulated spots and reference, with ground truth, from 100 to 10⁶ spots.
- :func:`synthetic_nuclei`: spots summed from nuclei of known type and expression (the
  nucleus-level model's ground truth).
- :func:`pseudo_spots`: synthspot-style spots summed from the cells of a real reference, in
  regions of known composition pattern, and the held-out half of that reference.
"""

from __future__ import annotations

from ._bundled import osmfish_cortex, osmfish_heldout
from ._pairs import PAIRS, load_pair
from ._pseudo_spots import pseudo_spots
from ._synthetic import synthetic
from ._synthetic_nuclei import synthetic_nuclei

__all__ = [
    "PAIRS", "load_pair", "osmfish_cortex", "osmfish_heldout", "pseudo_spots", "synthetic",
    "synthetic_nuclei",
]

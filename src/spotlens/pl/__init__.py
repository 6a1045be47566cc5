"""Plotting: reads the documented keys, returns matplotlib Figures; never calls ``show``."""

from ._cells import cells
from ._overlay import overlay
from ._proportions import proportions, proportions_to_obs

__all__ = ["cells", "overlay", "proportions", "proportions_to_obs"]

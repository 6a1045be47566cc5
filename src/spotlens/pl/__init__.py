"""Plotting: reads the documented keys, returns matplotlib Figures; never calls ``show``."""

from ._cells import cells
from ._overlay import overlay
from ._prediction import prediction
from ._proportions import proportions, proportions_to_obs

__all__ = ["cells", "overlay", "prediction", "proportions", "proportions_to_obs"]

"""Plotting: reads the documented keys, returns matplotlib Figures; never calls ``show``.

:func:`report` writes a self-contained HTML page instead of a Figure: the tissue image as a
zoomable pyramid with the results on top, to open in a browser.
"""

from ._cells import cells
from ._overlay import overlay
from ._prediction import prediction
from ._proportions import proportions, proportions_to_obs
from ._report import report

__all__ = ["cells", "overlay", "prediction", "proportions", "proportions_to_obs", "report"]

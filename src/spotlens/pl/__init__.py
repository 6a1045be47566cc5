"""Plotting: reads the documented keys, returns matplotlib Figures; never calls ``show``."""

from ._proportions import proportions

__all__ = ["proportions"]

"""Cell-type deconvolution: public API and pure kernels."""

from ._api import DeconvolutionResult, deconvolve

__all__ = ["DeconvolutionResult", "deconvolve"]

"""Preprocessing: reference signatures and informative genes."""

from ._signatures import Signatures, reference_signatures, signature_kernel

__all__ = ["Signatures", "reference_signatures", "signature_kernel"]

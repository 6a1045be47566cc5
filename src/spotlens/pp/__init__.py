"""Preprocessing: reference signatures and informative genes."""

from ._signatures import Signatures, reference_signatures, shrink_profiles, signature_kernel

__all__ = ["Signatures", "reference_signatures", "shrink_profiles", "signature_kernel"]

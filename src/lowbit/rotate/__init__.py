"""Incoherence processing: orthogonal rotations applied to a layer's inputs before quantization."""

from .hadamard import HadamardRotation, RotateError, fwht, hadamard_block

__all__ = ["HadamardRotation", "RotateError", "fwht", "hadamard_block"]

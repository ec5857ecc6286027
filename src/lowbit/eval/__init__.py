"""Evaluation: fidelity to the original model, and the true size of an artifact."""

from .metrics import causal_lm_fidelity, encoder_fidelity, mean_pool
from .size import artifact_size

__all__ = ["artifact_size", "causal_lm_fidelity", "encoder_fidelity", "mean_pool"]

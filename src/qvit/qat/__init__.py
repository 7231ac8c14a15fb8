"""Quantization-aware training: oscillation tracking and remedies, losses, the training loop."""
from .oscillation import OscillationState, OscillationTracker, cosine_schedule

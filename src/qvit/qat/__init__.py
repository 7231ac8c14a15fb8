"""Quantization-aware training: oscillation tracking and remedies, losses, the training loop."""
from .oscillation import OscillationState, OscillationTracker, commit_frozen, cosine_schedule
from .regularizers import bin_regularizer, dampening_loss
from .losses import distillation_loss, hard_and_soft_loss, soft_cross_entropy
from .cga import ConfidenceGuidedAnnealing, confidence_mask
from .callbacks import Callback, create_callback, list_callbacks, register_callback
from .trainer import QATTrainer, TrainConfig, copy_teacher
from .pipeline import initialise_qat, quantize_qat
from .batchnorm import reestimate_bn

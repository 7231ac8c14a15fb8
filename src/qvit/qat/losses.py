"""Distillation losses for QAT: soft cross-entropy, temperature KD from an online teacher, OFQ's hard + soft form."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """``mean_b( -Σ_c p_bc · log_softmax(logits)_bc )`` for logits ``[B, C]`` and probabilities ``[B, C]`` (0-d).

    VVTQ's multi-crop loss with soft labels (no temperature)."""
    if logits.shape != target_probs.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target probabilities {tuple(target_probs.shape)} differ")
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Hinton's KD: ``T² · soft_cross_entropy(student / T, softmax(teacher / T))`` (0-d); the teacher is detached."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    t = float(temperature)
    probs = F.softmax(teacher_logits.detach() / t, dim=-1)
    return soft_cross_entropy(student_logits / t, probs) * t * t


def hard_and_soft_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0, dist_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """OFQ's ``KDLossSoftandHard``: ``CE(cls logits, labels) + KD(dist logits, teacher cls logits)`` with weights 1:1
    (T = 1 in the reference). Models with one head (no distillation token) use their logits for both terms."""
    soft_from = student_logits if dist_logits is None else dist_logits
    return F.cross_entropy(student_logits, labels) + distillation_loss(soft_from, teacher_logits, temperature)

"""The boomerang distillation loss: CE + w_kl * KL(teacher || student) * T^2 + w_cos * mean(1 - cos).

Optionally + w_mse * mean relative squared error of the aligned hidden states, which also aligns their
norms (cosine alone leaves the residual stream's scale free, and patched teacher blocks add to that scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Paper defaults (as its code sets them); a weight of 0 switches the term off."""

    ce: float = 1.0
    kl: float = 0.1
    cos: float = 2.0
    temperature: float = 1.0
    mse: float = 0.0
    patch: float = 0.0  # KL of a randomly patched variant to the teacher (computed by the trainer)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # logits: [batch, seq, vocab]; labels, mask: [batch, seq]
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")  # [b*s]
    return (per_token * mask.flatten()).sum() / mask.sum()


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token at temperature T, averaged over unmasked tokens, times T^2."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [b, s, vocab]
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [b, s, vocab]
    per_token = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # [b, s]
    return (per_token * mask).sum() / mask.sum() * temperature**2


def cosine_alignment(student_states, teacher_states, pairs, mask: torch.Tensor) -> torch.Tensor:
    """Mean over aligned (student, teacher) hidden states of the masked mean of (1 - cosine)."""
    terms = []
    for s_index, t_index in pairs:
        cos = F.cosine_similarity(student_states[s_index].float(), teacher_states[t_index].float(), dim=-1)  # [b, s]
        terms.append(((1 - cos) * mask).sum() / mask.sum())
    return torch.stack(terms).mean()


def relative_mse_alignment(student_states, teacher_states, pairs, mask: torch.Tensor) -> torch.Tensor:
    """Mean over aligned hidden states of the masked mean of ||h_s - h_t||^2 / ||h_t||^2."""
    terms = []
    for s_index, t_index in pairs:
        target = teacher_states[t_index].float()  # [b, s, hidden]
        error = (student_states[s_index].float() - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp(min=1e-6)
        terms.append((error * mask).sum() / mask.sum())
    return torch.stack(terms).mean()


def distillation_loss(student_out, teacher_out, labels: torch.Tensor, mask: torch.Tensor, pairs,
                      weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted total, and each unweighted term for the log (terms with weight 0 are not computed)."""
    terms: dict[str, torch.Tensor] = {}
    if weights.ce:
        terms["ce"] = cross_entropy(student_out.logits, labels, mask)
    if weights.kl:
        terms["kl"] = kl_divergence(student_out.logits, teacher_out.logits, mask, weights.temperature)
    if weights.cos:
        terms["cos"] = cosine_alignment(student_out.hidden_states, teacher_out.hidden_states, pairs, mask)
    if weights.mse:
        terms["mse"] = relative_mse_alignment(student_out.hidden_states, teacher_out.hidden_states, pairs, mask)
    if not terms and not weights.patch:
        raise ValueError("every loss term is switched off")
    total = sum((getattr(weights, name) * value for name, value in terms.items()), torch.zeros(()))
    return total, {name: float(value.detach()) for name, value in terms.items()}

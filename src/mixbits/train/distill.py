"""Knowledge distillation loss (Hinton et al., 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The T² factor keeps gradient magnitudes comparable to cross-entropy across temperatures. The teacher
    logits are treated as constants (detached), so in-place distillation from a larger subnet of the
    same supernet never pushes the teacher towards the student.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)

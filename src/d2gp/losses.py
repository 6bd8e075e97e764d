r"""The three D2GP losses: gradient (distillation), imitation, supervised.

With the student run :math:`x_K^s` (preconditioned by :math:`P_\theta`), the teacher run
:math:`x_K^t` and the ground truth :math:`x`:

* gradient loss, averaged over the K iterations and the batch,
  :math:`L_g = \frac1K \sum_k \big(1 - \cos(P_\theta(\nabla f_s(z_k), k), \nabla f_t(z_k))\big)`,
  the cosine taken per image over all pixels (so the teacher gradient's scale is irrelevant);
* imitation loss :math:`L_i = \operatorname{mean}(x_K^s - x_K^t)^2`;
* supervised loss :math:`L_s = \operatorname{mean}(x_K^s - x)^2`.

The paper sums the gradient term over k; the mean keeps its size (0…2) independent of K, and
the weights λ below balance it against the per-pixel MSE terms (~1e-3).

Where the teacher's gradient is taken (the paper leaves it open), :data:`TEACHER_GRADIENT_AT`:

* ``"student"``: at the student's own iterates z_k^s — P_θ(∇f_s(z_k^s), k) is aligned with
  ∇f_t(z_k^s); the preconditioned gradient is the one the student actually stepped with;
* ``"teacher"``: along the teacher's trajectory z_k^t — P_θ(∇f_s(z_k^t), k) is aligned with
  ∇f_t(z_k^t), a regression of the operator on the points the teacher visits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["TEACHER_GRADIENT_AT", "cosine_distance", "gradient_loss", "imitation_loss", "supervised_loss", "LossWeights"]

TEACHER_GRADIENT_AT = ("student", "teacher")


def cosine_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-image 1 − cos(a, b) over all non-batch dimensions, shape ``(B,)``, in [0, 2]."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    dot = (a * b).sum(1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    return 1 - dot / norms.clamp_min(eps)


def gradient_loss(preconditioned: Sequence[torch.Tensor], teacher_gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_g: mean over iterations and images of 1 − cos(P∇f_s, ∇f_t)."""
    if len(preconditioned) != len(teacher_gradients) or not preconditioned:
        raise ValueError(f"need one teacher gradient per iteration, got {len(preconditioned)} and {len(teacher_gradients)}")
    return torch.stack([cosine_distance(p, t).mean() for p, t in zip(preconditioned, teacher_gradients)]).mean()


def imitation_loss(student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
    """L_i: per-pixel mean squared difference between the student's and the teacher's x_K."""
    return (student_output.float() - teacher_output.float()).pow(2).mean()


def supervised_loss(student_output: torch.Tensor, ground_truth: torch.Tensor) -> torch.Tensor:
    """L_s: per-pixel mean squared error of the student's x_K."""
    return (student_output.float() - ground_truth.float()).pow(2).mean()


@dataclass(frozen=True)
class LossWeights:
    """λ_g, λ_i, λ_s of L = λ_g L_g + λ_i L_i + λ_s L_s. ``supervised()`` is the L_s-only method."""

    gradient: float = 1.0
    imitation: float = 300.0
    supervised: float = 300.0

    def __post_init__(self):
        for name in ("gradient", "imitation", "supervised"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"loss weight λ_{name} must be ≥ 0, got {value}")
        if self.gradient == self.imitation == self.supervised == 0:
            raise ValueError("all loss weights are zero: nothing to train")

    @property
    def needs_teacher(self) -> bool:
        return self.gradient > 0 or self.imitation > 0

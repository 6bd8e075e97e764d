r"""Preconditioners P(g, k) for preconditioned plug-and-play FISTA (:mod:`d2gp.solver`).

* :class:`Identity`: P(g, k) = g (plain PnP-FISTA);
* :class:`NPO`: the learned nonlinear preconditioning operator (a small ConvNeXt conditioned
  on the iteration index through an :class:`IterationEncoding`).
"""

from __future__ import annotations

import torch
from torch import nn

from d2gp.preconditioners.encoding import IterationEncoding
from d2gp.preconditioners.npo import NPO

__all__ = ["NPO", "IterationEncoding", "Identity"]


class Identity(nn.Module):
    """The identity preconditioner P(g, k) = g, as a module (no parameters)."""

    uses_iterate = False

    def forward(self, grad: torch.Tensor, k=None, iterate=None) -> torch.Tensor:
        return grad

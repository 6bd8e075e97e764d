r"""A learned preconditioner on top of a tuned classical one: :math:`P(g, k) = P_θ(c\,B g, k)`.

Learning a global correction (the image mean of a {0, 1} single-pixel camera, a Fourier-domain
weighting for MRI) from the identity through the unrolled loss is hard for a local network. A
*refined* preconditioner starts instead from the best classical one: :math:`B` is a fixed
linear preconditioner (Newton's :math:`(A^\top A + δI)^{-1}`, a polynomial, or the identity)
with its tuned step :math:`γ_B`, and the learned part :math:`P_θ` (an NPO or a learned linear
preconditioner, the identity at initialisation) acts on its output. The gain
:math:`c = γ_B / γ` folds the base's tuned step into the operator, so the solver keeps the
task's step γ = 1/L:

.. math::

    x_{k+1} = D\big(z_k − γ\,P_θ(c\,B\,∇f(z_k), k)\big), \qquad
    γ\,c\,B = γ_B\,B \ \text{at initialisation (}P_θ = I\text{)},

so preconditioned FISTA starts exactly as the tuned classical method and training only has to
improve on it. An NPO is positively homogeneous (:math:`P_θ(c\,g) = c\,P_θ(g)`), so the gain
does not change what it sees. With the identity as base, this is an NPO that starts from the
tuned step size instead of 1/L.

The base is not a trained parameter: it is rebuilt from the task's student operator and the
recorded :attr:`Refined.base_spec` (method, candidate, steps) when a weights file is loaded
(:func:`d2gp.preconditioners.files.load_npo`).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = ["Refined", "build_base"]


def build_base(spec: dict[str, Any], task) -> Optional[nn.Module]:
    """The classical preconditioner ``spec`` names (``{"method": "newton", "candidate": "delta=0.01·L", …}``,
    as :func:`d2gp.tuning.tune_classical` records it) for ``task``'s student operator (``None``: the identity)."""
    from d2gp.tuning import classical_candidates

    candidates = classical_candidates(spec["method"], task)
    if spec["candidate"] not in candidates:
        raise ValueError(f"base preconditioner {spec['method']!r} has no candidate {spec['candidate']!r} "
                         f"(known: {', '.join(candidates)})")
    base = candidates[spec["candidate"]]()
    return base.to(task.device) if base is not None else None


class Refined(nn.Module):
    r""":math:`P(g, k) = P_θ(c\,B g, k)`: a learned preconditioner ``learned`` on top of a fixed ``base``.

    :param base: the classical preconditioner B (``None``: the identity); not a submodule — its
        buffers are neither trained nor saved (it is rebuilt from ``base_spec``).
    :param learned: P_θ, identity at initialisation (an :class:`~d2gp.preconditioners.NPO` or a
        learned linear preconditioner).
    :param gain: c > 0, the base's tuned step divided by the solver's step.
    :param base_spec: how to rebuild the base (``{"method", "candidate", "step_size", "gain"}``).

    >>> from d2gp.preconditioners import NPO
    >>> P = Refined(None, NPO(), gain=2.0, base_spec={"method": "baseline", "candidate": "identity"})
    >>> g = torch.randn(1, 1, 8, 8)
    >>> torch.allclose(P(g, 0), 2 * g)
    True
    """

    def __init__(self, base: Optional[nn.Module], learned: nn.Module, gain: float, base_spec: dict[str, Any]):
        super().__init__()
        gain = float(gain)
        if not gain > 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        self.__dict__["base"] = base  # not a submodule: fixed, rebuilt from base_spec
        self.learned = learned
        self.gain = gain
        self.base_spec = {**base_spec, "gain": gain}
        self.uses_iterate = bool(getattr(learned, "uses_iterate", False))

    @property
    def kind(self) -> str:
        return getattr(self.learned, "kind", "npo")

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.learned.config)

    def forward(self, grad: torch.Tensor, k: Union[int, torch.Tensor] = 0,
                iterate: Optional[torch.Tensor] = None) -> torch.Tensor:
        g = self.base(grad) if self.base is not None else grad
        return self.learned(self.gain * g, k, **({"iterate": iterate} if self.uses_iterate else {}))

    def extra_repr(self) -> str:
        return f"base={self.base_spec}"

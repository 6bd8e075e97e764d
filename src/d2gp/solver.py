r"""Preconditioned plug-and-play FISTA (Algorithm 1 of D2GP), differentiable end to end.

.. code-block:: text

    x_0 = z_0 = γ Aᵀy;  t_0 = 1
    for k = 0 … K−1:
        g_k     = Aᵀ(A z_k − y)                    # ∇f(z_k), f(z) = ½‖Az − y‖²
        x_{k+1} = D(z_k − γ P(g_k, k))
        t_{k+1} = (1 + √(1 + 4 t_k²)) / 2
        z_{k+1} = x_{k+1} + ((t_k − 1)/t_{k+1}) (x_{k+1} − x_k)
    return x_K

The solver knows nothing of tasks: it takes any ``deepinv.physics.LinearPhysics`` (only ``A``
and ``A_adjoint`` are called), any denoiser ``D(x)`` and any preconditioner ``P(g, k)``
(``None`` is the identity, i.e. plain PnP-FISTA). A preconditioner that also wants the
iterate declares ``uses_iterate = True`` and is called as ``P(g, k, iterate=z_k)``.

It runs under the caller's autograd mode: inside ``torch.no_grad()`` / ``torch.inference_mode()``
for inference, with autograd through all K iterations for training. Options:

* ``checkpoint=True``: per-iteration gradient checkpointing (recompute each iteration in the
  backward pass: memory O(1) in K instead of O(K) activations, same gradients);
* ``autocast=True``: the denoiser and the preconditioner run under bfloat16 autocast (on the
  tensors' device); the FISTA arithmetic and the operators stay in float32;
* ``grad_from=j``: truncated backpropagation, autograd only through iterations k ≥ j;
* ``safeguard=ρ``: a per-image fallback to plain PnP-FISTA (:func:`pnp_fista`'s docstring);
* ``restart=True``: adaptive restart of the momentum, per image, when its step grows
  (:func:`pnp_fista`'s docstring) — the preconditioner stays on.

References:
    Beck & Teboulle, "A fast iterative shrinkage-thresholding algorithm", SIAM J. Imaging Sci. 2009.
    O'Donoghue & Candès, "Adaptive restart for accelerated gradient schemes", Found. Comput. Math. 2015.
    Kamilov et al., "Plug-and-play methods for integrating physical and learned models", IEEE SPM 2023.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

__all__ = ["pnp_fista", "Trace", "fidelity", "identity_preconditioner"]

Preconditioner = Callable[..., torch.Tensor]


def identity_preconditioner(grad: torch.Tensor, k: int) -> torch.Tensor:
    """P = I: plain PnP-FISTA."""
    return grad


def fidelity(physics, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image data fidelity f(x) = ½‖A x − y‖², shape ``(B,)``."""
    return 0.5 * (physics.A(x) - y).flatten(1).pow(2).sum(1)


@dataclass
class Trace:
    """What happened at each iteration k = 0 … K−1 (each a list of K tensors).

    ``x[k]`` is x_{k+1} (the output of iteration k), ``z[k]`` the point z_k where the gradient
    ``grad[k]`` = ∇f(z_k) was taken, ``preconditioned[k]`` = P(∇f(z_k), k) and ``fidelity[k]``
    = f(z_k) per image. Tensors keep their autograd graph when the solver ran with autograd.
    """

    x: list[torch.Tensor] = field(default_factory=list)
    z: list[torch.Tensor] = field(default_factory=list)
    grad: list[torch.Tensor] = field(default_factory=list)
    preconditioned: list[torch.Tensor] = field(default_factory=list)
    fidelity: list[torch.Tensor] = field(default_factory=list)
    #: with a safeguard: per iteration, which images still use the preconditioner (bool, (B,)).
    active: list[torch.Tensor] = field(default_factory=list)


def _autocast(enabled: bool, device_type: str):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def pnp_fista(
    physics,
    y: torch.Tensor,
    denoiser: Callable[[torch.Tensor], torch.Tensor],
    step_size: float,
    iterations: int = 20,
    preconditioner: Optional[Preconditioner] = None,
    x0: Optional[torch.Tensor] = None,
    *,
    trace: bool = False,
    checkpoint: bool = False,
    autocast: bool = False,
    grad_from: int = 0,
    safeguard: Optional[float] = None,
    safeguard_from: int = 3,
    restart: bool = False,
):
    r"""Run K iterations of preconditioned PnP-FISTA from :math:`x_0 = γ A^\top y`.

    **Safeguard** (``safeguard=ρ``, for learned preconditioners at inference). Per image, the
    step residual :math:`r_k = \|x_{k+1} − x_k\|` of a preconditioned step is compared with the
    smallest residual so far, :math:`r^\ast`. From iteration ``safeguard_from`` on, a step with
    :math:`r_k > ρ\,r^\ast` is rejected (:math:`x_{k+1} = x_k`), the momentum of that image is
    restarted (:math:`t = 1`, :math:`z = x`) and every later iteration of that image is plain
    PnP-FISTA (P = I, same γ). Guarantee: an image's iterates are those of the preconditioned
    method while its step residuals stay within ρ of their best, and those of plain PnP-FISTA
    started from its last accepted iterate afterwards — so past the first rejected step the run
    is exactly as stable as the baseline with step γ. The check costs two norms per iteration.

    **Adaptive restart** (``restart=True``, any preconditioner, the identity included). Per image,
    when a step is longer than the one before, :math:`\|x_{k+1} − x_k\| > \|x_k − x_{k−1}\|`,
    the momentum is dropped for that step (:math:`z_{k+1} = x_{k+1}`) and restarted
    (:math:`t_{k+1} = 1`): O'Donoghue & Candès's speed restart. Steps that shrink, as they do near
    convergence, keep FISTA's momentum untouched, so a run that converges is barely changed;
    a run whose momentum pumps up an oscillation — a step size above 1/L, as the tuned baseline
    takes, or a learned preconditioner applied past the K it was trained for — is damped every
    time it starts. The preconditioner stays on. Costs one norm per image and iteration.

    :param physics: the linear operator (``A``, ``A_adjoint``), e.g. a ``deepinv.physics.LinearPhysics``.
    :param y: measurements.
    :param denoiser: the PnP prior ``D(x)``.
    :param step_size: γ (e.g. ``1/‖AᵀA‖``).
    :param iterations: K ≥ 0.
    :param preconditioner: ``P(g, k)``; ``None`` is the identity.
    :param x0: initial estimate; default ``γ Aᵀy``.
    :param trace: also return a :class:`Trace`.
    :param checkpoint: gradient checkpointing per iteration (only matters under autograd).
    :param autocast: run the denoiser and the preconditioner under bfloat16 autocast.
    :param grad_from: truncated backpropagation: iterations ``k < grad_from`` run without
        autograd, so gradients flow only through the last ``K − grad_from`` iterations.
    :param safeguard: ρ ≥ 1 of the safeguard above (``None``: off).
    :param safeguard_from: the first iteration at which a step may be rejected (the first
        steps of FISTA do not shrink monotonically).
    :param restart: the adaptive restart above.
    :return: ``x_K``, or ``(x_K, trace)`` with ``trace=True``.

    :Example:

    >>> import torch
    >>> from d2gp.tasks import make_task
    >>> task = make_task("spc")
    >>> x = torch.rand(2, 1, 32, 32)
    >>> y = task.student.A(x)
    >>> out = pnp_fista(task.student, y, denoiser=lambda v: v.clamp(0, 1), step_size=1.0, iterations=5)
    >>> out.shape
    torch.Size([2, 1, 32, 32])
    """
    if iterations < 0:
        raise ValueError(f"iterations must be ≥ 0, got {iterations}")
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size}")
    if safeguard is not None and not (safeguard >= 1 and math.isfinite(safeguard)):
        raise ValueError(f"safeguard ρ must be a finite number ≥ 1, got {safeguard}")
    P = preconditioner or identity_preconditioner
    uses_iterate = bool(getattr(P, "uses_iterate", False))
    device_type = y.device.type
    gamma = float(step_size)
    guarded = safeguard is not None and preconditioner is not None
    per_image = guarded or restart

    def step(z: torch.Tensor, k: int, active: Optional[torch.Tensor] = None):
        residual = physics.A(z) - y
        grad = physics.A_adjoint(residual)
        with _autocast(autocast, device_type):
            pgrad = P(grad, k, iterate=z) if uses_iterate else P(grad, k)
            if active is not None:  # images that fell back take the plain gradient
                pgrad = torch.where(_per_image(active, grad), pgrad.to(grad.dtype), grad)
            x_new = denoiser(z - gamma * pgrad.float())
        f = 0.5 * residual.flatten(1).pow(2).sum(1)
        return x_new.float(), grad, pgrad.float(), f

    x = gamma * physics.A_adjoint(y) if x0 is None else x0
    z, t = x, 1.0
    record = Trace() if trace else None
    grad_enabled = torch.is_grad_enabled()
    if guarded:
        active = torch.ones(len(y), dtype=torch.bool, device=y.device)
        best = torch.full((len(y),), math.inf, device=y.device)
    if per_image:
        t = torch.ones(len(y), device=y.device)
        last = torch.full((len(y),), math.inf, device=y.device)  # the previous step's length
    for k in range(iterations):
        with torch.set_grad_enabled(grad_enabled and k >= grad_from):
            if guarded:
                x_new, grad, pgrad, f = step(z, k, active)
            elif checkpoint and torch.is_grad_enabled():
                x_new, grad, pgrad, f = torch_checkpoint(step, z, k, use_reentrant=False)
            else:
                x_new, grad, pgrad, f = step(z, k)
        if per_image:
            r = (x_new - x).detach().flatten(1).norm(dim=1)
            reset = torch.zeros_like(r, dtype=torch.bool)
            if guarded:
                rejected = active & (r > safeguard * best) if k >= safeguard_from else torch.zeros_like(active)
                best = torch.where(active & ~rejected, torch.minimum(best, r), best)
                active = active & ~rejected
                x_new = torch.where(_per_image(rejected, x), x, x_new)  # a rejected step is not taken…
                reset = rejected  # …and FISTA restarts from x_k
                r = torch.where(rejected, torch.zeros_like(r), r)
            if restart:
                reset = reset | (r > last)
            last = r
            t_new = (1.0 + torch.sqrt(1.0 + 4.0 * t * t)) / 2.0
            momentum = _per_image(torch.where(reset, torch.zeros_like(t), (t - 1.0) / t_new), x)
            t_new = torch.where(reset, torch.ones_like(t), t_new)
            z_new = x_new + momentum * (x_new - x)
        else:
            t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            z_new = x_new + ((t - 1.0) / t_new) * (x_new - x)
        if record is not None:
            record.x.append(x_new)
            record.z.append(z)
            record.grad.append(grad)
            record.preconditioned.append(pgrad)
            record.fidelity.append(f)
            if guarded:
                record.active.append(active.clone())
        x, z, t = x_new, z_new, t_new
    return (x, record) if trace else x


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image vector (B,) shaped to broadcast over ``like`` (B, …)."""
    return values.view(-1, *([1] * (like.dim() - 1)))

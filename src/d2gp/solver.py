r"""Plug-and-play solvers with a preconditioned data step, differentiable end to end.

Three host algorithms (:data:`ALGORITHMS`, run any of them with :func:`solve`) take the same
preconditioner ``P(g, k)`` of the data-fidelity gradient :math:`∇f(z) = A^\top(Az − y)`,
:math:`f(z) = ½\|Az − y\|^2`:

* ``fista`` — preconditioned PnP-FISTA (Algorithm 1 of D2GP), :func:`pnp_fista`:

  .. code-block:: text

      x_0 = z_0 = γ Aᵀy;  t_0 = 1
      for k = 0 … K−1:
          g_k     = Aᵀ(A z_k − y)                    # ∇f(z_k), f(z) = ½‖Az − y‖²
          x_{k+1} = D(z_k − γ P(g_k, k))
          t_{k+1} = (1 + √(1 + 4 t_k²)) / 2
          z_{k+1} = x_{k+1} + ((t_k − 1)/t_{k+1}) (x_{k+1} − x_k)
      return x_K

* ``pgd`` — preconditioned PnP-PGD (PnP-ISTA), :func:`pnp_pgd`: the same step without momentum,
  :math:`x_{k+1} = D(x_k − γ P(∇f(x_k), k))`;
* ``hqs`` — PnP half-quadratic splitting whose data step, the proximal step
  :math:`\operatorname{prox}_{2γf}(x_k)`, is solved inexactly by a few preconditioned gradient
  steps of step γ on its sub-problem, :func:`pnp_hqs`.

The solvers know nothing of tasks: they take any ``deepinv.physics.LinearPhysics`` (only ``A``
and ``A_adjoint`` are called), any denoiser ``D(x)`` and any preconditioner ``P(g, k)``
(``None`` is the identity, i.e. the plain algorithm). A preconditioner that also wants the
iterate declares ``uses_iterate = True`` and is called as ``P(g, k, iterate=z)``.

They run under the caller's autograd mode: inside ``torch.no_grad()`` / ``torch.inference_mode()``
for inference, with autograd through all K iterations for training. Options (all three hosts
unless said otherwise):

* ``checkpoint=True``: per-iteration gradient checkpointing (recompute each iteration in the
  backward pass: memory O(1) in K instead of O(K) activations, same gradients);
* ``autocast=True``: the denoiser and the preconditioner run under bfloat16 autocast (on the
  tensors' device); the solver's arithmetic and the operators stay in float32;
* ``grad_from=j``: truncated backpropagation, autograd only through iterations k ≥ j;
* ``safeguard=ρ``: a per-image fallback to the plain algorithm (:func:`pnp_fista`'s docstring);
* ``restart=True`` (``fista`` only: the others have no momentum to restart): adaptive restart of
  the momentum, per image, when its step grows (:func:`pnp_fista`'s docstring) — the
  preconditioner stays on.

Why not ``deepinv.optim``: its iterators call ``data_fidelity.grad(x, y, physics)`` without the
iteration index that ``P(g, k)`` needs, keep no per-iteration points and gradients (its metrics are
detached numbers), have no per-image safeguard, restart, checkpointing or truncated backpropagation,
its HQS data step is an exact proximal step and its FISTA uses another momentum sequence
(:math:`α_k = (k + a − 1)/(k + a)`) — hosting ours there would reuse its loop and nothing else.

References:
    Beck & Teboulle, "A fast iterative shrinkage-thresholding algorithm", SIAM J. Imaging Sci. 2009.
    O'Donoghue & Candès, "Adaptive restart for accelerated gradient schemes", Found. Comput. Math. 2015.
    Geman & Yang, "Nonlinear image recovery with half-quadratic regularization", IEEE TIP 1995.
    Zhang, Zuo, Gu & Zhang, "Learning deep CNN denoiser prior for image restoration", CVPR 2017.
    Kamilov et al., "Plug-and-play methods for integrating physical and learned models", IEEE SPM 2023.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

__all__ = ["ALGORITHMS", "ALGORITHM_NAMES", "HQS_INNER_STEPS", "solve", "check_algorithm", "pnp_fista", "pnp_pgd", "pnp_hqs", "Trace",
           "fidelity", "identity_preconditioner"]

#: The host algorithms of :func:`solve`.
ALGORITHMS = ("fista", "pgd", "hqs")
#: Their names in tables and figures.
ALGORITHM_NAMES = {"fista": "PnP-FISTA", "pgd": "PnP-PGD", "hqs": "PnP-HQS"}
#: Preconditioned gradient steps per data step of ``hqs`` (1 would be ``pgd``).
HQS_INNER_STEPS = 3

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
    For ``pgd`` and ``hqs`` z_k = x_k (no momentum); ``hqs`` records the first of its inner
    steps, taken at x_k, where the sub-problem's gradient is ∇f(x_k).
    """

    x: list[torch.Tensor] = field(default_factory=list)
    z: list[torch.Tensor] = field(default_factory=list)
    grad: list[torch.Tensor] = field(default_factory=list)
    preconditioned: list[torch.Tensor] = field(default_factory=list)
    fidelity: list[torch.Tensor] = field(default_factory=list)
    #: with a safeguard: per iteration, which images still use the preconditioner (bool, (B,)).
    active: list[torch.Tensor] = field(default_factory=list)


def _check_arguments(iterations: int, step_size: float, safeguard: Optional[float]) -> None:
    if iterations < 0:
        raise ValueError(f"iterations must be ≥ 0, got {iterations}")
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size}")
    if safeguard is not None and not (safeguard >= 1 and math.isfinite(safeguard)):
        raise ValueError(f"safeguard ρ must be a finite number ≥ 1, got {safeguard}")


def _autocast(enabled: bool, device_type: str):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def _data_step(physics, y: torch.Tensor, denoiser, preconditioner, gamma: float, inner_steps: int, autocast: bool):
    """One iteration of every host from its point z, as a function ``step(z, k, active=None)``.

    J = ``inner_steps`` preconditioned gradient steps u_{j+1} = u_j − γ P(∇h(u_j), k) from u_0 = z on
    h(u) = f(u) + ‖u − z‖²/(4γ) (J = 1: the plain step z − γ P(∇f(z), k) of FISTA and PGD), then the
    denoiser: returns ``(D(u_J), ∇f(z), P(∇f(z), k), f(z))``, the last three from the first inner step.
    Images whose ``active`` entry is False (the safeguard's fallback) take the plain gradient.
    """
    P = preconditioner or identity_preconditioner
    uses_iterate = bool(getattr(P, "uses_iterate", False))
    device_type = y.device.type

    def step(z: torch.Tensor, k: int, active: Optional[torch.Tensor] = None):
        u = z
        for j in range(inner_steps):
            residual = physics.A(u) - y
            grad = physics.A_adjoint(residual)
            if j > 0:  # ∇h(u); at u_0 = z the proximal term is zero
                grad = grad + (u - z) / (2 * gamma)
            with _autocast(autocast, device_type):
                pgrad = P(grad, k, iterate=u) if uses_iterate else P(grad, k)
                if active is not None:  # images that fell back take the plain gradient
                    pgrad = torch.where(_per_image(active, grad), pgrad.to(grad.dtype), grad)
            if j == 0:
                first = grad, pgrad.float(), 0.5 * residual.flatten(1).pow(2).sum(1)
            u = u - gamma * pgrad.float()
        with _autocast(autocast, device_type):
            x_new = denoiser(u)
        return (x_new.float(), *first)

    return step


def _safeguard(x: torch.Tensor, x_new: torch.Tensor, r: torch.Tensor, active: torch.Tensor, best: torch.Tensor,
               k: int, rho: float, start: int):
    """The safeguard's per-image decision after iteration k (step residuals ``r`` = ‖x_new − x‖): from
    iteration ``start`` on, an active image whose residual exceeds ρ × its best so far is rejected
    (it keeps x and falls back to the plain algorithm). Returns ``(x_new, active, best, rejected)``."""
    rejected = active & (r > rho * best) if k >= start else torch.zeros_like(active)
    best = torch.where(active & ~rejected, torch.minimum(best, r), best)
    return torch.where(_per_image(rejected, x), x, x_new), active & ~rejected, best, rejected


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
    _check_arguments(iterations, step_size, safeguard)
    gamma = float(step_size)
    guarded = safeguard is not None and preconditioner is not None
    per_image = guarded or restart
    step = _data_step(physics, y, denoiser, preconditioner, gamma, 1, autocast)

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
                x_new, active, best, rejected = _safeguard(x, x_new, r, active, best, k, safeguard, safeguard_from)
                reset = rejected  # a rejected step is not taken, and FISTA restarts from x_k
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


def pnp_pgd(
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
):
    r"""Run K iterations of preconditioned PnP-PGD (PnP-ISTA) from :math:`x_0 = γ A^\top y`:

    .. math::

        x_{k+1} = D\big(x_k − γ\, P(∇f(x_k), k)\big), \qquad ∇f(x) = A^\top(Ax − y).

    The step of :func:`pnp_fista` without its momentum (:math:`z_k = x_k`). The safeguard is
    :func:`pnp_fista`'s without the restart of the momentum: a rejected step leaves
    :math:`x_{k+1} = x_k` and the image continues as plain PnP-PGD (P = I, same γ).
    Parameters and return value: those of :func:`pnp_fista` (there is no ``restart``).

    Reference: Kamilov et al., "Plug-and-play methods for integrating physical and learned
    models", IEEE SPM 2023 (PnP-ISTA); Hong et al., "Provable preconditioned plug-and-play
    approach for compressed sensing MRI reconstruction", IEEE TCI 2024 (preconditioned PnP-ISTA).

    :Example:

    >>> import torch
    >>> from d2gp.tasks import make_task
    >>> task = make_task("spc")
    >>> y = task.student.A(torch.rand(2, 1, 32, 32))
    >>> pnp_pgd(task.student, y, denoiser=lambda v: v.clamp(0, 1), step_size=1.0, iterations=5).shape
    torch.Size([2, 1, 32, 32])
    """
    return _pnp_splitting(physics, y, denoiser, step_size, iterations, preconditioner, x0, inner_steps=1,
                          trace=trace, checkpoint=checkpoint, autocast=autocast, grad_from=grad_from,
                          safeguard=safeguard, safeguard_from=safeguard_from)


def pnp_hqs(
    physics,
    y: torch.Tensor,
    denoiser: Callable[[torch.Tensor], torch.Tensor],
    step_size: float,
    iterations: int = 20,
    preconditioner: Optional[Preconditioner] = None,
    x0: Optional[torch.Tensor] = None,
    *,
    inner_steps: int = HQS_INNER_STEPS,
    trace: bool = False,
    checkpoint: bool = False,
    autocast: bool = False,
    grad_from: int = 0,
    safeguard: Optional[float] = None,
    safeguard_from: int = 3,
):
    r"""Run K iterations of PnP half-quadratic splitting with a preconditioned data step, from
    :math:`x_0 = γ A^\top y`.

    PnP-HQS alternates the proximal step of the data fidelity and the denoiser,

    .. math::

        z_{k+1} = \operatorname{prox}_{2γf}(x_k) = \operatorname*{argmin}_z\; h_k(z), \quad
        h_k(z) = ½\|Az − y\|^2 + \frac{1}{4γ}\|z − x_k\|^2, \qquad x_{k+1} = D(z_{k+1}).

    Here the sub-problem is solved inexactly by J = ``inner_steps`` preconditioned gradient steps
    of step γ from :math:`u_0 = x_k`, the preconditioner applied to the sub-problem's gradient:

    .. math::

        u_{j+1} = u_j − γ\, P\big(∇h_k(u_j), k\big), \quad
        ∇h_k(u) = A^\top(Au − y) + \frac{u − x_k}{2γ}, \qquad z_{k+1} = u_J.

    A fixed point of the inner iteration solves the sub-problem whatever P (an injective P
    changes the speed of the inner solve, not its solution): the exact step is
    :math:`z_{k+1} = (A^\top A + I/(2γ))^{-1}(A^\top y + x_k/(2γ))`. The step γ is the one the
    preconditioner is trained for (so that the first inner step is the PnP-PGD step), and the
    sub-problem's weight :math:`1/(4γ)` makes the plain inner iteration a contraction at the
    usual steps: with P = I it is :math:`u_{j+1} = (u_j + x_k)/2 − γ∇f(u_j)`, whose error is
    multiplied by :math:`I/2 − γA^\top A` — a factor at most ½ at γ = 1/L (L = ‖AᵀA‖),
    convergence for every γ < 3/(2L) — whereas with a weight 1/(2γ) it would be
    :math:`−γA^\top A`, on the edge of divergence at γ = 1/L. With
    :math:`P = (A^\top A + I/(2γ))^{-1}/γ` (Newton with δ = 1/(2γ)) one inner step is exact.
    Since :math:`∇h_k(x_k) = ∇f(x_k)`, J = 1 is :func:`pnp_pgd` (linearised HQS, PnP-ISTA);
    every iteration costs J gradients and J applications of P.

    The :class:`Trace` records the first inner step (at :math:`u_0 = x_k`: z_k = x_k,
    grad = ∇f(x_k), preconditioned = P(∇f(x_k), k)); the safeguard is :func:`pnp_pgd`'s (a
    rejected image takes every inner step with P = I from then on).
    Parameters and return value: those of :func:`pnp_fista` (there is no ``restart``), and

    :param inner_steps: J ≥ 1, preconditioned gradient steps per data step.

    References: Geman & Yang, IEEE TIP 1995; Zhang, Zuo, Gu & Zhang, "Learning deep CNN denoiser
    prior for image restoration", CVPR 2017 (PnP-HQS).

    :Example:

    >>> import torch
    >>> from d2gp.tasks import make_task
    >>> task = make_task("spc")
    >>> y = task.student.A(torch.rand(2, 1, 32, 32))
    >>> pnp_hqs(task.student, y, denoiser=lambda v: v.clamp(0, 1), step_size=0.5, iterations=5).shape
    torch.Size([2, 1, 32, 32])
    """
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be an integer ≥ 1, got {inner_steps!r}")
    return _pnp_splitting(physics, y, denoiser, step_size, iterations, preconditioner, x0, inner_steps=inner_steps,
                          trace=trace, checkpoint=checkpoint, autocast=autocast, grad_from=grad_from,
                          safeguard=safeguard, safeguard_from=safeguard_from)


def _pnp_splitting(physics, y, denoiser, step_size, iterations, preconditioner, x0, *, inner_steps, trace, checkpoint,
                   autocast, grad_from, safeguard, safeguard_from):
    """:func:`pnp_hqs` with J = ``inner_steps`` (J = 1: :func:`pnp_pgd`)."""
    _check_arguments(iterations, step_size, safeguard)
    gamma = float(step_size)
    guarded = safeguard is not None and preconditioner is not None
    step = _data_step(physics, y, denoiser, preconditioner, gamma, inner_steps, autocast)

    x = gamma * physics.A_adjoint(y) if x0 is None else x0
    record = Trace() if trace else None
    grad_enabled = torch.is_grad_enabled()
    active = best = None
    if guarded:
        active = torch.ones(len(y), dtype=torch.bool, device=y.device)
        best = torch.full((len(y),), math.inf, device=y.device)
    for k in range(iterations):
        with torch.set_grad_enabled(grad_enabled and k >= grad_from):
            if checkpoint and torch.is_grad_enabled():
                x_new, grad, pgrad, f = torch_checkpoint(step, x, k, active, use_reentrant=False)
            else:
                x_new, grad, pgrad, f = step(x, k, active)
        if guarded:
            r = (x_new - x).detach().flatten(1).norm(dim=1)
            x_new, active, best, _ = _safeguard(x, x_new, r, active, best, k, safeguard, safeguard_from)
        if record is not None:
            record.x.append(x_new)
            record.z.append(x)
            record.grad.append(grad)
            record.preconditioned.append(pgrad)
            record.fidelity.append(f)
            if guarded:
                record.active.append(active.clone())
        x = x_new
    return (x, record) if trace else x


def check_algorithm(algorithm: str, restart: bool = False) -> str:
    """``algorithm`` if it is one of :data:`ALGORITHMS` (and has momentum, with ``restart``).

    :raises ValueError: naming the choices, or why ``restart`` does not apply.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if restart and algorithm != "fista":
        raise ValueError(f"restart is the adaptive restart of FISTA's momentum; {algorithm} has no momentum to restart")
    return algorithm


def solve(
    algorithm: str,
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
    """Run the host ``algorithm`` (one of :data:`ALGORITHMS`): :func:`pnp_fista`, :func:`pnp_pgd` or
    :func:`pnp_hqs` (with :data:`HQS_INNER_STEPS` inner steps), with the same arguments.

    :raises ValueError: an unknown algorithm, or ``restart`` with an algorithm that has no momentum.
    """
    check_algorithm(algorithm, restart)
    options = dict(trace=trace, checkpoint=checkpoint, autocast=autocast, grad_from=grad_from, safeguard=safeguard,
                   safeguard_from=safeguard_from)
    if algorithm == "fista":
        return pnp_fista(physics, y, denoiser, step_size, iterations, preconditioner, x0, restart=restart, **options)
    host = pnp_pgd if algorithm == "pgd" else pnp_hqs
    return host(physics, y, denoiser, step_size, iterations, preconditioner, x0, **options)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image vector (B,) shaped to broadcast over ``like`` (B, …)."""
    return values.view(-1, *([1] * (like.dim() - 1)))

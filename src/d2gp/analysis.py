r"""Understanding a preconditioner: exact Jacobians, conditioning, nonlinearity and convergence.

Preconditioned PnP-FISTA (:mod:`d2gp.solver`) steps as :math:`x_{k+1} = D(z_k − γ P(g_k, k))` with
:math:`g_k = A^\top(A z_k − y)`. Around a gradient g that the solver really meets, a preconditioner
(NPO, learned linear or classical) acts as its **Jacobian**

.. math::

    J_k = \frac{\partial P(g, k)}{\partial g} ∈ \mathbb{R}^{n×n}, \qquad
    P(g + εh, k) = P(g, k) + ε J_k h + o(ε),

computed here **exactly** by automatic differentiation (``torch.func.jvp``/``vjp`` under ``vmap``,
in chunks, so that 64×64 RGB images, n = 12 288, fit in memory), with central finite differences
as a cross-check (the paper's Fig. 4 used finite differences only). For a linear preconditioner J
is its matrix. An NPO only sees g/‖g‖ (it is positively homogeneous), so :math:`J_k(cg) = J_k(g)`
for c > 0 and :math:`J_k g = P(g, k)` (Euler's identity).

**Properties of J** (:func:`jacobian_properties`): its singular values and condition number
:math:`κ(J) = σ_{\max}/σ_{\min}`; the distance to the identity :math:`\|J − I\|_F/\sqrt n`;
the best scaled identity :math:`c^\star I`, :math:`c^\star = \operatorname{tr}J/n`, and its
relative residual :math:`\|J − c^\star I\|_F/\|J\|_F`; the asymmetry
:math:`\|J − J^\top\|_F/(2\|J\|_F)` (0 for a symmetric J) and the smallest eigenvalue of the
symmetric part :math:`(J + J^\top)/2` (> 0: :math:`g^\top J g > 0` for every g, J is a metric);
diagonal dominance (the share of rows with :math:`|J_{ii}| ≥ \sum_{j≠i}|J_{ij}|`, the mean
:math:`|J_{ii}|/\sum_j|J_{ij}|` and the diagonal's share of :math:`\|J\|_F^2`); and the mean
*stencil*, the row of J around its own pixel (the linearised preconditioner as a local filter).
Exact from the dense J when n is small; otherwise from a uniform sample of exact rows and
columns (reverse and forward mode; unbiased estimates of the Frobenius quantities) and Lanczos
iterations for the extreme singular values and eigenvalues.

**Conditioning of the preconditioned problem** (:func:`preconditioned_spectrum`). Linearised,
the preconditioned gradient step is :math:`e ↦ (I − γ J G)e` with :math:`G = A^\top A`. J·G is
not symmetric; its non-zero eigenvalues are those of the r×r matrix

.. math::

    S = Λ^{1/2}\, V^\top J V\, Λ^{1/2}, \qquad G = V Λ V^\top,\; V ∈ \mathbb{R}^{n×r},\; r = \operatorname{rank}A,

the restriction to :math:`\operatorname{range}(A^\top)` of the symmetrisation
:math:`G^{1/2} J G^{1/2}` (similar to J·G on that range). We report the **singular values of
S** and :math:`κ = σ_{\max}(S)/σ_{\min}(S)` — for J = I the non-zero eigenvalues of G, the
student's own condition number on its range, and for a symmetric positive definite linear P
exactly the condition number of :math:`P^{1/2} G P^{1/2}` on that range — and the complex
eigenvalues of S (those of J·G: their largest :math:`|λ|` over their smallest, the smallest real
part, the largest imaginary part). The same S with the teacher's operator and J = I gives the
teacher's spectrum. V and Λ come from the exact eigendecomposition of the m×m matrix
:math:`A A^\top` (:func:`range_basis`). S is dense (r Jacobian–vector products) or, when r is
large and G well conditioned, estimated by Lanczos on :math:`S^\top S` (Ritz values lie inside
the spectrum, so the estimate of κ is a lower bound; checked on J = I, where κ is known).

**Nonlinearity** (:func:`linearization_error`, :func:`homogeneity_error`):
:math:`\|P(g + εh) − P(g) − εJh\| / (ε\|h\|)` over ε (with :math:`\|h\| = \|g\|`: ε is relative),
and :math:`\|P(αg) − αP(g)\|/\|αP(g)\|` for α > 0 (0 for an NPO) and α = −1 (oddness, not built in).

**Alignment with the teacher** along the trajectory (what the gradient loss trains):
:math:`\cos(P(g_k), ∇f_t(z_k))` against :math:`\cos(g_k, ∇f_t(z_k))`, and the share of
:math:`\|P(g_k)\|^2` outside :math:`\operatorname{range}(A_s^\top)` (a linear map of range vectors
keeps J·G's rank ≤ r; only the nonlinear P can put energy where the student does not measure).

**Convergence** (:func:`convergence`, the paper's Fig. 3): PSNR to the ground truth, the data
fidelity :math:`f(x_k) = \tfrac12\|Ax_k − y\|^2` and :math:`\|x_{k+1} − x_k\|` per iteration for
every method of a ``d2gp benchmark`` output folder, to 5K. The benchmark stores PSNR per
iteration to 2K only, so the solvers are run again: non-learned methods rebuilt from their tuning
records (:func:`d2gp.tuning.classical_candidates`), learned ones loaded from their run
directories (skipped, and listed, when those are gone) — nothing is retrained.

References:
    Gualdrón-Hurtado et al., "Deep distillation gradient preconditioning for inverse problems",
    2025 (Sec. III-D, Figs. 3 and 4).
    Golub & Van Loan, "Matrix computations", 4th ed., 2013 (Lanczos, Ch. 10).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.func import jvp, vjp, vmap

from d2gp.checkpoints import CheckpointError, write_json
from d2gp.evaluation import psnr
from d2gp.reports import environment, markdown_table, write_results, write_table
from d2gp.solver import fidelity, pnp_fista
from d2gp.tasks import Task, TaskError
from d2gp.tasks.base import measure

__all__ = [
    "jvp_columns", "vjp_rows", "jacobian", "finite_difference", "finite_difference_agreement", "lanczos",
    "jacobian_properties", "RangeBasis", "range_basis", "preconditioned_spectrum", "linearization_error",
    "homogeneity_error", "teacher_alignment", "analyze_preconditioner", "convergence_curves", "benchmark_methods", "convergence",
    "analyze", "KRYLOV_MAX_CONDITION",
]

#: Lanczos on SᵀS is trusted for κ(G) up to this value; above it the spectrum is computed densely.
KRYLOV_MAX_CONDITION = 1e3
#: Eigenvalues of AAᵀ below this fraction of the largest are the null space (float32 operators:
#: exact zeros come out near 1e-14, the blur's smallest genuine eigenvalues near 1e-8).
RANK_TOLERANCE = 1e-10
#: Half-width of the stencil window (the NPO's receptive field is 7 pixels for 7 layers of 3×3).
STENCIL_RADIUS = 7
EPSILONS = (1e-3, 1e-2, 1e-1, 0.3, 1.0)
ALPHAS = (0.1, 2.0, 10.0, -1.0)


# --- Jacobian products ---------------------------------------------------------------------------
@contextlib.contextmanager
def _functional(P):
    """``P`` ready for ``torch.func``: parameters frozen, NCHW memory format (``vmap`` does not
    support channels-last copies; the arithmetic is the same). Restored on exit."""
    module = P if isinstance(P, torch.nn.Module) else None
    flags = [(p, p.requires_grad) for p in module.parameters()] if module is not None else []
    channels_last = getattr(P, "channels_last", None)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        if channels_last:
            P.channels_last = False
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if channels_last:
            P.channels_last = channels_last


def _single(P, k: int, iterate: Optional[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """g ↦ P(g, k) on one image ``(C, H, W)`` (the iterate, if any, held fixed)."""
    kwargs = {"iterate": iterate.reshape(1, *iterate.shape[-3:])} if getattr(P, "uses_iterate", False) else {}

    def f(g: torch.Tensor) -> torch.Tensor:
        return P(g.unsqueeze(0), k, **kwargs).squeeze(0)
    return f


def _products(P, g: torch.Tensor, k: int, vectors: torch.Tensor, *, iterate, chunk: int, reverse: bool) -> torch.Tensor:
    g = g.reshape(g.shape[-3:]).detach().float()
    vectors = vectors.reshape(-1, *g.shape).float()
    out = torch.empty_like(vectors)
    with _functional(P):
        f = _single(P, k, iterate)
        if reverse:
            _, pullback = vjp(f, g)
            one = lambda v: pullback(v)[0]  # noqa: E731
        else:
            one = lambda v: jvp(f, (g,), (v,))[1]  # noqa: E731
        batched = vmap(one)
        for start in range(0, len(vectors), chunk):
            block = vectors[start:start + chunk]
            if batched is not None:
                try:
                    out[start:start + chunk] = batched(block).detach()
                    continue
                except (RuntimeError, NotImplementedError, ValueError):
                    # Data-dependent control flow (e.g. conjugate gradients' early stop) defeats vmap:
                    # the same products one vector at a time from here on.
                    batched = None
            out[start:start + chunk] = torch.stack([one(v).detach() for v in block])
    return out


def jvp_columns(P, g: torch.Tensor, k: int, tangents: torch.Tensor, *, iterate: Optional[torch.Tensor] = None,
                chunk: int = 32) -> torch.Tensor:
    r"""Jacobian–vector products :math:`J_k v` for every ``v`` of ``tangents`` (forward mode, exact).

    :param P: a preconditioner ``P(grad, k)`` (``iterate=`` too when it declares ``uses_iterate``).
    :param g: the gradient at which J is taken, ``(C, H, W)`` or ``(1, C, H, W)``.
    :param k: the iteration index.
    :param tangents: ``(N, C, H, W)`` directions.
    :param iterate: z_k for a preconditioner that uses it (held fixed: J is with respect to g).
    :param chunk: directions per ``vmap`` call (memory ∝ chunk × one forward pass).
    :return: ``(N, C, H, W)``, float32.
    """
    return _products(P, g, k, tangents, iterate=iterate, chunk=chunk, reverse=False)


def vjp_rows(P, g: torch.Tensor, k: int, cotangents: torch.Tensor, *, iterate: Optional[torch.Tensor] = None,
             chunk: int = 32) -> torch.Tensor:
    r"""Vector–Jacobian products :math:`J_k^\top u` (reverse mode, exact): with ``u = e_i`` the i-th row of J.

    Parameters as :func:`jvp_columns`.
    """
    return _products(P, g, k, cotangents, iterate=iterate, chunk=chunk, reverse=True)


def _basis(indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    n = math.prod(shape)
    basis = torch.zeros(len(indices), n)
    basis[torch.arange(len(indices)), indices] = 1.0
    return basis.reshape(len(indices), *shape)


def jacobian(P, g: torch.Tensor, k: int, *, iterate: Optional[torch.Tensor] = None, chunk: int = 32) -> torch.Tensor:
    r"""The dense Jacobian :math:`J_k = ∂P(g, k)/∂g`, n×n on the C-major flattening (column j is
    :math:`J e_j`), float32, by forward mode in chunks of ``chunk`` columns.

    n² floats: 4 MB at 32×32, 604 MB for 64×64 RGB (and n forward-mode passes).

    >>> from d2gp.preconditioners.learned_linear import Pointwise
    >>> P = Pointwise(1, 4, 1)
    >>> torch.equal(jacobian(P, torch.randn(1, 4, 4), 0), torch.eye(16))
    True
    """
    shape = g.shape[-3:]
    n = math.prod(shape)
    J = torch.empty(n, n)
    for start in range(0, n, 256):
        indices = torch.arange(start, min(start + 256, n))
        J[:, indices] = jvp_columns(P, g, k, _basis(indices, shape), iterate=iterate, chunk=chunk).reshape(len(indices), n).T
    return J


@torch.no_grad()
def finite_difference(P, g: torch.Tensor, k: int, directions: torch.Tensor, *, iterate: Optional[torch.Tensor] = None,
                      eps: float = 1e-3) -> torch.Tensor:
    r"""Central differences :math:`(P(g + t d) − P(g − t d))/(2t)`, :math:`t = ε\|g\|/\|d\|`, for each direction d.

    :param eps: the step relative to ‖g‖ (float32 networks: round-off grows as 1/ε, truncation as ε²).
    :return: ``(N, C, H, W)`` estimates of :math:`J_k d`.
    """
    g = g.reshape(1, *g.shape[-3:]).float()
    directions = directions.reshape(-1, *g.shape[1:]).float()
    norms = directions.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny).view(-1, 1, 1, 1)
    t = eps * g.norm() / norms
    kwargs = {}
    if getattr(P, "uses_iterate", False):
        kwargs["iterate"] = iterate.reshape(1, *g.shape[1:]).expand(len(directions), -1, -1, -1)
    plus = P(g + t * directions, k, **kwargs)
    minus = P(g - t * directions, k, **kwargs)
    return (plus - minus) / (2 * t)


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ‖a − b‖/‖b‖ (rows: the first dimension)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)


def finite_difference_agreement(P, g: torch.Tensor, k: int, *, iterate: Optional[torch.Tensor] = None,
                                probes: int = 4, eps: float = 1e-3, seed: int = 0) -> dict:
    """Relative difference between the exact :math:`J_k d` and its central difference on ``probes``
    random directions: ``{"median", "max", "eps", "probes"}``."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(probes, *g.shape[-3:], generator=generator)
    exact = jvp_columns(P, g, k, directions, iterate=iterate)
    errors = _relative(finite_difference(P, g, k, directions, iterate=iterate, eps=eps), exact)
    return {"median": float(errors.median()), "max": float(errors.max()), "eps": eps, "probes": probes}


# --- Lanczos -------------------------------------------------------------------------------------
def lanczos(operator: Callable[[torch.Tensor], torch.Tensor], n: int, steps: int, *, seed: int = 0) -> torch.Tensor:
    r"""Ritz values (ascending) of a symmetric linear ``operator`` on :math:`\mathbb{R}^n` after ``steps``
    Lanczos iterations with full reorthogonalisation, in float64.

    The extreme Ritz values converge first to the extreme eigenvalues, and always lie inside
    :math:`[λ_{\min}, λ_{\max}]`. With ``steps ≥ n`` (or on breakdown) they are the eigenvalues.

    :param operator: v ↦ M v for a float64 vector v of length n.
    """
    steps = max(1, min(int(steps), n))
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=generator, dtype=torch.float64)
    Q = [q / q.norm()]
    alphas, betas = [], []
    for j in range(steps):
        w = operator(Q[j]).double()
        alpha = float(Q[j] @ w)
        alphas.append(alpha)
        basis = torch.stack(Q)
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)  # twice is enough (Kahan–Parlett)
        beta = float(w.norm())
        scale = max(abs(a) for a in alphas) + max(betas, default=0.0)
        if j == steps - 1 or beta <= 1e-12 * max(scale, 1e-300):
            break
        betas.append(beta)
        Q.append(w / beta)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T)


# --- properties of J ----------------------------------------------------------------------------
def _stencil(rows: torch.Tensor, indices: torch.Tensor, shape: Sequence[int], radius: int) -> torch.Tensor:
    """The mean over ``rows`` of each row's window of side 2·radius+1 around its own pixel (same channel)."""
    C, H, W = shape
    images = rows.reshape(len(rows), C, H, W).double()
    padded = torch.nn.functional.pad(images, (radius, radius, radius, radius))
    windows = []
    for row, index in enumerate(indices.tolist()):
        c, rest = divmod(index, H * W)
        h, w = divmod(rest, W)
        windows.append(padded[row, c, h:h + 2 * radius + 1, w:w + 2 * radius + 1])
    return torch.stack(windows).mean(0)


def _summarise_rows(rows: torch.Tensor, columns: torch.Tensor, indices: torch.Tensor, n: int) -> dict:
    """Frobenius-type properties from exact rows ``J[i, :]`` and columns ``J[:, i]`` at ``indices``
    (all of them: exact; a uniform sample: unbiased estimates of the squared norms)."""
    rows, columns = rows.reshape(len(indices), n).double(), columns.reshape(len(indices), n).double()
    scale = n / len(indices)
    arange = torch.arange(len(indices))
    diagonal = rows[arange, indices]
    identity_rows = rows.clone()
    identity_rows[arange, indices] -= 1.0
    frobenius2 = scale * float(rows.pow(2).sum())
    trace = scale * float(diagonal.sum())
    best = trace / n
    absolute = rows.abs().sum(1)
    off = absolute - diagonal.abs()
    return {
        "frobenius": math.sqrt(frobenius2),
        "distance_to_identity": math.sqrt(scale * float(identity_rows.pow(2).sum()) / n),
        "best_scale": best,
        "distance_to_scaled_identity": math.sqrt(max(frobenius2 - n * best * best, 0.0) / max(frobenius2, 1e-300)),
        "asymmetry": math.sqrt(scale * float((rows - columns).pow(2).sum()) / max(frobenius2, 1e-300)) / 2,
        "diagonal_energy": scale * float(diagonal.pow(2).sum()) / max(frobenius2, 1e-300),
        "dominant_rows": float((diagonal.abs() >= off).double().mean()),
        "diagonal_ratio": float((diagonal.abs() / absolute.clamp_min(1e-300)).mean()),
        "mean_diagonal": float(diagonal.mean()),
    }


def jacobian_properties(P, g: torch.Tensor, k: int, *, iterate: Optional[torch.Tensor] = None, dense: bool = True,
                        sample: int = 64, lanczos_steps: int = 30, radius: int = STENCIL_RADIUS, seed: int = 0,
                        chunk: int = 32) -> dict:
    r"""Singular values, condition number, distance to (scaled) identity, symmetry and diagonal
    dominance of :math:`J_k` at g (see the module documentation for the definitions).

    :param dense: compute the whole J (n forward passes; everything exact). Otherwise ``sample``
        exact rows and columns at uniformly drawn pixels (2·sample passes: unbiased estimates of
        the Frobenius quantities, dominance over those rows) and ``lanczos_steps`` Lanczos
        iterations on :math:`J^\top J` and on :math:`(J + J^\top)/2` (2 passes each; Ritz values
        lie inside the spectrum, so σ_max, λ_max are under- and σ_min, λ_min overestimated).
    :return: a dict of floats, plus ``"stencil"`` (the mean row window, a list of lists),
        ``"singular_values"`` (dense only, descending) and ``"method"``.
    """
    shape = tuple(g.shape[-3:])
    n = math.prod(shape)
    if dense:
        J = jacobian(P, g, k, iterate=iterate, chunk=chunk).double()
        indices = torch.arange(n)
        result = _summarise_rows(J, J.T, indices, n)
        singular = torch.linalg.svdvals(J)
        symmetric = torch.linalg.eigvalsh((J + J.T) / 2)
        result.update(method="dense", singular_values=_rounded(singular), sigma_max=float(singular[0]),
                      sigma_min=float(singular[-1]), symmetric_min=float(symmetric[0]),
                      symmetric_max=float(symmetric[-1]))
        rows = J
    else:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(n, generator=generator)[:min(sample, n)].sort().values
        basis = _basis(indices, shape)
        rows = vjp_rows(P, g, k, basis, iterate=iterate, chunk=chunk).reshape(len(indices), n)
        columns = jvp_columns(P, g, k, basis, iterate=iterate, chunk=chunk).reshape(len(indices), n)
        result = _summarise_rows(rows, columns, indices, n)

        def J_(v):
            return jvp_columns(P, g, k, v.float().reshape(1, *shape), iterate=iterate).reshape(n).double()

        def Jt(v):
            return vjp_rows(P, g, k, v.float().reshape(1, *shape), iterate=iterate).reshape(n).double()

        gram = lanczos(lambda v: Jt(J_(v)), n, lanczos_steps, seed=seed)
        symmetric = lanczos(lambda v: (J_(v) + Jt(v)) / 2, n, lanczos_steps, seed=seed + 1)
        result.update(method=f"sampled: {len(indices)} exact rows and columns, Lanczos {lanczos_steps} steps",
                      sigma_max=math.sqrt(max(float(gram[-1]), 0.0)), sigma_min=math.sqrt(max(float(gram[0]), 0.0)),
                      symmetric_min=float(symmetric[0]), symmetric_max=float(symmetric[-1]))
    result["condition"] = result["sigma_max"] / result["sigma_min"] if result["sigma_min"] > 0 else math.inf
    result["stencil"] = _stencil(rows, indices, shape, radius).tolist()
    return result


# --- spectra of the (preconditioned) Gram matrix ------------------------------------------------
@dataclass
class RangeBasis:
    r"""An orthonormal basis of :math:`\operatorname{range}(A^\top)` and the non-zero eigenvalues of
    :math:`A^\top A` on it: :math:`A^\top A = V Λ V^\top` (V n×r, as in the module documentation).

    :ivar vectors: :math:`V^\top`, ``(r, n)`` float64: the eigenvectors as rows (``None`` when only the
        eigenvalues were asked for).
    :ivar eigenvalues: ``(r,)`` float64, descending.
    :ivar measurements: m, the number of (real) measurements.
    :ivar shape: the image shape (C, H, W).
    """

    vectors: Optional[torch.Tensor]
    eigenvalues: torch.Tensor
    measurements: int
    shape: tuple

    @property
    def rank(self) -> int:
        return len(self.eigenvalues)

    @property
    def condition(self) -> float:
        """λ_max/λ_min of AᵀA on its range."""
        return float(self.eigenvalues[0] / self.eigenvalues[-1])


def range_basis(physics, shape: Sequence[int], *, vectors: bool = True, rank_tol: float = RANK_TOLERANCE,
                chunk: int = 256) -> RangeBasis:
    r"""The non-zero spectrum of :math:`A^\top A` and its eigenvectors, exactly, from the m×m matrix
    :math:`AA^\top` (m applications of :math:`A^\top`, then a float64 eigendecomposition).

    With :math:`AA^\top = U Λ U^\top` (rows of A: :math:`R = [A^\top e_i]_i`), the eigenvectors of
    :math:`A^\top A` for the non-zero λ are the rows of :math:`V^\top = Λ^{-1/2} U^\top R`. Eigenvalues
    below ``rank_tol``·λ_max count as zero (e.g. a real image's Hermitian k-space duplicates).

    :param physics: the linear operator A (``A``, ``A_adjoint``).
    :param shape: the image shape (C, H, W).
    :param vectors: also return V (r×n floats; the eigenvalues alone need only m×m).
    """
    shape = tuple(int(s) for s in shape)
    with torch.no_grad():
        zero = physics.A(torch.zeros(1, *shape))
        m = zero[0].numel()
        R = torch.empty(m, math.prod(shape), dtype=torch.float64)
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            E = torch.zeros(stop - start, m)
            E[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            R[start:stop] = physics.A_adjoint(E.reshape(-1, *zero.shape[1:])).reshape(stop - start, -1).double()
    eigenvalues, U = torch.linalg.eigh(R @ R.T)
    eigenvalues, U = eigenvalues.flip(0), U.flip(1)
    keep = eigenvalues > rank_tol * eigenvalues[0]
    eigenvalues, U = eigenvalues[keep], U[:, keep]
    V = (U.T @ R) / eigenvalues.sqrt()[:, None] if vectors else None
    return RangeBasis(V, eigenvalues, m, shape)


def _rounded(values: torch.Tensor) -> list[float]:
    """Six significant digits (the float32 networks give no more), for compact JSON."""
    return [float(f"{v:.6g}") for v in values.tolist()]


def _spectrum_record(singular: Optional[torch.Tensor], eigen: Optional[torch.Tensor], sigma_max: float,
                     sigma_min: float, method: str) -> dict:
    record = {"method": method, "sigma_max": sigma_max, "sigma_min": sigma_min,
              "condition": sigma_max / sigma_min if sigma_min > 0 else math.inf,
              "singular_values": None if singular is None else _rounded(singular)}
    if eigen is not None:
        magnitude = eigen.abs()
        record.update(eigen_condition=float(magnitude.max() / magnitude.min()) if magnitude.min() > 0 else math.inf,
                      min_real=float(eigen.real.min() / magnitude.max()),
                      max_imag=float(eigen.imag.abs().max() / magnitude.max()))
    return record


def preconditioned_spectrum(basis: RangeBasis, P=None, g: Optional[torch.Tensor] = None, k: int = 0, *,
                            iterate: Optional[torch.Tensor] = None, method: str = "dense", steps: int = 40,
                            seed: int = 0, chunk: int = 32) -> dict:
    r"""Singular values (and eigenvalues) of :math:`S = Λ^{1/2} V^\top J_k V Λ^{1/2}`, the linearised
    preconditioned Gram matrix :math:`J_k A^\top A` on :math:`\operatorname{range}(A^\top)`.

    :param basis: :func:`range_basis` of the operator (with vectors).
    :param P: the preconditioner (``None``: J = I, the operator's own spectrum, exact).
    :param g: the gradient at which J is taken (any for a linear P).
    :param method: ``"dense"`` (r vector–Jacobian products, then an SVD and an eigendecomposition
        in float64: exact) or ``"krylov"`` (``steps`` Lanczos iterations on :math:`S^\top S`, one
        product with J and one with Jᵀ each: κ is a lower bound, tight when G is well conditioned).
    :return: ``{"method", "sigma_max", "sigma_min", "condition", "singular_values"}`` (singular
        values descending, dense only) and, dense only, ``eigen_condition`` (max|λ|/min|λ| of J·G),
        ``min_real`` and ``max_imag`` (relative to max|λ|).
    """
    lam = basis.eigenvalues
    if P is None:
        return _spectrum_record(lam, lam.to(torch.complex128), float(lam[0]), float(lam[-1]), "exact")
    if basis.vectors is None:
        raise ValueError("preconditioned_spectrum needs range_basis(..., vectors=True)")
    if g is None:
        g = torch.zeros(basis.shape)
    V, root = basis.vectors, lam.sqrt()
    images = lambda M: M.float().reshape(-1, *basis.shape)  # noqa: E731
    if method == "dense":
        rows = vjp_rows(P, g, k, images(V), iterate=iterate, chunk=chunk).reshape(basis.rank, -1).double()
        S = root[:, None] * (rows @ V.T) * root[None, :]  # S_ij = √λ_i (Jᵀv_i)ᵀ v_j √λ_j
        singular = torch.linalg.svdvals(S)
        return _spectrum_record(singular, torch.linalg.eigvals(S), float(singular[0]), float(singular[-1]), "dense")
    if method != "krylov":
        raise ValueError(f"method must be 'dense' or 'krylov', got {method!r}")

    def S(x):  # S x = Λ^½ Vᵀ J V Λ^½ x (``V`` here holds Vᵀ)
        return root * (V @ jvp_columns(P, g, k, images(V.T @ (root * x)), iterate=iterate).reshape(-1).double())

    def St(x):
        return root * (V @ vjp_rows(P, g, k, images(V.T @ (root * x)), iterate=iterate).reshape(-1).double())

    ritz = lanczos(lambda x: St(S(x)), basis.rank, steps, seed=seed)
    return _spectrum_record(None, None, math.sqrt(max(float(ritz[-1]), 0.0)), math.sqrt(max(float(ritz[0]), 0.0)),
                            f"krylov ({steps} Lanczos steps on SᵀS: κ is a lower bound)")


def krylov_check(basis: RangeBasis, steps: int = 40, seed: int = 0) -> dict:
    """Lanczos on SᵀS for J = I (S = Λ, known exactly): how close its κ comes to the true one."""
    lam = basis.eigenvalues
    ritz = lanczos(lambda x: lam * lam * x, basis.rank, steps, seed=seed)
    estimate = math.sqrt(float(ritz[-1]) / max(float(ritz[0]), 1e-300))
    return {"steps": steps, "estimate": estimate, "exact": basis.condition,
            "relative_error": abs(estimate - basis.condition) / basis.condition}


# --- nonlinearity --------------------------------------------------------------------------------
@torch.no_grad()
def _apply(P, g: torch.Tensor, k: int, iterate: Optional[torch.Tensor]) -> torch.Tensor:
    kwargs = {}
    if getattr(P, "uses_iterate", False):
        kwargs["iterate"] = iterate.reshape(1, *g.shape[-3:]).expand(len(g), -1, -1, -1)
    return P(g, k, **kwargs)


def linearization_error(P, g: torch.Tensor, k: int, epsilons: Sequence[float] = EPSILONS, *,
                        iterate: Optional[torch.Tensor] = None, seed: int = 0) -> list[dict]:
    r""":math:`\|P(g + εh) − P(g) − εJ_k h\| / (ε\|h\|)` for a random h with :math:`\|h\| = \|g\|`
    (ε is relative to the gradient's size): 0 for a linear P (up to round-off, ∝ 1/ε), O(ε) for a
    smooth one. ``[{"eps": ε, "error": …}, …]``."""
    g = g.reshape(1, *g.shape[-3:]).float()
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(g.shape, generator=generator)
    h = h * (g.norm() / h.norm())
    Jh = jvp_columns(P, g, k, h, iterate=iterate)
    base = _apply(P, g, k, iterate)
    steps = torch.tensor(list(epsilons), dtype=torch.float32).view(-1, 1, 1, 1)
    moved = _apply(P, g + steps * h, k, iterate)
    errors = (moved - base - steps * Jh).flatten(1).double().norm(dim=1) / (steps.flatten().double() * float(h.norm()))
    return [{"eps": float(e), "error": float(v)} for e, v in zip(epsilons, errors)]


def homogeneity_error(P, g: torch.Tensor, k: int, alphas: Sequence[float] = ALPHAS, *,
                      iterate: Optional[torch.Tensor] = None) -> dict:
    r""":math:`\|P(αg) − αP(g)\| / \|αP(g)\|` for each α: 0 for α > 0 when P is positively
    homogeneous (the NPO by construction), α = −1 tests oddness. ``{str(α): error}``."""
    g = g.reshape(1, *g.shape[-3:]).float()
    base = _apply(P, g, k, iterate)
    scales = torch.tensor(list(alphas), dtype=torch.float32).view(-1, 1, 1, 1)
    errors = _relative(_apply(P, scales * g, k, iterate), scales * base)
    return {f"{a:g}": float(e) for a, e in zip(alphas, errors)}


# --- one preconditioner along real trajectories ---------------------------------------------------
def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def teacher_alignment(task: Task, trace, y_t: torch.Tensor) -> list[dict]:
    r"""How well the student's (preconditioned) gradients point along the teacher's, per iteration.

    :param trace: the :class:`~d2gp.solver.Trace` of the student's preconditioned run.
    :param y_t: the teacher's measurements of the same images.
    :return: per k, ``{"k", "cos_preconditioned_teacher": mean cos(P g_k, ∇f_t(z_k)),
        "cos_gradient_teacher": mean cos(g_k, ∇f_t(z_k))}`` over the images, with
        :math:`∇f_t(z) = A_t^\top(A_t z − y_t)` at the student's iterate z_k (the D2GP gradient loss's target).
    """
    records = []
    with torch.no_grad():
        for k, (grad, pgrad, z) in enumerate(zip(trace.grad, trace.preconditioned, trace.z)):
            teacher = task.teacher.A_adjoint(task.teacher.A(z) - y_t)
            records.append({"k": k, "cos_preconditioned_teacher": _mean(_cosine(pgrad, teacher).tolist()),
                            "cos_gradient_teacher": _mean(_cosine(grad, teacher).tolist())})
    return records


def analyze_preconditioner(P, task: Task, images: torch.Tensor, at: Sequence[int], *, basis: RangeBasis,
                           denoiser=None, step_size: Optional[float] = None, noise_seed: int = 0,
                           dense_jacobian: bool = True, spectrum: str = "dense", sample: int = 64,
                           lanczos_steps: int = 30, krylov_steps: int = 40, fd_probes: int = 4,
                           progress: Callable[[str], None] | None = None) -> dict:
    r"""Everything about one preconditioner at the gradients of its own student trajectories.

    The student's preconditioned PnP-FISTA runs on ``images`` (noise seeded per image as in
    :func:`d2gp.evaluation.evaluate_solver`) for ``max(at) + 1`` iterations; at each k of ``at``
    and each image, :math:`J_k` is taken at :math:`g_k = ∇f_s(z_k)`.

    :param basis: :func:`range_basis` of the student (with vectors).
    :param step_size: the student's γ (default the task's; a learned preconditioner's is the one it was
        trained with, :func:`~d2gp.preconditioners.files.trained_step_size`).
    :param dense_jacobian: dense J (see :func:`jacobian_properties`).
    :param spectrum: ``"dense"`` or ``"krylov"`` (see :func:`preconditioned_spectrum`).
    :return: ``{"per_k": {k: {"jacobian", "spectrum", "fd", "linearization", "homogeneity"} averaged
        over images (spectra and stencils of the first image)}, "alignment": per k = 0 … max(at)}``.
    """
    at = sorted(set(int(k) for k in at))
    denoiser = denoiser if denoiser is not None else task.denoiser()
    gamma = step_size or task.student_step_size
    x = task.check_images(images)
    y_s, y_t = measure(task.student, x, seed=noise_seed), measure(task.teacher, x, seed=noise_seed)
    with torch.no_grad():
        _, trace = pnp_fista(task.student, y_s, denoiser, gamma, max(at) + 1, P, trace=True)
    V = basis.vectors
    alignment = teacher_alignment(task, trace, y_t)
    for record, pgrad in zip(alignment, trace.preconditioned):
        flat = pgrad.flatten(1).double()
        inside = (flat @ V.T).pow(2).sum(1)
        record["outside_range"] = _mean((1 - inside / flat.pow(2).sum(1).clamp_min(1e-300)).tolist())
    per_k = {}
    for k in at:
        records = []
        for i in range(len(x)):
            g, z = trace.grad[k][i], trace.z[k][i]
            if progress:
                progress(f"k = {k}, image {i + 1}/{len(x)}")
            iterate = z if getattr(P, "uses_iterate", False) else None
            records.append({
                "jacobian": jacobian_properties(P, g, k, iterate=iterate, dense=dense_jacobian, sample=sample,
                                                lanczos_steps=lanczos_steps),
                "spectrum": preconditioned_spectrum(basis, P, g, k, iterate=iterate, method=spectrum, steps=krylov_steps),
                "fd": finite_difference_agreement(P, g, k, iterate=iterate, probes=fd_probes),
                "linearization": linearization_error(P, g, k, iterate=iterate),
                "homogeneity": homogeneity_error(P, g, k, iterate=iterate),
                "gradient_norm": float(g.norm()),
            })
        per_k[k] = _average(records)
    return {"at": at, "images": len(x), "step_size": gamma, "per_k": per_k, "alignment": alignment}


def _average(records: list[dict]) -> dict:
    """The first record, with every float replaced by the mean over records (lists are the first's)."""
    def merge(values):
        first = values[0]
        if isinstance(first, dict):
            return {key: merge([v[key] for v in values]) for key in first}
        if isinstance(first, float) and all(isinstance(v, float) for v in values):
            return _mean(values)
        if isinstance(first, list) and first and isinstance(first[0], dict):
            return [merge([v[i] for v in values]) for i in range(len(first))]
        return first
    return merge(records)


# --- convergence (the paper's Fig. 3) ------------------------------------------------------------
@torch.no_grad()
def convergence_curves(physics, images: torch.Tensor, denoiser, step_size: float, iterations: int,
                       preconditioner=None, *, noise_seed: int = 0, batch_size: int = 8) -> dict:
    r"""Mean over ``images`` of PSNR(x_k, x) and :math:`f(x_k) = \tfrac12\|Ax_k − y\|^2` for
    k = 0 … K, and of :math:`\|x_{k+1} − x_k\|` for k = 0 … K−1 (x_0 = γAᵀy, noise seeded per image
    as in :func:`d2gp.evaluation.evaluate_solver`, so the PSNR curve is the evaluation's)."""
    sums = {"psnr": torch.zeros(iterations + 1, dtype=torch.float64),
            "fidelity": torch.zeros(iterations + 1, dtype=torch.float64),
            "step_norm": torch.zeros(iterations, dtype=torch.float64)}
    for start in range(0, len(images), batch_size):
        x_true = images[start:start + batch_size]
        y = measure(physics, x_true, seed=noise_seed, offset=start)
        x0 = step_size * physics.A_adjoint(y)
        _, trace = pnp_fista(physics, y, denoiser, step_size, iterations, preconditioner, x0=x0, trace=True)
        estimates = [x0, *trace.x]
        for k, estimate in enumerate(estimates):
            sums["psnr"][k] += psnr(estimate, x_true).double().sum()
            sums["fidelity"][k] += fidelity(physics, estimate, y).double().sum()
            if k < iterations:
                sums["step_norm"][k] += (estimates[k + 1] - estimate).flatten(1).double().norm(dim=1).sum()
    return {name: (values / len(images)).tolist() for name, values in sums.items()}


def _benchmark_record(benchmark_dir: str | os.PathLike, task_name: str) -> dict:
    path = Path(benchmark_dir) / task_name / "results.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: --benchmark takes the --out folder of `d2gp benchmark` "
                              f"run with task {task_name!r}")
    try:
        record = json.loads(path.read_text())
        record["config"]["task"], record["methods"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a `d2gp benchmark` results file") from None
    return record


def _run_directory(recorded: str, task_name: str, name: str, seed_key: str, runs: Optional[Path]) -> Optional[Path]:
    candidates = [Path(recorded)]
    if runs is not None:
        candidates.insert(0, runs / task_name / f"{name}-{seed_key}")
    return next((c for c in candidates if (c / "best.pt").is_file()), None)


def benchmark_methods(record: dict, task: Task, *, runs: str | os.PathLike | None = None,
                      methods: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    """The preconditioners of a benchmark record, rebuilt without training.

    Non-learned methods from their tuning records (the chosen candidate of
    :func:`d2gp.tuning.classical_candidates`, the tuned γ); learned ones from their run
    directories (``runs/TASK/METHOD-seedS`` or the recorded path; first seed); the teacher.

    :return: ``(methods, skipped)``: each method ``{"method", "label", "physics", "preconditioner",
        "step_size", "learned", "psnr_at_K"}``; each skipped one ``{"method", "label", "reason"}``.
    """
    from d2gp.tuning import classical_candidates
    from d2gp.training import load_npo

    K = record["config"]["iterations"]
    runs = Path(runs) if runs is not None else None
    built, skipped = [], []
    for entry in record["methods"]:
        name, label = entry["method"], entry["label"]
        if methods is not None and name not in methods:
            continue
        physics, P, source = task.student, None, entry["tuning_or_runs"]
        if name == "teacher":
            physics = task.teacher
        elif entry["learned"]:
            seed_key, recorded = next(iter(source.items()), (None, None))
            run = _run_directory(recorded, task.name, name, seed_key, runs) if seed_key else None
            if run is None:
                skipped.append({"method": name, "label": label,
                                "reason": f"run directory {recorded} (or under --runs) not found; not retrained"})
                continue
            P, _ = load_npo(run / "best.pt", task)
        else:
            candidates = classical_candidates(name, task)
            if source.get("chosen") not in candidates:
                skipped.append({"method": name, "label": label,
                                "reason": f"tuning record names {source.get('chosen')!r}, not one of {sorted(candidates)}"})
                continue
            P = candidates[source["chosen"]]()
        built.append({"method": name, "label": label, "physics": physics, "preconditioner": P,
                      "step_size": float(entry["step_size"]), "learned": bool(entry["learned"]),
                      "psnr_at_K": entry["psnr"][str(K)][0] if str(K) in entry.get("psnr", {}) else None,
                      "psnr_per_iteration": entry.get("psnr_per_iteration")})
    return built, skipped


def convergence(benchmark_dir: str | os.PathLike, task: Task, out: str | os.PathLike, *, horizon: int = 5,
                limit: Optional[int] = 8, runs: str | os.PathLike | None = None, extra: Sequence[tuple] = (),
                progress: Callable[[str], None] | None = None) -> dict:
    """PSNR, fidelity and step norm per iteration to ``horizon``·K for every method of a benchmark run.

    Writes ``out/convergence.png``, ``convergence.md``/``.csv`` (values at K, 2K, horizon·K) and
    ``convergence.json`` (every curve, the skipped methods and why, and how far the rerun PSNR
    curves are from the recorded ones on the first 2K iterations when all test images are used).

    :param benchmark_dir: the ``--out`` folder of ``d2gp benchmark`` (its ``TASK/results.json``).
    :param task: the task (its settings must be the record's).
    :param limit: the first ``limit`` test images (``None``: as many as the benchmark scored).
    :param extra: more curves, ``(label, preconditioner, step_size)`` on the student.
    """
    from d2gp.plots import convergence_figure

    record = _benchmark_record(benchmark_dir, task.name)
    recorded_task = record["config"]["task"]
    if recorded_task != task.config.to_dict():
        changed = sorted(k for k in recorded_task if recorded_task.get(k) != task.config.to_dict().get(k))
        raise TaskError(f"the benchmark in {benchmark_dir} ran {task.name} with other settings ({', '.join(changed)}); "
                        f"pass the same task settings")
    K = int(record["config"]["iterations"])
    scored = int(record["config"]["test_images"])
    images = task.images("test", limit=min(limit, scored) if limit else scored)
    methods, skipped = benchmark_methods(record, task, runs=runs)
    methods += [{"method": label, "label": label, "physics": task.student, "preconditioner": P, "step_size": step,
                 "learned": True, "psnr_per_iteration": None} for label, P, step in extra]
    denoiser = task.denoiser()
    curves, began = {}, time.perf_counter()
    for method in methods:
        if progress:
            progress(f"convergence: {method['label']}")
        curves[method["label"]] = convergence_curves(method["physics"], images, denoiser, method["step_size"],
                                                     horizon * K, method["preconditioner"])
        recorded = method.get("psnr_per_iteration")
        if recorded and len(images) == scored:
            ours = curves[method["label"]]["psnr"][:len(recorded)]
            curves[method["label"]]["max_difference_to_record"] = max(abs(a - b) for a, b in zip(ours, recorded))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ks = sorted({K, min(2, horizon) * K, horizon * K})
    header = ["method", *[f"PSNR k={k} (dB)" for k in ks], *[f"f(x_k) k={k}" for k in ks],
              *[f"‖x_k − x_k−1‖ k={k}" for k in ks]]
    rows = [[label, *[f"{c['psnr'][k]:.2f}" for k in ks], *[f"{c['fidelity'][k]:.3g}" for k in ks],
             *[f"{c['step_norm'][k - 1]:.3g}" for k in ks]] for label, c in curves.items()]
    write_table(header, rows, out / "convergence")
    write_json({"environment": environment(), "benchmark": str(benchmark_dir), "task": task.name, "iterations": K,
                "horizon": horizon * K, "test_images": len(images), "benchmark_test_images": scored,
                "seconds": time.perf_counter() - began, "skipped": skipped,
                "step_sizes": {m["label"]: m["step_size"] for m in methods}, "curves": curves},
               out / "convergence.json")
    convergence_figure(curves, out / "convergence.png", train_iterations=K,
                       title=f"{task.name}: convergence to {horizon}K = {horizon * K} ({len(images)} test images)")
    return {"table": markdown_table(header, rows), "curves": curves, "skipped": skipped, "images": len(images)}


# --- the whole analysis of one task: `d2gp analyze` -----------------------------------------------
LINEAR_CHOICES = ("best", "newton", "poly-l2", "poly-chebyshev", "poly-ifista", "none")


def _is_linear_method(name: str) -> bool:
    from d2gp.benchmark import METHODS

    method = METHODS.get(name)
    if method is None or name in ("baseline", "teacher"):
        return False
    return not method.learned or method.train["preconditioner"] != "npo"


def _comparison_linear(task: Task, choice: str, record: Optional[dict], runs) -> Optional[dict]:
    """The linear preconditioner to compare with: ``best`` = the linear method of the benchmark record
    with the best test PSNR at K that can be rebuilt (``poly-l2``, which has no tuned setting, without
    a record); a method name = that method (tuned as recorded, else its first candidate)."""
    from d2gp.benchmark import METHODS
    from d2gp.tuning import classical_candidates

    if choice == "none":
        return None
    if choice not in LINEAR_CHOICES:
        raise TaskError(f"--linear must be one of {', '.join(LINEAR_CHOICES)}, got {choice!r}")
    if record is not None:
        wanted = [m["method"] for m in record["methods"] if _is_linear_method(m["method"])]
        wanted = wanted if choice == "best" else [choice]
        built, _ = benchmark_methods(record, task, runs=runs, methods=wanted)
        built = [m for m in built if m["psnr_at_K"] is not None]
        if built:
            best = max(built, key=lambda m: m["psnr_at_K"])
            return {"method": best["method"], "label": best["label"], "preconditioner": best["preconditioner"],
                    "source": f"tuned in {record.get('_path', 'the benchmark')}"}
    name = "poly-l2" if choice == "best" else choice
    label, builder = next(iter(classical_candidates(name, task).items()))
    return {"method": name, "label": f"{METHODS[name].label} [{label}]", "preconditioner": builder(),
            "source": "untuned default (no benchmark record)"}


def _label(meta: dict, source: str) -> str:
    from d2gp.apps import METHOD_LABELS

    kind = meta.get("kind", "npo")
    label = METHOD_LABELS.get(meta["method"], meta["method"]) if kind == "npo" else f"{kind} ({meta['method']})"
    return label if source in ("d2gp", "supervised") else f"{label} [{Path(source).name}]"


def _slug(source: str, taken: set) -> str:
    path = Path(source)
    base = source if source in ("d2gp", "supervised") else (path.name if path.is_dir() else path.stem)
    slug, i = base, 1
    while slug in taken:
        i += 1
        slug = f"{base}-{i}"
    taken.add(slug)
    return slug


def _iterations(text: str | None, K: int) -> list[int]:
    if text is None:
        return sorted({0, K // 2, K - 1})
    try:
        values = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        raise TaskError(f"--at must be a comma-separated list of iterations, got {text!r}") from None
    if not values or values[0] < 0:
        raise TaskError(f"--at values must be integers ≥ 0, got {text!r}")
    return values


def _fmt(value: float) -> str:
    return "∞" if not math.isfinite(value) else f"{value:.4g}"


def _summary_table(result: dict) -> tuple[list[str], list[list]]:
    header = ["k", "κ(J_k·A_sᵀA_s)", "κ(J_k)", "‖J_k − I‖_F/√n", "c* (J ≈ c*·I)", "‖J − c*I‖/‖J‖", "asymmetry",
              "λ_min((J+Jᵀ)/2)", "diagonal share of ‖J‖²", "diagonally dominant rows", "FD vs autograd (median)",
              "linearisation error ε=0.1", "‖P(2g) − 2P(g)‖ rel.", "‖P(−g) + P(g)‖ rel."]
    rows = []
    for k, r in result["per_k"].items():
        J, S = r["jacobian"], r["spectrum"]
        lin = {e["eps"]: e["error"] for e in r["linearization"]}
        rows.append([k, _fmt(S["condition"]), _fmt(J["condition"]), f"{J['distance_to_identity']:.3g}",
                     f"{J['best_scale']:.4g}", f"{J['distance_to_scaled_identity']:.3g}", f"{J['asymmetry']:.3g}",
                     f"{J['symmetric_min']:.3g}", f"{J['diagonal_energy']:.3g}", f"{J['dominant_rows']:.2f}",
                     f"{r['fd']['median']:.2g}", f"{lin.get(0.1, math.nan):.3g}", f"{r['homogeneity'].get('2', math.nan):.2g}",
                     f"{r['homogeneity'].get('-1', math.nan):.3g}"])
    return header, rows


def analyze(sources: Sequence[str], task: Task, out: str | os.PathLike, *, at: Sequence[int] | str | None = None,
            images: int = 1, split: str = "test", benchmark: str | os.PathLike | None = None,
            runs: str | os.PathLike | None = None, linear: str = "best", max_dense: int = 1024,
            jacobian_mode: str = "auto", spectrum_mode: str = "auto", sample: int = 64, lanczos_steps: int = 30,
            krylov_steps: int = 40, fd_probes: int = 4, convergence_images: Optional[int] = 8, horizon: int = 5,
            progress: bool = True) -> dict:
    """``d2gp analyze``: the Jacobian, conditioning and nonlinearity of trained or shipped
    preconditioners on ``task``, the student's, the teacher's and a linear preconditioner's spectra,
    and (with ``benchmark``) the convergence of every benchmarked method to ``horizon``·K.

    :param sources: preconditioners for :func:`d2gp.training.load_npo` (a weights file, a run
        directory, or ``d2gp``/``supervised`` for the shipped NPOs).
    :param at: iterations k at which J_k is analysed (default 0, K/2, K−1; K = the first source's
        training K, else 20).
    :param images: test images whose student trajectories give the gradients (results averaged).
    :param benchmark: a ``d2gp benchmark`` output folder: the tuned linear preconditioners and the
        methods whose convergence is plotted.
    :param linear: which linear preconditioner to compare with (:data:`LINEAR_CHOICES`).
    :param max_dense: compute J densely when n ≤ max_dense (``jacobian_mode="auto"``); the spectrum
        densely when r ≤ max_dense or κ(A_sᵀA_s) > :data:`KRYLOV_MAX_CONDITION` (``spectrum_mode="auto"``).
    :return: the combined table and every result; writes ``out/`` (``table.md``/``.csv``,
        ``results.json``, ``spectra.png``, per preconditioner ``SLUG/summary.{md,csv,json}``,
        ``SLUG/jacobian.png``, ``SLUG/nonlinearity.png``; ``convergence.*`` with ``benchmark``).
    """
    from d2gp.plots import nonlinearity_figure, spectra_figure, stencil_figure
    from d2gp.preconditioners.files import trained_step_size
    from d2gp.training import load_npo

    say = (lambda text: print(text, flush=True)) if progress else (lambda text: None)
    if not sources and benchmark is None:
        raise TaskError("nothing to analyse: give preconditioners (a run directory, a weights file, d2gp or "
                        "supervised) and/or --benchmark DIR")
    for name, mode in (("--jacobian", jacobian_mode), ("--spectrum", spectrum_mode)):
        if mode not in ("auto", "dense", "krylov" if name == "--spectrum" else "sampled"):
            raise TaskError(f"{name} must be auto, dense or {'krylov' if name == '--spectrum' else 'sampled'}, got {mode!r}")
    if images < 1:
        raise TaskError(f"--images must be ≥ 1, got {images}")
    if horizon < 1:
        raise TaskError(f"--horizon must be ≥ 1, got {horizon}")
    record = _benchmark_record(benchmark, task.name) if benchmark is not None else None
    if record is not None:
        record["_path"] = str(benchmark)
    loaded, taken = [], set()
    for source in sources:
        P, meta = load_npo(source, task)
        if meta["task_config"] != task.config.to_dict():
            say(f"note: {source} was trained with other task settings ({meta['task_config']})")
        loaded.append({"source": str(source), "slug": _slug(str(source), taken), "label": _label(meta, str(source)),
                       "preconditioner": P, "meta": meta})
    if linear != "none" and linear not in LINEAR_CHOICES:
        raise TaskError(f"--linear must be one of {', '.join(LINEAR_CHOICES)}, got {linear!r}")
    K = int(loaded[0]["meta"].get("iterations", 20)) if loaded else int(record["config"]["iterations"])
    ks = at if isinstance(at, (list, tuple)) else _iterations(at, K)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    results: dict = {"task": task.name, "task_config": task.config.to_dict(), "at": ks, "sources": {}}

    if loaded:
        say(f"{task!r}: spectra of A_sᵀA_s and A_tᵀA_t")
        student = range_basis(task.student, task.image_shape)
        teacher = range_basis(task.teacher, task.image_shape, vectors=False)
        n = math.prod(task.image_shape)
        dense_jacobian = jacobian_mode == "dense" or (jacobian_mode == "auto" and n <= max_dense)
        spectrum = spectrum_mode if spectrum_mode != "auto" else (
            "dense" if student.rank <= max_dense or student.condition > KRYLOV_MAX_CONDITION else "krylov")
        spectra = {"student": preconditioned_spectrum(student), "teacher": preconditioned_spectrum(teacher)}
        results.update(n=n, rank={"student": student.rank, "teacher": teacher.rank},
                       measurements={"student": student.measurements, "teacher": teacher.measurements},
                       jacobian_method="dense" if dense_jacobian else "sampled", spectrum_method=spectrum,
                       spectra=spectra)
        if spectrum == "krylov":
            results["krylov_check"] = krylov_check(student, krylov_steps)
        comparison = _comparison_linear(task, linear, record, runs)
        if comparison is not None:
            say(f"linear preconditioner: {comparison['label']}")
            P = comparison["preconditioner"]
            per_k = isinstance(P, torch.nn.Module) and getattr(P, "iterations", 1) > 1
            comparison["spectrum"] = {k: preconditioned_spectrum(student, P, None, k, method=spectrum, steps=krylov_steps)
                                      for k in (ks if per_k else ks[:1])}
            results["linear"] = {key: v for key, v in comparison.items() if key != "preconditioner"}
        test = task.images(split, limit=images)
        denoiser = task.denoiser()
        for item in loaded:
            say(f"{item['label']}: J_k at k = {', '.join(map(str, ks))} ({'dense' if dense_jacobian else 'sampled'} "
                f"Jacobian, {spectrum} spectrum, {len(test)} image(s))")
            started = time.perf_counter()
            result = analyze_preconditioner(
                item["preconditioner"], task, test, ks, basis=student, denoiser=denoiser, dense_jacobian=dense_jacobian,
                step_size=trained_step_size(item["meta"], task), spectrum=spectrum, sample=sample,
                lanczos_steps=lanczos_steps, krylov_steps=krylov_steps,
                fd_probes=fd_probes, progress=lambda text: say(f"  {text}"))
            result.update(source=item["source"], label=item["label"], seconds=time.perf_counter() - started,
                          method=item["meta"]["method"], kind=item["meta"].get("kind", "npo"),
                          trained_iterations=item["meta"].get("iterations"))
            folder = out / item["slug"]
            header, rows = _summary_table(result)
            write_table(header, rows, folder / "summary")
            write_json(result, folder / "summary.json")
            stencil_figure({f"k = {k}": r["jacobian"]["stencil"] for k, r in result["per_k"].items()},
                           folder / "jacobian.png", title=f"{task.name}, {item['label']}: mean row of J_k around its pixel")
            nonlinearity_figure({f"k = {k}": r["linearization"] for k, r in result["per_k"].items()},
                                folder / "nonlinearity.png", title=f"{task.name}, {item['label']}: linearisation error")
            results["sources"][item["slug"]] = result

        linear_spectra = results.get("linear", {}).get("spectrum", {})
        header = ["k", f"student A_sᵀA_s (r = {student.rank})", f"teacher A_tᵀA_t (r = {teacher.rank})"]
        if comparison is not None:
            header.append(f"linear: {comparison['label']}")
        header += [f"{item['label']}: J_k·A_sᵀA_s" for item in loaded]
        rows = []
        for k in ks:
            row = [k, _fmt(spectra["student"]["condition"]), _fmt(spectra["teacher"]["condition"])]
            if comparison is not None:
                row.append(_fmt(linear_spectra.get(k, next(iter(linear_spectra.values())))["condition"]))
            row += [_fmt(results["sources"][item["slug"]]["per_k"][k]["spectrum"]["condition"]) for item in loaded]
            rows.append(row)
        results["seconds_analysis"] = time.perf_counter() - began
        write_results(out, header, rows, {**results, "sources": {  # each source's details: SLUG/summary.json
            item["slug"]: {"label": item["label"], "source": item["source"], "summary": f"{item['slug']}/summary.json",
                           "condition": {k: results["sources"][item["slug"]]["per_k"][k]["spectrum"]["condition"]
                                         for k in ks}} for item in loaded}})
        results["table"] = markdown_table(header, rows)

        curves = {"student A_sᵀA_s": spectra["student"]["singular_values"],
                  "teacher A_tᵀA_t": spectra["teacher"]["singular_values"]}
        conditions = {"student": {k: spectra["student"]["condition"] for k in ks},
                      "teacher": {k: spectra["teacher"]["condition"] for k in ks}}
        if comparison is not None:
            first = next(iter(linear_spectra.values()))
            if first["singular_values"] is not None:
                curves[comparison["label"]] = first["singular_values"]
            conditions[comparison["label"]] = {k: linear_spectra.get(k, first)["condition"] for k in ks}
        for item in loaded:
            per_k = results["sources"][item["slug"]]["per_k"]
            if per_k[ks[-1]]["spectrum"]["singular_values"] is not None:  # the last k; κ over k on the right
                curves[f"{item['label']}, k = {ks[-1]}"] = per_k[ks[-1]]["spectrum"]["singular_values"]
            conditions[item["label"]] = {k: per_k[k]["spectrum"]["condition"] for k in ks}
        spectra_figure(curves, conditions, out / "spectra.png", fixed=3 if comparison is not None else 2,
                       title=f"{task.name}: singular values of (J_k or P)·AᵀA on range(Aᵀ), symmetrised")
    if record is not None:
        say(f"convergence of the benchmarked methods to {horizon}K")
        extra = [(f"{item['label']} ({'shipped' if item['source'] in ('d2gp', 'supervised') else item['source']})",
                  item["preconditioner"], trained_step_size(item["meta"], task)) for item in loaded]
        conv = convergence(benchmark, task, out, horizon=horizon, limit=convergence_images, runs=runs, extra=extra,
                           progress=say)
        results["convergence"] = {"table": conv["table"], "skipped": conv["skipped"], "images": conv["images"]}
    results["seconds"] = time.perf_counter() - began
    return results

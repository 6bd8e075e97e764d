r"""Classical (non-learned) preconditioners for a fair comparison with the NPO (paper Table I).

Both are linear, fixed operators ``P(g, k) = P g`` (the iteration index is ignored), used in
preconditioned PnP-FISTA (:func:`d2gp.solver.pnp_fista`) as :math:`z − γ P ∇f(z)` with
:math:`∇f(z) = A^\top(Az − y)`.

:class:`Newton`: the regularised inverse Hessian :math:`P = (A^\top A + δI)^{-1}` (Fessler &
Booth 1999). Closed forms are picked automatically from the operator:

* ``"projector"``: :class:`d2gp.tasks.spc.HadamardSPC` with ±1 patterns, :math:`A = SH` with
  :math:`H` the orthonormal 2D Walsh–Hadamard transform, so :math:`A^\top A = H^\top S^\top S H`
  is the orthogonal projector onto the measured rows and
  :math:`P = H \operatorname{diag}(1/(λ_i + δ)) H^\top` with :math:`λ_i ∈ \{0, 1\}`;
* ``"binary"``: :class:`d2gp.tasks.spc.HadamardSPC` with {0, 1} patterns. In the Hadamard
  domain :math:`c = Hx` every pattern adds the image mean: :math:`A^\top A = \tfrac{n}{4}(D +
  u e_0^\top + e_0 u^\top + m\, e_0 e_0^\top)` with :math:`D = \operatorname{diag}(u)`,
  :math:`u` the indicator of the measured rows and :math:`e_0` the constant row: a diagonal plus
  a rank-two term, inverted exactly by the Sherman–Morrison–Woodbury formula (a 2×2 system);
* ``"fourier"``: :class:`d2gp.tasks.mri.CartesianMRI` on real images, :math:`A^\top A x =
  \operatorname{Re} F^{-1} M F x = F^{-1} M_{\rm sym} F x` with the column mask symmetrised,
  :math:`M_{\rm sym}(k) = (M(k) + M(−k))/2 ∈ \{0, ½, 1\}` (a real image has a Hermitian
  spectrum), so :math:`P = F^{-1} \operatorname{diag}(1/(M_{\rm sym} + δ)) F`; the mask only
  depends on the column frequency, so this is a 1D real FFT along the width;
* ``"woodbury"``: deepinv's ``Downsampling`` with circular padding, :math:`A = S_d H` with
  :math:`H` a circular convolution and :math:`S_d` the decimation by ``d``. In the Fourier
  domain :math:`A^\top A` couples each frequency only with its :math:`d^2` aliases, as the
  rank-one block :math:`\tfrac{1}{d^2} w w^H`, :math:`w = \overline{\hat h}` over the alias
  class, and Sherman–Morrison (Woodbury on the decimation, Zhao et al. 2016) gives
  :math:`P\hat g = \tfrac1δ\big(\hat g − w\, (w^H \hat g) / (d^2 δ + \|w\|^2)\big)`. The kernel
  :math:`h` is read off the operator itself (``A`` applied to the :math:`d^2` unit impulses of
  one decimation cell), so no assumption on deepinv's filter placement is needed. Computed in
  float64 (the :math:`1/δ` form cancels when :math:`δ` is small);
* ``"cg"``: any other ``LinearPhysics``: conjugate
  gradients on :math:`(A^\top A + δI) p = g`, per image, a fixed budget of iterations with an
  early stop at a relative residual. Plain tensor operations (autograd goes through it).

Every closed form is checked against ``A_adjoint(A(v))`` on a random ``v`` when it is built;
on a mismatch (an operator whose conventions changed) it warns and falls back to CG.

:class:`Polynomial`: :math:`P = p(A^\top A / L)` with :math:`L = \|A^\top A\|` and
:math:`p(λ) = \sum_{i=0}^{d} c_i λ^i`, applied by Horner's rule with only ``A`` and
``A_adjoint`` (:math:`d` applications of :math:`A^\top A`). Coefficients (Iyer, Fessler et al.
2024), each a float64 tensor of :math:`d + 1` monomial coefficients :math:`c_0, …, c_d`:

* :func:`l2_coefficients`: :math:`\min_p \int_0^1 (1 − λ p(λ))^2 dλ` (the normal equations
  are a Hilbert-type system, solved exactly in rational arithmetic);
* :func:`chebyshev_coefficients`: :math:`\min_p \max_{λ ∈ [\ell, 1]} |1 − λ p(λ)|`, whose
  solution is :math:`1 − λ p(λ) = T_{d+1}\big(\tfrac{1 + \ell − 2λ}{1 − \ell}\big) /
  T_{d+1}\big(\tfrac{1 + \ell}{1 − \ell}\big)`;
* :func:`ifista_coefficients`: the truncated Neumann series of iFISTA (Bhotto, Ahmad & Swamy
  2015), :math:`p(λ) = α \sum_{i=0}^{d} (1 − αλ)^i`, i.e. :math:`1 − λ p(λ) = (1 − αλ)^{d+1}`.

A fair comparison: neither preconditioner is normalised to a particular step size
(:math:`P A^\top A` has eigenvalues :math:`λ/(λ+δ) < 1` for Newton and :math:`L\,μ\,p(μ)`,
:math:`μ ∈ [0, 1]`, for a polynomial), so every method — the identity, these and the NPO —
is run with its own tuned step size γ.

References:
    Fessler & Booth, "Conjugate-gradient preconditioning methods for shift-variant PET image
    reconstruction", IEEE TIP 1999.
    Zhao, Wang, Dobigeon, Tourneret, "Fast single image super-resolution using a new analytical
    solution for ℓ2–ℓ2 problems", IEEE TIP 2016.
    Iyer, Ke, Fessler et al., "Polynomial preconditioners for regularized linear inverse
    problems", SIAM J. Imaging Sci. 2024.
    Bhotto, Ahmad & Swamy, "An improved fast iterative shrinkage thresholding algorithm for image
    deblurring", SIAM J. Imaging Sci. 2015.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from d2gp.tasks.base import TaskError, power_norm

__all__ = [
    "Newton",
    "Polynomial",
    "conjugate_gradient",
    "l2_coefficients",
    "chebyshev_coefficients",
    "ifista_coefficients",
    "COEFFICIENT_CHOICES",
]

COEFFICIENT_CHOICES = ("l2", "chebyshev", "ifista")
NEWTON_METHODS = ("auto", "cg")

#: Relative mismatch above which a closed form is rejected at construction (float32 operators).
_SELF_CHECK_TOL = 1e-4


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be the image shape (C, H, W), got {shape}")
    return shape


def _physics_device(physics) -> torch.device:
    for buffer in physics.buffers():
        return buffer.device
    return torch.device("cpu")


def _normal(physics, v: torch.Tensor) -> torch.Tensor:
    """AᵀA v."""
    return physics.A_adjoint(physics.A(v))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image inner product, shape ``(B, 1, …, 1)`` broadcastable against ``a``."""
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))


def conjugate_gradient(
    physics, g: torch.Tensor, delta: float, iterations: int = 50, tol: float = 1e-6
) -> torch.Tensor:
    r"""Solve :math:`(A^\top A + δI) p = g` by conjugate gradients, each image of the batch on its own.

    Runs at most ``iterations`` steps and stops when every image has
    :math:`\|r\| ≤ \mathrm{tol}\,\|g\|`; an image that has converged is frozen while the others
    go on. Plain tensor operations: autograd goes through it.

    :param physics: the linear operator (``A``, ``A_adjoint``).
    :param g: right-hand sides ``(B, …)``.
    :param delta: δ > 0.
    :param iterations: maximum number of CG steps.
    :param tol: relative residual at which an image stops.
    """
    x = torch.zeros_like(g)
    r = g
    p = r
    rs = _dot(r, r)
    target = (tol * tol) * rs
    tiny = torch.finfo(g.dtype).tiny
    for _ in range(iterations):
        active = rs > target
        if not bool(active.any()):
            break
        Ap = _normal(physics, p) + delta * p
        pAp = _dot(p, Ap)
        alpha = torch.where(active, rs / pAp.clamp_min(tiny), torch.zeros_like(rs))
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = _dot(r, r)
        beta = torch.where(active, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        p = r + beta * p
        rs = torch.where(active, rs_new, rs)
    return x


class Newton(nn.Module):
    r"""Newton preconditioner :math:`P = (A^\top A + δI)^{-1}` (Fessler & Booth 1999).

    The form is chosen from the operator (:attr:`mode`): ``"projector"`` for a ±1
    :class:`~d2gp.tasks.spc.HadamardSPC`, ``"fourier"`` for a
    :class:`~d2gp.tasks.mri.CartesianMRI`, ``"woodbury"`` for deepinv's ``Downsampling``
    with circular padding, else ``"cg"`` (conjugate gradients). See the module docstring.

    .. note::

        For the ±1 single-pixel camera :math:`A^\top A` is a projector and the data-fidelity
        gradient :math:`A^\top(Az − y)` lies in :math:`\mathrm{range}(A^\top)`, the eigenspace
        of eigenvalue 1: there :math:`P g = g/(1 + δ)`. Newton is then a pure step-size
        rescaling of plain PnP-FISTA (the δ only matters for inputs outside the range).

    Only buffers (no parameters); the operator is kept as a submodule (the CG form applies it).

    :param physics: the linear operator ``A`` (a ``deepinv.physics.LinearPhysics``).
    :param delta: δ > 0.
    :param shape: the image shape ``(C, H, W)``.
    :param method: ``"auto"`` (closed form when there is one) or ``"cg"`` (force CG).
    :param cg_iterations: maximum number of CG steps (``"cg"`` form).
    :param cg_tol: relative residual at which CG stops.

    :Example:

    >>> import torch
    >>> from d2gp.tasks.spc import HadamardSPC, hadamard_rows
    >>> A = HadamardSPC(8, hadamard_rows(8, 16))
    >>> P = Newton(A, delta=0.1, shape=(1, 8, 8))
    >>> P.mode
    'projector'
    >>> g = A.A_adjoint(torch.randn(2, 1, 16))
    >>> torch.allclose(P(g, 0), g / 1.1, atol=1e-6)
    True
    """

    uses_iterate = False

    def __init__(
        self,
        physics,
        delta: float,
        shape: Sequence[int],
        *,
        method: str = "auto",
        cg_iterations: int = 50,
        cg_tol: float = 1e-6,
    ):
        super().__init__()
        delta = float(delta)
        if not (delta > 0 and math.isfinite(delta)):
            raise ValueError(f"delta must be a finite number > 0, got {delta}")
        if method not in NEWTON_METHODS:
            raise ValueError(f"unknown Newton method {method!r}; choose one of {', '.join(NEWTON_METHODS)}")
        if not isinstance(cg_iterations, int) or cg_iterations < 1:
            raise ValueError(f"cg_iterations must be an integer ≥ 1, got {cg_iterations!r}")
        if not cg_tol >= 0:
            raise ValueError(f"cg_tol must be ≥ 0, got {cg_tol}")
        self.shape = _check_shape(shape)
        self.delta = delta
        self.cg_iterations = cg_iterations
        self.cg_tol = float(cg_tol)
        self.physics = physics
        self.mode = "cg"
        if method == "auto":
            self.mode = self._closed_form(physics)
            if self.mode != "cg" and not self._self_check(physics):
                warnings.warn(
                    f"Newton: the {self.mode!r} closed form does not match A_adjoint(A(·)) for "
                    f"{type(physics).__name__}; falling back to conjugate gradients",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.mode = "cg"

    # Construction ----------------------------------------------------------------------------
    def _closed_form(self, physics) -> str:
        from deepinv.physics import Downsampling

        from d2gp.tasks.mri import CartesianMRI
        from d2gp.tasks.spc import HadamardSPC

        C, H, W = self.shape
        device = _physics_device(physics)
        if isinstance(physics, HadamardSPC) and physics.patterns == "pm1":
            if (H, W) != (physics.size, physics.size):
                raise TaskError(f"Newton: shape {self.shape} does not match the {physics.size}×{physics.size} SPC")
            mask = torch.zeros(H * W, dtype=torch.float64, device=device)
            mask[physics.rows.to(device)] = 1.0
            self.register_buffer("inverse", (1.0 / (mask + self.delta)).reshape(H, W))
            return "projector"
        if isinstance(physics, HadamardSPC) and physics.patterns == "binary":
            if (H, W) != (physics.size, physics.size):
                raise TaskError(f"Newton: shape {self.shape} does not match the {physics.size}×{physics.size} SPC")
            self._build_binary(physics, device)
            return "binary"
        if isinstance(physics, CartesianMRI):
            if (H, W) != (physics.size, physics.size):
                raise TaskError(f"Newton: shape {self.shape} does not match the {physics.size}×{physics.size} MRI")
            mask = torch.zeros(W, dtype=torch.float64, device=device)
            mask[physics.columns.to(device)] = 1.0  # unshifted FFT layout, as A uses it
            symmetric = 0.5 * (mask + mask[(-torch.arange(W, device=device)) % W])
            self.register_buffer("inverse", 1.0 / (symmetric[: W // 2 + 1] + self.delta))  # rfft bins
            return "fourier"
        if (
            isinstance(physics, Downsampling)
            and physics.padding == "circular"
            and isinstance(physics.factor, int)
            and H % physics.factor == 0
            and W % physics.factor == 0
        ):
            self._build_woodbury(physics)
            return "woodbury"
        return "cg"

    def _build_binary(self, physics, device: torch.device) -> None:
        # In the Hadamard domain c = Hx, A c = (s/2)(S c + c_0 1_m): AᵀA = (s²/4)(D + u e₀ᵀ + e₀ uᵀ + m e₀e₀ᵀ),
        # D = diag(u), u the indicator of the measured rows. Woodbury with Λ = (s²/4)D + δI, U = [u, e₀]
        # and C = (s²/4)[[0, 1], [1, m]]: (Λ + UCUᵀ)⁻¹ = Λ⁻¹ − Λ⁻¹U (C⁻¹ + UᵀΛ⁻¹U)⁻¹ UᵀΛ⁻¹.
        n, quarter = physics.size ** 2, physics.size ** 2 / 4.0
        u = torch.zeros(n, dtype=torch.float64, device=device)
        u[physics.rows.to(device)] = 1.0
        lam_inv = 1.0 / (quarter * u + self.delta)
        U = torch.zeros(n, 2, dtype=torch.float64, device=device)
        U[:, 0], U[0, 1] = u, 1.0
        C = quarter * torch.tensor([[0.0, 1.0], [1.0, float(physics.m)]], dtype=torch.float64, device=device)
        lam_inv_U = lam_inv[:, None] * U
        self.register_buffer("inverse", lam_inv)  # Λ⁻¹, (n,)
        self.register_buffer("rows", u)  # u, (n,)
        self.register_buffer("lowrank", lam_inv_U)  # Λ⁻¹U, (n, 2)
        self.register_buffer("capacitance", torch.linalg.inv(torch.linalg.inv(C) + U.T @ lam_inv_U))  # (2, 2)

    def _build_woodbury(self, physics) -> None:
        C, H, W = self.shape
        d = int(physics.factor)
        filt = getattr(physics, "filter", None)
        dtype = filt.dtype if isinstance(filt, torch.Tensor) else torch.float64
        device = _physics_device(physics)
        # The circular kernel h from A itself: A e_{p,q} = (h[d i − p, d j − q])_{i,j}.
        impulses = torch.zeros(d * d, C, H, W, dtype=dtype, device=device)
        for p in range(d):
            for q in range(d):
                impulses[p * d + q, :, p, q] = 1.0
        with torch.no_grad():
            samples = physics.A(impulses).double()  # (d², C, H/d, W/d)
        kernel = torch.zeros(C, H, W, dtype=torch.float64, device=device)
        rows = torch.arange(H // d, device=device) * d
        cols = torch.arange(W // d, device=device) * d
        for p in range(d):
            for q in range(d):
                r = (rows - p) % H
                c = (cols - q) % W
                kernel[:, r[:, None], c[None, :]] = samples[p * d + q]
        spectrum = torch.fft.fft2(kernel)  # ĥ, (C, H, W)
        power = spectrum.abs().pow(2).reshape(C, d, H // d, d, W // d).sum((1, 3))
        self.factor = d
        # Stored as real pairs: ``Module.to(float32)`` would drop the imaginary part of a complex buffer.
        self.register_buffer("spectrum", torch.view_as_real(spectrum).contiguous())  # (C, H, W, 2)
        self.register_buffer("denominator", d * d * self.delta + power)  # d²δ + ‖w‖² per alias class

    def _self_check(self, physics) -> bool:
        """Does the closed form invert AᵀA + δI as the operator applies it?"""
        filt = getattr(physics, "filter", None)
        dtype = filt.dtype if isinstance(filt, torch.Tensor) else torch.float64
        generator = torch.Generator().manual_seed(0)
        v = torch.randn((2, *self.shape), generator=generator, dtype=torch.float64)
        v = v.to(device=_physics_device(physics), dtype=dtype)
        with torch.no_grad():
            w = _normal(physics, v) + self.delta * v
            back = self._solve(w)
        error = float((back - v).norm() / v.norm())
        scale = 1.0 if dtype == torch.float64 else 1.0 + 1.0 / self.delta  # float32 round-off, amplified
        return error <= _SELF_CHECK_TOL * scale

    # Application -----------------------------------------------------------------------------
    def _solve(self, g: torch.Tensor) -> torch.Tensor:
        if self.mode == "projector":
            from d2gp.tasks.spc import fwht2

            return fwht2(fwht2(g) * self.inverse.to(g.dtype))
        if self.mode == "binary":
            from d2gp.tasks.spc import fwht2

            c = fwht2(g.double()).flatten(-2)  # (B, C, n)
            t = c * self.inverse
            w = torch.stack([(t * self.rows).sum(-1), t[..., 0]], dim=-1)  # Uᵀ Λ⁻¹ c
            out = t - (w @ self.capacitance.T) @ self.lowrank.T
            return fwht2(out.reshape(g.shape)).to(g.dtype)
        if self.mode == "fourier":
            spectrum = torch.fft.rfft(g, dim=-1) * self.inverse.to(g.dtype)
            return torch.fft.irfft(spectrum, n=g.shape[-1], dim=-1)
        if self.mode == "woodbury":
            d = self.factor
            G = torch.fft.fft2(g.double())
            B, C, H, W = G.shape
            spectrum = torch.view_as_complex(self.spectrum.double())
            aliased = (spectrum * G).reshape(B, C, d, H // d, d, W // d).sum((2, 4))
            correction = (aliased / self.denominator).repeat(1, 1, d, d)
            out = (G - spectrum.conj() * correction) / self.delta
            return torch.fft.ifft2(out).real.to(g.dtype)
        return conjugate_gradient(self.physics, g, self.delta, self.cg_iterations, self.cg_tol)

    def forward(self, grad: torch.Tensor, k=None, iterate=None) -> torch.Tensor:
        """``(AᵀA + δI)⁻¹ grad``, same shape and dtype; ``k`` and ``iterate`` are ignored."""
        if grad.dim() != 4 or tuple(grad.shape[1:]) != self.shape:
            raise ValueError(f"Newton expects gradients of shape (B, {', '.join(map(str, self.shape))}), got {tuple(grad.shape)}")
        return self._solve(grad)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, delta={self.delta:g}, shape={self.shape}"


# Polynomial preconditioners ---------------------------------------------------------------------
def _check_degree(degree: int) -> int:
    if not isinstance(degree, (int, np.integer)) or isinstance(degree, bool) or degree < 0:
        raise ValueError(f"degree must be an integer ≥ 0, got {degree!r}")
    return int(degree)


def l2_coefficients(degree: int = 4) -> torch.Tensor:
    r"""Coefficients of the :math:`p` of degree ``degree`` minimising :math:`\int_0^1 (1 − λp(λ))^2 dλ`.

    With :math:`p(λ) = \sum_j c_j λ^j` the normal equations are
    :math:`\sum_j c_j/(i + j + 3) = 1/(i + 2)`, :math:`i = 0 … d` (a Hilbert-type matrix),
    solved exactly in rational arithmetic and rounded to float64.

    :return: float64 tensor ``(c_0, …, c_d)``.
    """
    d = _check_degree(degree)
    n = d + 1
    matrix = [[Fraction(1, i + j + 3) for j in range(n)] + [Fraction(1, i + 2)] for i in range(n)]
    for col in range(n):  # Gauss–Jordan (the matrix is positive definite: no pivoting needed)
        pivot = matrix[col][col]
        matrix[col] = [v / pivot for v in matrix[col]]
        for row in range(n):
            if row != col and matrix[row][col] != 0:
                factor = matrix[row][col]
                matrix[row] = [a - factor * b for a, b in zip(matrix[row], matrix[col])]
    return torch.tensor([float(matrix[i][n]) for i in range(n)], dtype=torch.float64)


def chebyshev_coefficients(degree: int = 4, lower: float = 0.01) -> torch.Tensor:
    r"""Coefficients of the :math:`p` of degree ``degree`` minimising :math:`\max_{λ∈[\ell,1]} |1 − λp(λ)|`.

    :math:`1 − λp(λ) = T_{d+1}(t(λ)) / T_{d+1}(t(0))` with :math:`t(λ) = (1 + \ell − 2λ)/(1 − \ell)`,
    expanded to monomials in float64; the maximum is :math:`1/T_{d+1}((1+\ell)/(1−\ell))`.

    :param lower: :math:`\ell ∈ (0, 1)`, the lower end of the spectrum to damp (of ``AᵀA/‖AᵀA‖``).
    :return: float64 tensor ``(c_0, …, c_d)``.
    """
    d = _check_degree(degree)
    lower = float(lower)
    if not 0 < lower < 1:
        raise ValueError(f"lower must be in (0, 1), got {lower}")
    P = np.polynomial.Polynomial
    chebyshev = P(np.polynomial.chebyshev.cheb2poly([0] * (d + 1) + [1]))  # T_{d+1}(t), monomials in t
    residual = chebyshev(P([(1 + lower) / (1 - lower), -2 / (1 - lower)]))  # in λ
    residual = residual.coef / residual.coef[0]  # r(0) = 1
    coefficients = -residual[1:]  # 1 − λ p(λ) = r(λ)  ⇒  c_j = −r_{j+1}
    return torch.tensor(np.pad(coefficients, (0, d + 1 - coefficients.size)), dtype=torch.float64)


def ifista_coefficients(degree: int = 4, alpha: float = 1.0) -> torch.Tensor:
    r"""iFISTA's truncated Neumann series :math:`p(λ) = α \sum_{i=0}^{d} (1 − αλ)^i` in monomials.

    Since :math:`1 − λp(λ) = (1 − αλ)^{d+1}`, :math:`c_j = \binom{d+1}{j+1} (−1)^j α^{j+1}`.

    :param alpha: α > 0 (1 for the operator normalised by ``‖AᵀA‖``).
    :return: float64 tensor ``(c_0, …, c_d)``.
    """
    d = _check_degree(degree)
    alpha = float(alpha)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    return torch.tensor(
        [math.comb(d + 1, j + 1) * (-1) ** j * alpha ** (j + 1) for j in range(d + 1)], dtype=torch.float64
    )


class Polynomial(nn.Module):
    r"""Polynomial preconditioner :math:`P = p(A^\top A / L) = \sum_{i=0}^{d} c_i (A^\top A/L)^i`.

    Applied by Horner's rule, :math:`p(B) g = c_0 g + B(c_1 g + B(c_2 g + …))`,
    :math:`B = A^\top A / L`: ``d`` calls of ``A`` and ``A_adjoint``, in the gradient's dtype.
    Only buffers (the coefficients); the operator is kept as a submodule.

    :param physics: the linear operator ``A``.
    :param coefficients: :math:`c_0, …, c_d` (monomial order), at least one.
    :param norm: :math:`L > 0`, normally ``‖AᵀA‖`` (:func:`d2gp.tasks.base.power_norm`).

    :Example:

    >>> import torch
    >>> from d2gp.tasks.spc import HadamardSPC, hadamard_rows
    >>> A = HadamardSPC(8, hadamard_rows(8, 16))
    >>> P = Polynomial(A, [1.0, 0.0, 0.0], norm=1.0)
    >>> g = torch.randn(2, 1, 8, 8)
    >>> torch.equal(P(g, 0), g)
    True
    """

    uses_iterate = False

    def __init__(self, physics, coefficients: Union[Sequence[float], torch.Tensor, np.ndarray], norm: float):
        super().__init__()
        if isinstance(coefficients, torch.Tensor):
            coefficients = coefficients.detach().to("cpu", torch.float64).reshape(-1)
        else:
            coefficients = torch.as_tensor(np.asarray(coefficients, dtype=np.float64).reshape(-1))
        if coefficients.numel() < 1:
            raise ValueError("a polynomial preconditioner needs at least one coefficient (c_0)")
        if not bool(torch.isfinite(coefficients).all()):
            raise ValueError(f"coefficients must be finite, got {coefficients.tolist()}")
        norm = float(norm)
        if not (norm > 0 and math.isfinite(norm)):
            raise ValueError(f"norm must be a finite number > 0 (‖AᵀA‖), got {norm}")
        self.physics = physics
        self.norm = norm
        self.register_buffer("coefficients", coefficients)
        self._values = coefficients.tolist()  # python floats: no device sync in forward

    @property
    def degree(self) -> int:
        return len(self._values) - 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._values = self.coefficients.tolist()

    @classmethod
    def from_choice(
        cls,
        physics,
        shape: Sequence[int],
        choice: str = "l2",
        degree: int = 4,
        lower: float = 0.01,
        alpha: float = 1.0,
        norm: Optional[float] = None,
    ) -> "Polynomial":
        """A polynomial preconditioner with the coefficients of ``choice``.

        :param physics: the linear operator ``A``.
        :param shape: the image shape ``(C, H, W)`` (for the power method).
        :param choice: ``"l2"``, ``"chebyshev"`` or ``"ifista"`` (see the coefficient functions).
        :param degree: d ≥ 0.
        :param lower: ℓ ∈ (0, 1) for ``"chebyshev"``.
        :param alpha: α > 0 for ``"ifista"``.
        :param norm: ``‖AᵀA‖``; default by the power method (:func:`d2gp.tasks.base.power_norm`).
        """
        if choice not in COEFFICIENT_CHOICES:
            raise ValueError(f"unknown coefficient choice {choice!r}; choose one of {', '.join(COEFFICIENT_CHOICES)}")
        if choice == "l2":
            coefficients = l2_coefficients(degree)
        elif choice == "chebyshev":
            coefficients = chebyshev_coefficients(degree, lower)
        else:
            coefficients = ifista_coefficients(degree, alpha)
        if norm is None:
            norm = power_norm(physics, _check_shape(shape))
        module = cls(physics, coefficients, norm)
        module.choice = choice
        return module

    def forward(self, grad: torch.Tensor, k=None, iterate=None) -> torch.Tensor:
        """``p(AᵀA/L) grad``, same shape and dtype; ``k`` and ``iterate`` are ignored."""
        values = self._values
        out = values[-1] * grad
        scale = 1.0 / self.norm
        for c in reversed(values[:-1]):
            out = c * grad + scale * _normal(self.physics, out)
        return out

    def extra_repr(self) -> str:
        return f"degree={self.degree}, norm={self.norm:g}, coefficients={[round(c, 6) for c in self._values]}"

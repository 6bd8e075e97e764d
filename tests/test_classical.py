"""Classical preconditioners: Newton (closed forms vs CG) and polynomial (coefficients vs their closed forms)."""

import math

import numpy as np
import pytest
import torch
from deepinv.physics import LinearPhysics

from d2gp.preconditioners.classical import (
    Newton,
    Polynomial,
    chebyshev_coefficients,
    conjugate_gradient,
    ifista_coefficients,
    l2_coefficients,
)
from d2gp.solver import pnp_fista, pnp_hqs, solve
from d2gp.tasks.base import TaskError
from d2gp.tasks.mri import CartesianMRI, gaussian_column_order
from d2gp.tasks.spc import HadamardSPC, hadamard_rows
from d2gp.tasks.sr import make_downsampling

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _dense(matrix: torch.Tensor, shape=(1, 4, 4)) -> LinearPhysics:
    """A LinearPhysics applying ``matrix`` (m, n) to flattened images of ``shape``, dtype-preserving."""

    def A(x, **kwargs):
        return (x.reshape(len(x), -1).to(matrix.dtype) @ matrix.T).to(x.dtype)

    def A_adjoint(y, **kwargs):
        return (y.to(matrix.dtype) @ matrix).reshape(len(y), *shape).to(y.dtype)

    return LinearPhysics(A=A, A_adjoint=A_adjoint)


def _random_matrix(m=24, n=16, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _operators():
    """name → (physics, image shape, expected Newton mode), small, float64 where the operator allows."""
    return {
        "spc": (HadamardSPC(8, hadamard_rows(8, 20), channels=2), (2, 8, 8), "projector"),
        # columns (centred) 8, 9, 12, 5, 3: ±1 and ±4 are symmetric, 3 alone (M_sym ∈ {0, ½, 1})
        "mri": (CartesianMRI(16, [8, 9, 12, 5, 3], channels=2), (2, 16, 16), "fourier"),
        "mri-odd": (CartesianMRI(15, gaussian_column_order(15)[:4]), (1, 15, 15), "fourier"),
        "sr-x2": (make_downsampling((3, 16, 16), 2).double(), (3, 16, 16), "woodbury"),
        "sr-x4": (make_downsampling((1, 16, 16), 4).double(), (1, 16, 16), "woodbury"),
        "spc-binary": (HadamardSPC(8, hadamard_rows(8, 20), channels=2, patterns="binary"), (2, 8, 8), "binary"),
        "dense": (_dense(_random_matrix(10, 16)), (1, 4, 4), "cg"),
    }


def _randn(*shape, seed=1, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _normal(physics, v):
    return physics.A_adjoint(physics.A(v))


# Newton -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dense", "spc", "mri", "sr"])
def test_newton_one_step_solves_least_squares(name):
    """Well-posed problem, δ → 0: x_1 = x_0 − P∇f(x_0) is the least-squares solution."""
    if name == "dense":
        M = _random_matrix(24, 16)
        physics, shape = _dense(M), (1, 4, 4)
    elif name == "spc":  # ratio 1: A = H
        physics, shape = HadamardSPC(8, hadamard_rows(8, 64)), (1, 8, 8)
    elif name == "mri":  # acceleration 1: A = F
        physics, shape = CartesianMRI(8, np.arange(8), channels=2), (2, 8, 8)
    else:  # factor 1, invertible circular blur
        physics = make_downsampling((1, 8, 8), 1, blur_sigma=0.4).double()
        shape = (1, 8, 8)
    P = Newton(physics, 1e-10, shape, cg_iterations=100, cg_tol=1e-14)
    x0 = _randn(3, *shape, seed=2)
    y = physics.A(_randn(3, *shape, seed=3)) + 0.1 * _randn(*physics.A(x0).shape, seed=4)
    x1 = x0 - P(_normal(physics, x0) - physics.A_adjoint(y))
    if name == "dense":
        solution = torch.linalg.lstsq(M, y.T).solution.T.reshape(3, *shape)
    else:  # A is injective and AᵀA invertible: the normal equations
        solution = Newton(physics, 1e-12, shape, method="cg", cg_iterations=200, cg_tol=1e-15)(physics.A_adjoint(y))
    assert torch.allclose(x1, solution, atol=1e-5, rtol=0)
    # Through the solvers: identity denoiser, γ = 1, one iteration from x_0 (FISTA's first step is PGD's).
    for algorithm in ("fista", "pgd"):
        out = solve(algorithm, physics, y, lambda v: v, step_size=1.0, iterations=1, preconditioner=P, x0=x0)
        assert torch.allclose(out.double(), solution, atol=1e-5, rtol=0), algorithm  # the solver works in float32


@pytest.mark.parametrize("name", ["dense", "spc"])
@pytest.mark.parametrize("delta,inner_steps", [(0.5, 1), (1.0, 40)])
def test_newton_hqs_solves_the_quadratic_sub_problem(name, delta, inner_steps):
    """PnP-HQS's data step, Newton-preconditioned (γ = 1): exact in one inner step when δ = 1/(2γ), and
    converging to the closed form prox_2γf(x_0) = (AᵀA + I/(2γ))⁻¹(Aᵀy + x_0/(2γ)) with enough inner steps otherwise."""
    if name == "dense":
        M = _random_matrix(10, 16)
        physics, shape = _dense(M), (1, 4, 4)
    else:  # a ±1 single-pixel camera: AᵀA a projector
        physics, shape = HadamardSPC(8, hadamard_rows(8, 20)), (1, 8, 8)
    n = math.prod(shape)
    matrix = physics.A(torch.eye(n, dtype=F64).reshape(n, *shape)).reshape(n, -1).T  # A as an (m, n) matrix
    P = Newton(physics, delta, shape, method="cg", cg_iterations=100, cg_tol=1e-14)
    x0 = _randn(3, *shape, seed=2)
    y = physics.A(_randn(3, *shape, seed=3))
    gamma = 1.0
    rhs = (physics.A_adjoint(y) + x0 / (2 * gamma)).reshape(3, n)
    solution = torch.linalg.solve(matrix.T @ matrix + torch.eye(n, dtype=F64) / (2 * gamma), rhs.T).T.reshape(3, *shape)
    out = pnp_hqs(physics, y, lambda v: v, gamma, iterations=1, preconditioner=P, x0=x0, inner_steps=inner_steps)
    assert torch.allclose(out.double(), solution, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["spc", "mri", "mri-odd", "sr-x2", "sr-x4", "spc-binary", "dense"])
@pytest.mark.parametrize("delta", [0.05, 1.0])
def test_newton_closed_forms_match_cg_and_invert(name, delta):
    physics, shape, mode = _operators()[name]
    P = Newton(physics, delta, shape)
    assert P.mode == mode
    cg = Newton(physics, delta, shape, method="cg", cg_iterations=300, cg_tol=1e-13)
    assert cg.mode == "cg"
    g = _randn(3, *shape, seed=5)
    assert torch.allclose(P(g, 0), cg(g, 0), atol=1e-5 * float(g.abs().max()) / delta, rtol=0)
    v = _randn(3, *shape, seed=6)
    b = _normal(physics, v) + delta * v
    # closed forms are exact; CG stops at ‖r‖ ≤ cg_tol·‖b‖, i.e. an error up to cg_tol·‖b‖/δ
    atol = P.cg_tol * float(b.flatten(1).norm(dim=1).max()) / delta if P.mode == "cg" else 1e-8
    assert torch.allclose(P(b), v, atol=atol, rtol=0)


def test_newton_mri_uses_the_symmetrised_mask():
    physics, shape, _ = _operators()["mri"]
    P = Newton(physics, 0.1, shape)
    values = sorted(set(np.round((1.0 / P.inverse.numpy() - 0.1), 12).tolist()))
    assert set(values) <= {0.0, 0.5, 1.0} and 0.5 in values


def test_newton_float32_sr_closed_form_and_default_cg():
    """The default float32 SR operator (woodbury in float64 inside) against float32 CG."""
    physics = make_downsampling((3, 16, 16), 4)
    P = Newton(physics, 0.1, (3, 16, 16))
    assert P.mode == "woodbury"
    g = _randn(2, 3, 16, 16, seed=7, dtype=torch.float32)
    out = P(g)
    assert out.dtype == torch.float32
    reference = Newton(physics, 0.1, (3, 16, 16), method="cg")(g)
    assert torch.allclose(out, reference, atol=1e-4, rtol=0)
    assert torch.allclose(P.float()(g), out, atol=1e-5, rtol=0)  # buffers survive a dtype cast


def test_newton_spc_is_a_step_rescaling_on_the_range():
    physics, shape, _ = _operators()["spc"]
    delta = 0.3
    P = Newton(physics, delta, shape)
    g = physics.A_adjoint(_randn(4, 2, physics.m, seed=8))
    assert torch.allclose(P(g), g / (1 + delta), atol=1e-12)
    outside = _randn(4, *shape, seed=9)
    outside = outside - _normal(physics, outside)  # the null space of A
    assert torch.allclose(P(outside), outside / delta, atol=1e-10)


def test_newton_falls_back_to_cg_when_a_closed_form_does_not_match():
    class Twice(CartesianMRI):
        def A(self, x, **kwargs):
            return 2 * super().A(x, **kwargs)

        def A_adjoint(self, y, **kwargs):
            return 2 * super().A_adjoint(y, **kwargs)

    physics = Twice(8, [3, 4, 5])
    with pytest.warns(RuntimeWarning, match="falling back"):
        P = Newton(physics, 0.1, (1, 8, 8))
    assert P.mode == "cg"
    v = _randn(2, 1, 8, 8, seed=10)
    assert torch.allclose(P(_normal(physics, v) + 0.1 * v), v, atol=1e-6)


def test_conjugate_gradient_per_image_and_zero_rhs():
    physics, shape, _ = _operators()["dense"]
    g = _randn(3, *shape, seed=11)
    g[1] = 0
    g[2] *= 1e3  # very different scales: each image stops on its own residual
    p = conjugate_gradient(physics, g, 0.5, iterations=200, tol=1e-13)
    assert torch.equal(p[1], torch.zeros_like(p[1]))
    assert torch.allclose(_normal(physics, p) + 0.5 * p, g, atol=1e-9 * 1e3)


@pytest.mark.parametrize("name", ["spc", "mri", "sr-x2", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes(name, dtype):
    physics, shape, _ = _operators()[name]
    if name.startswith("sr") and dtype == torch.float32:
        physics = make_downsampling(shape, 2)
    g = _randn(2, *shape, seed=12, dtype=dtype)
    for P in (Newton(physics, 0.1, shape), Polynomial(physics, l2_coefficients(3), norm=1.0)):
        if dtype == torch.float32:
            P = P.float()  # nn.Module casts keep the buffers usable
        out = P(g, 3)
        assert out.shape == g.shape and out.dtype == dtype
        assert P.uses_iterate is False
        assert not list(P.parameters())


def test_newton_bad_input():
    physics, shape, _ = _operators()["spc"]
    for delta in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="delta"):
            Newton(physics, delta, shape)
    with pytest.raises(ValueError, match="method"):
        Newton(physics, 0.1, shape, method="fourier")
    with pytest.raises(ValueError, match="shape"):
        Newton(physics, 0.1, (8, 8))
    with pytest.raises(TaskError, match="does not match"):
        Newton(physics, 0.1, (2, 16, 16))
    with pytest.raises(ValueError, match="cg_iterations"):
        Newton(physics, 0.1, shape, cg_iterations=0)
    with pytest.raises(ValueError, match="gradients of shape"):
        Newton(physics, 0.1, shape)(torch.zeros(1, 1, 8, 8))


# Coefficients -----------------------------------------------------------------------------------
def _residual(coefficients) -> np.polynomial.Polynomial:
    """r(λ) = 1 − λ p(λ)."""
    P = np.polynomial.Polynomial
    return P([1.0]) - P([0.0, 1.0]) * P(np.asarray(coefficients))


@pytest.mark.parametrize("degree", [0, 1, 4, 7])
def test_l2_coefficients_solve_the_normal_equations(degree):
    c = l2_coefficients(degree)
    assert c.dtype == F64 and c.shape == (degree + 1,)
    r = _residual(c.numpy())
    for i in range(degree + 1):  # r ⟂ λ^{i+1} in L²(0, 1), integrated exactly
        moment = (r * np.polynomial.Polynomial([0] * (i + 1) + [1])).integ()
        assert abs(moment(1.0) - moment(0.0)) < 1e-10
    # Same as a least-squares fit with an exact quadrature (Gauss–Legendre on [0, 1]).
    nodes, weights = np.polynomial.legendre.leggauss(2 * degree + 4)
    lam, w = (nodes + 1) / 2, weights / 2
    design = np.sqrt(w)[:, None] * lam[:, None] ** np.arange(1, degree + 2)
    fit = np.linalg.lstsq(design, np.sqrt(w), rcond=None)[0]
    assert np.allclose(c.numpy(), fit, rtol=1e-6, atol=1e-6)
    if degree == 0:
        assert math.isclose(float(c[0]), 1.5)  # ∫(1 − cλ)² minimal at c = (1/2)/(1/3)


@pytest.mark.parametrize("degree", [0, 2, 4])
@pytest.mark.parametrize("lower", [0.02, 0.3])
def test_chebyshev_coefficients_equioscillate(degree, lower):
    c = chebyshev_coefficients(degree, lower)
    assert c.dtype == F64 and c.shape == (degree + 1,)
    r = _residual(c.numpy())
    bound = 1.0 / math.cosh((degree + 1) * math.acosh((1 + lower) / (1 - lower)))
    grid = np.linspace(lower, 1.0, 20001)
    assert abs(np.abs(r(grid)).max() - bound) < 1e-9
    # d + 2 alternation points: the extrema of T_{d+1} mapped to [lower, 1].
    extrema = ((1 + lower) - (1 - lower) * np.cos(np.arange(degree + 2) * np.pi / (degree + 1))) / 2
    values = r(extrema)
    assert np.allclose(np.abs(values), bound, rtol=1e-9)
    assert np.all(np.sign(values[:-1]) == -np.sign(values[1:]))
    assert math.isclose(r(0.0), 1.0)


@pytest.mark.parametrize("degree", [0, 1, 4])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_ifista_coefficients_are_the_neumann_series(degree, alpha):
    c = ifista_coefficients(degree, alpha)
    assert c.dtype == F64 and c.shape == (degree + 1,)
    grid = np.linspace(0, 1, 101)
    p = np.polynomial.Polynomial(c.numpy())
    neumann = alpha * sum((1 - alpha * grid) ** i for i in range(degree + 1))
    assert np.allclose(p(grid), neumann, atol=1e-12)
    assert np.allclose(_residual(c.numpy())(grid), (1 - alpha * grid) ** (degree + 1), atol=1e-12)


def test_coefficient_bad_input():
    for degree in (-1, 1.5, "4", True):
        for function in (l2_coefficients, chebyshev_coefficients, ifista_coefficients):
            with pytest.raises(ValueError, match="degree"):
                function(degree)
    for lower in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match="lower"):
            chebyshev_coefficients(3, lower)
    with pytest.raises(ValueError, match="alpha"):
        ifista_coefficients(3, 0.0)


# Polynomial -------------------------------------------------------------------------------------
def test_polynomial_identity():
    physics, shape, _ = _operators()["mri"]
    g = _randn(2, *shape, seed=13)
    assert torch.equal(Polynomial(physics, [1.0, 0.0, 0.0, 0.0], norm=1.0)(g, 5), g)
    assert torch.equal(Polynomial(physics, [2.5], norm=3.0)(g), 2.5 * g)


@pytest.mark.parametrize("choice", ["l2", "chebyshev", "ifista"])
def test_polynomial_horner_equals_explicit_sum(choice):
    M = _random_matrix(10, 16, seed=14)
    physics, shape = _dense(M), (1, 4, 4)
    P = Polynomial.from_choice(physics, shape, choice, degree=4, lower=0.05)
    L = float(torch.linalg.matrix_norm(M, ord=2) ** 2)
    assert math.isclose(P.norm, L, rel_tol=1e-5)
    B = M.T @ M / P.norm
    c = P.coefficients
    explicit = sum(c[i] * torch.linalg.matrix_power(B, i) for i in range(len(c)))
    eigenvalues, vectors = torch.linalg.eigh(B)  # p(B) = V p(Λ) Vᵀ
    spectral = vectors @ torch.diag(torch.as_tensor(np.polynomial.Polynomial(c.numpy())(eigenvalues.numpy()))) @ vectors.T
    assert torch.allclose(explicit, spectral, atol=1e-10)
    g = _randn(3, *shape, seed=15)
    out = P(g, 0)
    assert torch.allclose(out.reshape(3, -1), g.reshape(3, -1) @ explicit.T, atol=1e-10)


def test_polynomial_from_choice_and_bad_input():
    physics, shape, _ = _operators()["spc"]
    P = Polynomial.from_choice(physics, shape, "chebyshev", degree=3, lower=0.1)
    assert P.degree == 3 and P.choice == "chebyshev" and math.isclose(P.norm, 1.0, rel_tol=1e-5)
    assert torch.equal(P.coefficients, chebyshev_coefficients(3, 0.1))
    assert torch.equal(Polynomial.from_choice(physics, shape, "ifista", degree=2, alpha=0.5, norm=1.0).coefficients,
                       ifista_coefficients(2, 0.5))
    with pytest.raises(ValueError, match="choice"):
        Polynomial.from_choice(physics, shape, "legendre", norm=1.0)
    with pytest.raises(ValueError, match="lower"):
        Polynomial.from_choice(physics, shape, "chebyshev", lower=1.0, norm=1.0)
    with pytest.raises(ValueError, match="degree"):
        Polynomial.from_choice(physics, shape, "l2", degree=-1, norm=1.0)
    with pytest.raises(ValueError, match="norm"):
        Polynomial(physics, [1.0], norm=0.0)
    with pytest.raises(ValueError, match="at least one"):
        Polynomial(physics, [], norm=1.0)
    # state_dict round trip updates the coefficients used by forward
    Q = Polynomial(physics, [0.0, 0.0, 0.0, 0.0], norm=1.0)
    Q.load_state_dict(P.state_dict(), strict=False)
    g = _randn(1, *shape, seed=16)
    assert torch.allclose(Q(g), P(g))


def test_polynomial_in_the_solver_batches_with_channels():
    physics, shape, _ = _operators()["spc"]
    P = Polynomial.from_choice(physics, shape, "l2", degree=2, norm=1.0)
    x = torch.rand(3, *shape)
    out = pnp_fista(physics, physics.A(x), lambda v: v.clamp(0, 1), step_size=0.5, iterations=3, preconditioner=P)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()

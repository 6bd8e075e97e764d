"""Learned linear preconditioners (Ehrhardt et al.): identity at init, counts, k ≥ K, gradients, loss."""

import math

import numpy as np
import pytest
import torch

from d2gp.preconditioners.learned_linear import (
    DEFAULT_MAX_PARAMETERS, LINEAR_PRECONDITIONERS, Convolutional, FullLinear, Pointwise, ScalarStep,
    build_linear, fidelity_decrease_loss, objective_loss,
)
from d2gp.solver import fidelity, pnp_fista
from d2gp.tasks import make_task

KINDS = list(LINEAR_PRECONDITIONERS)
#: (kind, options): every parametrisation, the convolution with both paddings.
VARIANTS = [("scalar", {}), ("pointwise", {}), ("convolutional", {}),
            ("convolutional", {"padding": "circular", "kernel_size": 3}), ("full", {})]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spc():
    return make_task("spc", image_size=8)


class MatrixPhysics:
    """y = G vec(x): a dense Gaussian operator on (C, H, W) images (only A and A_adjoint)."""

    def __init__(self, shape, m, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.shape = tuple(shape)
        self.G = torch.randn(m, math.prod(shape), generator=generator) / math.sqrt(m)
        self.step_size = 1.0 / float(torch.linalg.matrix_norm(self.G.double(), 2)) ** 2

    def A(self, x):
        return x.flatten(1) @ self.G.T

    def A_adjoint(self, y):
        return (y @ self.G).reshape(-1, *self.shape)


class DiagonalPhysics:
    """A = diag(s) on (C, H, W) images: f(x) = ½‖s ⊙ x − y‖²."""

    def __init__(self, s):
        self.s = s

    def A(self, x):
        return self.s * x

    def A_adjoint(self, y):
        return self.s * y


def smooth(v):
    """A differentiable, non-trivial 'denoiser'."""
    return v + 0.05 * torch.tanh(v)


def perturbed(kind, channels, size, iterations, seed=0, **options):
    """A module whose parameters differ from the identity and from one iteration to the next."""
    torch.manual_seed(seed)
    P = build_linear(kind, channels, size, iterations, **options)
    with torch.no_grad():
        for p in P.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return P


@pytest.mark.parametrize("kind,options", VARIANTS)
@pytest.mark.parametrize("channels,size", [(1, 8), (3, (8, 6))])
def test_identity_at_initialisation(kind, options, channels, size):
    K = 3
    P = build_linear(kind, channels, size, K, **options)
    assert P.kind == kind and P.iterations == K and P.uses_iterate is False
    H, W = (size, size) if isinstance(size, int) else size
    g = torch.randn(2, channels, H, W) * 37.0
    for k in (0, 1, K - 1, K, 2 * K, 100):
        out = P(g, k)
        assert out.shape == g.shape and out.dtype == g.dtype
        assert torch.equal(out, g)
    assert torch.equal(P(g.double(), 1), g.double())


@pytest.mark.parametrize("kind,options", VARIANTS)
def test_init_reproduces_plain_fista_spc(spc, kind, options):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    y = spc.student.A(x)
    K = 3
    kw = dict(denoiser=lambda v: v.clamp(0, 1), step_size=spc.student_step_size, iterations=2 * K, trace=True)
    P = build_linear(kind, 1, 8, K, **options)
    with torch.no_grad():
        plain, plain_trace = pnp_fista(spc.student, y, **kw)
        pre, trace = pnp_fista(spc.student, y, preconditioner=P, **kw)
    assert torch.equal(plain, pre)
    for a, b in zip(plain_trace.x, trace.x):
        assert torch.equal(a, b)
    for g, pg in zip(trace.grad, trace.preconditioned):
        assert torch.equal(g, pg)


@pytest.mark.parametrize("kind,options", VARIANTS)
def test_init_reproduces_plain_fista_rgb(kind, options):
    shape = (3, 8, 6)
    physics = MatrixPhysics(shape, m=40)
    torch.manual_seed(1)
    y = physics.A(torch.rand(2, *shape))
    kw = dict(denoiser=lambda v: v.clamp(0, 1), step_size=physics.step_size, iterations=6)
    with torch.no_grad():
        plain = pnp_fista(physics, y, **kw)
        pre = pnp_fista(physics, y, preconditioner=build_linear(kind, 3, (8, 6), 3, **options), **kw)
    assert torch.equal(plain, pre)


def test_full_constrained_to_a_diagonal_equals_pointwise():
    torch.manual_seed(2)
    C, H, W, K = 2, 8, 4, 3
    d = 0.5 + torch.rand(C, H, W)
    pointwise = Pointwise(C, (H, W), K)
    with torch.no_grad():
        pointwise.diagonal.copy_(d.expand(K, -1, -1, -1))
    dense = FullLinear.from_diagonal(d)
    constrained = FullLinear.from_diagonal(d, diagonal_only=True)
    with torch.no_grad():  # off-diagonal entries are ignored by the constraint
        constrained.matrix.add_(torch.randn_like(constrained.matrix) * (1 - torch.eye(C * H * W)))
    assert dense.num_parameters() == constrained.num_parameters() == (C * H * W) ** 2
    g = torch.randn(5, C, H, W)
    for k in (0, 2, 7):
        expected = pointwise(g, k)
        assert torch.equal(dense(g, k), expected)
        assert torch.equal(constrained(g, k), expected)

    physics = MatrixPhysics((C, H, W), m=30, seed=3)
    y = physics.A(torch.rand(2, C, H, W))
    kw = dict(denoiser=lambda v: v.clamp(0, 1), step_size=physics.step_size, iterations=2 * K)
    with torch.no_grad():
        reference = pnp_fista(physics, y, preconditioner=pointwise, **kw)
        assert torch.equal(pnp_fista(physics, y, preconditioner=dense, **kw), reference)
        assert torch.equal(pnp_fista(physics, y, preconditioner=constrained, **kw), reference)

    constrained(g, 0).square().sum().backward()  # the constraint: no gradient off the diagonal
    off = constrained.matrix.grad * (1 - torch.eye(C * H * W))
    assert torch.count_nonzero(off) == 0 and torch.count_nonzero(constrained.matrix.grad.diagonal()) > 0


@pytest.mark.parametrize("channels,size", [(1, 8), (3, (8, 6))])
def test_parameter_counts(channels, size):
    K = 4
    H, W = (size, size) if isinstance(size, int) else size
    n = channels * H * W
    expected = {"scalar": K, "pointwise": K * n, "convolutional": K * channels * 25, "full": n * n}
    for kind, count in expected.items():
        P = build_linear(kind, channels, size, K)
        assert P.num_parameters() == sum(p.numel() for p in P.parameters()) == count
        assert type(P).parameter_count(channels, size, K) == count
        assert P.num_parameters(trainable_only=True) == count
    assert Convolutional(channels, size, K, kernel_size=3).num_parameters() == K * channels * 9
    assert Convolutional.parameter_count(channels, size, K, kernel_size=7) == K * channels * 49
    assert len(Convolutional(channels, size, K).state_dict()) == 1  # the delta buffer is not saved


@pytest.mark.parametrize("kind,options", VARIANTS)
def test_iterations_beyond_K_use_the_last_parameters(kind, options):
    K = 3
    P = perturbed(kind, 2, 8, K, **options)
    g = torch.randn(2, 2, 8, 8)
    last = P(g, K - 1)
    for k in (K, K + 1, 2 * K, 1000, torch.tensor(K + 2)):
        assert torch.equal(P(g, k), last)
    assert P.index(5) == K - 1 and P.index(1) == 1 and P.index(None) == 0 and P.index(np.int64(1)) == 1
    if kind != "full":  # per-iteration parameters: iteration 0 differs from the last one
        assert not torch.allclose(P(g, 0), last)
    else:  # one matrix for all iterations
        assert torch.equal(P(g, 0), last)


@pytest.mark.parametrize("kind,options", VARIANTS)
def test_gradients_flow_through_pnp_fista(kind, options):
    shape = (1, 8, 8)
    physics = MatrixPhysics(shape, m=24, seed=4)
    torch.manual_seed(5)
    x = torch.rand(2, *shape)
    y = physics.A(x)
    K = 3
    P = build_linear(kind, 1, 8, K, **options)
    out, trace = pnp_fista(physics, y, smooth, physics.step_size, iterations=K, preconditioner=P, trace=True)
    loss = objective_loss(physics, trace, y, ground_truth=x)
    loss.backward()
    for p in P.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
        if kind == "full":
            assert torch.count_nonzero(p.grad) > 0
        else:  # every learned iteration gets a gradient
            for k in range(K):
                assert torch.count_nonzero(p.grad[k]) > 0, f"no gradient for iteration {k}"


@pytest.mark.parametrize("kind", KINDS)
def test_bad_gradient_shapes(kind):
    P = build_linear(kind, 1, 8, 2)
    with pytest.raises(ValueError, match=r"expects grad of shape \(B, 1, .*got \(1, 8, 8\)"):
        P(torch.zeros(1, 8, 8), 0)
    with pytest.raises(ValueError, match=r"got \(2, 3, 8, 8\)"):
        P(torch.zeros(2, 3, 8, 8), 0)
    other = torch.zeros(2, 1, 16, 12)
    if kind in ("pointwise", "full"):  # built for 8×8 images only
        with pytest.raises(ValueError, match=r"expects grad of shape \(B, 1, 8, 8\), got \(2, 1, 16, 12\)"):
            P(other, 0)
    else:  # scalar and convolution: any image size
        assert P(other, 0).shape == other.shape
    g = torch.zeros(2, 1, 8, 8)
    for k in (-1, 1.5, True, torch.tensor([0, 1]), torch.tensor(0.5)):
        with pytest.raises(ValueError, match="k must be"):
            P(g, k)


def test_build_linear_and_validation():
    assert set(LINEAR_PRECONDITIONERS) == {"scalar", "pointwise", "convolutional", "full"}
    for kind, cls in LINEAR_PRECONDITIONERS.items():
        P = build_linear(kind, 3, (8, 6), 2)
        assert type(P) is cls and P.kind == kind
        Q = build_linear(P.kind, **P.config)  # rebuild from the configuration
        Q.load_state_dict(perturbed(kind, 3, (8, 6), 2).state_dict())
    with pytest.raises(ValueError, match="unknown linear preconditioner 'diagonal'.*scalar, pointwise"):
        build_linear("diagonal", 1, 8, 2)
    with pytest.raises(ValueError, match="'scalar' has no option kernel_size"):
        build_linear("scalar", 1, 8, 2, kernel_size=3)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        Convolutional(1, 8, 2, kernel_size=4)
    with pytest.raises(ValueError, match="padding must be"):
        Convolutional(1, 8, 2, padding="reflect")
    with pytest.raises(ValueError, match="circular padding"):
        Convolutional(1, 8, 2, kernel_size=7, padding="circular")(torch.zeros(1, 1, 2, 5), 0)
    assert Convolutional(1, 8, 2, kernel_size=7, padding="circular")(torch.ones(1, 1, 3, 3), 0).shape == (1, 1, 3, 3)
    for bad in (dict(channels=0), dict(iterations=0), dict(image_size=(8,)), dict(image_size=(8, 0)),
                dict(iterations=2.0)):
        args = {**dict(channels=1, image_size=8, iterations=2), **bad}
        with pytest.raises(ValueError):
            Pointwise(**args)


def test_full_linear_memory_and_limit():
    n = 3 * 64 * 64
    assert n == 12288
    assert FullLinear.parameter_count(3, 64, 1) == n * n == 150_994_944 <= DEFAULT_MAX_PARAMETERS
    assert FullLinear.memory_bytes(3, 64) == n * n * 4 == 603_979_776
    assert FullLinear.memory_bytes(3, 64, copies=4) == 4 * 603_979_776
    assert FullLinear.memory_bytes(3, (64, 64), dtype=torch.float64) == 2 * 603_979_776
    with pytest.raises(ValueError, match=r"\(1, 8, 8\) images .* n = 64: 4,096 parameters .*max_parameters=1,000"):
        FullLinear(1, 8, 1, max_parameters=1000)
    with pytest.raises(ValueError, match="n = 16384: 268,435,456 parameters"):
        FullLinear(1, 128, 1)  # refused before allocating 1 GB
    assert FullLinear(1, 8, 1, max_parameters=None).num_parameters() == 4096


def test_linear_maps_match_their_definitions():
    torch.manual_seed(6)
    g = torch.randn(3, 2, 8, 6)
    full = perturbed("full", 2, (8, 6), 1)
    assert torch.allclose(full(g, 0), (g.flatten(1) @ full.matrix.T).reshape(g.shape), atol=1e-5)
    assert torch.allclose(full.as_matrix(0), full.matrix.double())
    for padding in ("zeros", "circular"):
        conv = perturbed("convolutional", 2, (8, 6), 2, padding=padding, kernel_size=5)
        w = conv.weight[1]
        padded = torch.nn.functional.pad(g, (2, 2, 2, 2), mode="circular" if padding == "circular" else "constant")
        expected = torch.nn.functional.conv2d(padded, w, groups=2)
        assert torch.allclose(conv(g, 1), expected, atol=1e-5)
        M = conv.as_matrix(1)  # linear: the matrix reproduces the map
        assert torch.allclose((g.double().flatten(1) @ M.T).reshape(g.shape).float(), conv(g, 1), atol=1e-5)
    scalar = perturbed("scalar", 2, 8, 3)
    assert isinstance(scalar, ScalarStep) and torch.equal(scalar(g, 2), scalar.alpha[2] * g)


def test_objective_loss_values():
    assert fidelity_decrease_loss is objective_loss
    torch.manual_seed(7)
    C, H, W = 1, 4, 4
    s = torch.linspace(0.2, 1.0, C * H * W).reshape(C, H, W)
    physics = DiagonalPhysics(s)
    x = torch.rand(2, C, H, W)
    y = physics.A(x)
    x0 = torch.zeros_like(x)
    # iterates that do not move: exactly the starting value, 1 (+ λ for the distance term)
    assert objective_loss(physics, [x0, x0], y, x0=x0).item() == pytest.approx(1.0, abs=1e-6)
    assert objective_loss(physics, [x0], y, x0=x0, ground_truth=x, distance_weight=0.5).item() == pytest.approx(1.5)
    # iterates at the solution: zero
    assert objective_loss(physics, [x, x, x], y, x0=x0, ground_truth=x).item() == 0.0
    # weights pick iterations
    half = 0.5 * x
    f = (fidelity(physics, half, y) / fidelity(physics, x0, y)).mean()
    assert objective_loss(physics, [half, x], y, weights=[1.0, 0.0], x0=x0).item() == pytest.approx(f.item())
    # a Newton-like diagonal (d = 1/s², γ = 1) solves the diagonal problem in one step: loss ≈ 0
    P = Pointwise(C, (H, W), 2)
    with torch.no_grad():
        P.diagonal.copy_((1 / s**2).expand(2, -1, -1, -1))
    _, trace = pnp_fista(physics, y, lambda v: v, 1.0, iterations=2, preconditioner=P, trace=True)
    assert objective_loss(physics, trace, y).item() < 1e-10
    # the trace form equals the explicit one (x_0 = z_0)
    _, trace = pnp_fista(physics, y, lambda v: v, 1.0, iterations=3, trace=True)
    manual = sum((fidelity(physics, xk, y) / fidelity(physics, trace.z[0], y)).mean() for xk in trace.x) / 3
    assert objective_loss(physics, trace, y).item() == pytest.approx(manual.item(), rel=1e-6)
    assert 0 < manual.item() < 1  # plain steps decrease f


def test_objective_loss_errors():
    physics = DiagonalPhysics(torch.ones(1, 4, 4))
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="at least one iterate"):
        objective_loss(physics, [], x, x0=x)
    with pytest.raises(ValueError, match="pass x0"):
        objective_loss(physics, [x], x)
    with pytest.raises(ValueError, match="2 iterations, got 3 weights"):
        objective_loss(physics, [x, x], x, weights=[1, 1, 1], x0=x)
    with pytest.raises(ValueError, match="≥ 0"):
        objective_loss(physics, [x, x], x, weights=[1, -1], x0=x)
    with pytest.raises(ValueError, match=r"iterate 1 has shape \(2, 1, 4\)"):
        objective_loss(physics, [x[..., 0]], x, x0=x)


@pytest.mark.parametrize("kind", KINDS)
def test_training_on_the_objective_decreases_it(kind):
    """A few Adam steps on the objective-decrease loss lower it (an ill-conditioned diagonal toy)."""
    torch.manual_seed(8)
    C, H, W = 1, 6, 6
    s = torch.linspace(0.15, 1.0, C * H * W)[torch.randperm(C * H * W)].reshape(C, H, W)
    physics = DiagonalPhysics(s)
    y = physics.A(torch.rand(4, C, H, W))
    P = build_linear(kind, C, (H, W), 3)
    optimiser = torch.optim.Adam(P.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        _, trace = pnp_fista(physics, y, lambda v: v, 1.0, iterations=3, preconditioner=P, trace=True)
        loss = objective_loss(physics, trace, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]

"""Preconditioned PnP-FISTA: exact agreement with an independent loop, gradients, checkpointing."""

import math

import pytest
import torch

from d2gp.solver import HQS_INNER_STEPS, fidelity, pnp_fista, pnp_hqs, pnp_pgd, solve
from d2gp.tasks import make_task


class TinyDenoiser(torch.nn.Module):
    """A small fixed nonlinear map (residual conv + tanh), deterministic."""

    def __init__(self, channels=1):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.1)

    def forward(self, x):
        return x + 0.1 * torch.tanh(self.conv(x))


class ScaledPreconditioner(torch.nn.Module):
    """P(g, k) = (1 + a_k) g with learnable a (zero: the identity)."""

    def __init__(self, iterations):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(iterations))

    def forward(self, grad, k):
        return (1 + self.a[k]) * torch.tanh(grad)


def reference_fista(A, At, y, D, gamma, K):
    """Plain PnP-FISTA written out independently of d2gp.solver."""
    x_prev = gamma * At(y)
    z = x_prev.clone()
    t = 1.0
    for _ in range(K):
        x = D(z - gamma * At(A(z) - y))
        t_next = (1 + math.sqrt(1 + 4 * t**2)) / 2
        z = x + (t - 1) / t_next * (x - x_prev)
        x_prev, t = x, t_next
    return x_prev


@pytest.mark.parametrize("name", ["spc", "mri", "sr"])
def test_identity_matches_independent_fista(name):
    task = make_task(name)
    x = torch.rand((3, *task.image_shape), generator=torch.Generator().manual_seed(0))
    y, _ = task.measure(x, seed=0)
    D = TinyDenoiser(task.image_shape[0])
    gamma = task.student_step_size
    with torch.no_grad():
        ours = pnp_fista(task.student, y, D, gamma, iterations=15)
        ref = reference_fista(task.student.A, task.student.A_adjoint, y, D, gamma, 15)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_trace_records_every_iteration():
    task = make_task("spc")
    x = torch.rand(2, 1, 32, 32)
    y, _ = task.measure(x, seed=0)
    D = TinyDenoiser()
    with torch.no_grad():
        out, trace = pnp_fista(task.student, y, D, 1.0, iterations=5, trace=True)
    assert len(trace.x) == len(trace.z) == len(trace.grad) == len(trace.preconditioned) == len(trace.fidelity) == 5
    torch.testing.assert_close(trace.x[-1], out)
    torch.testing.assert_close(trace.z[0], task.student.A_adjoint(y))  # z_0 = x_0 = γAᵀy, γ = 1
    for k in range(5):
        torch.testing.assert_close(trace.grad[k], task.student.A_adjoint(task.student.A(trace.z[k]) - y))
        torch.testing.assert_close(trace.fidelity[k], fidelity(task.student, trace.z[k], y))
        torch.testing.assert_close(trace.preconditioned[k], trace.grad[k])  # identity


def test_zero_iterations_returns_initial_estimate():
    task = make_task("spc")
    y, _ = task.measure(torch.rand(1, 1, 32, 32), seed=0)
    out = pnp_fista(task.student, y, TinyDenoiser(), 0.5, iterations=0)
    torch.testing.assert_close(out, 0.5 * task.student.A_adjoint(y))


def _grads(checkpoint):
    task = make_task("spc")
    x = torch.rand((2, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    y, _ = task.measure(x, seed=0)
    P = ScaledPreconditioner(6)
    with torch.no_grad():
        P.a.copy_(torch.linspace(-0.2, 0.3, 6))
    D = TinyDenoiser()
    out = pnp_fista(task.student, y, D, 1.0, iterations=6, preconditioner=P, checkpoint=checkpoint)
    loss = (out - x).pow(2).mean()
    loss.backward()
    return P.a.grad.clone(), D.conv.weight.grad.clone(), loss.item()


def test_gradients_flow_and_checkpointing_matches():
    ga, gw, loss = _grads(checkpoint=False)
    ga_c, gw_c, loss_c = _grads(checkpoint=True)
    assert torch.all(ga != 0), "every iteration's parameter must receive a gradient"
    assert loss == pytest.approx(loss_c, rel=1e-6)
    torch.testing.assert_close(ga, ga_c, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(gw, gw_c, rtol=1e-5, atol=1e-9)


def test_preconditioner_with_iterate():
    seen = []

    def P(grad, k, iterate):
        seen.append((k, iterate.shape))
        return grad

    P.uses_iterate = True
    task = make_task("spc")
    y, _ = task.measure(torch.rand(1, 1, 32, 32), seed=0)
    with torch.no_grad():
        plain = pnp_fista(task.student, y, TinyDenoiser(), 1.0, iterations=3)
        out = pnp_fista(task.student, y, TinyDenoiser(), 1.0, iterations=3, preconditioner=P)
    assert [k for k, _ in seen] == [0, 1, 2]
    torch.testing.assert_close(out, plain)


def test_bf16_autocast_close_to_fp32():
    task = make_task("sr")
    x = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    y, _ = task.measure(x, seed=0)
    D = TinyDenoiser(3)
    with torch.no_grad():
        ref = pnp_fista(task.student, y, D, task.student_step_size, iterations=5)
        low = pnp_fista(task.student, y, D, task.student_step_size, iterations=5, autocast=True)
    assert low.dtype == torch.float32
    assert float((low - ref).abs().max()) < 0.05


@pytest.mark.parametrize("kwargs,message", [({"iterations": -1}, "iterations"), ({"step_size": 0.0}, "step_size"),
                                            ({"step_size": float("nan")}, "step_size")])
def test_bad_arguments(kwargs, message):
    task = make_task("spc")
    y, _ = task.measure(torch.rand(1, 1, 32, 32), seed=0)
    args = {"iterations": 2, "step_size": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        pnp_fista(task.student, y, TinyDenoiser(), args["step_size"], args["iterations"])


# --- the safeguard ---------------------------------------------------------------------------------
def _spc_problem():
    from d2gp.tasks import make_task

    task = make_task("spc", image_size=16)
    torch.manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(3, 1, 20, 20), 5, stride=1)
    return task, task.student.A(x)


def test_safeguard_leaves_a_well_behaved_preconditioner_alone():
    task, y = _spc_problem()
    kw = dict(denoiser=lambda v: 0.9 * v.clamp(0, 1), step_size=task.student_step_size, iterations=12)
    with torch.no_grad():
        plain = pnp_fista(task.student, y, preconditioner=lambda g, k: 1.2 * g, **kw)
        guarded, trace = pnp_fista(task.student, y, preconditioner=lambda g, k: 1.2 * g, safeguard=10.0, trace=True, **kw)
    torch.testing.assert_close(guarded, plain, rtol=1e-5, atol=1e-6)
    assert all(bool(a.all()) for a in trace.active)


def test_safeguard_rejects_a_blow_up_and_continues_as_plain_fista():
    """P explodes from k = 6 on: that step is rejected, and the rest is plain PnP-FISTA from x_6."""
    task, y = _spc_problem()
    den = lambda v: 0.9 * v.clamp(0, 1)  # noqa: E731
    gamma, K = task.student_step_size, 12
    explode = lambda g, k: g if k < 6 else 1e3 * g  # noqa: E731
    with torch.no_grad():
        guarded, trace = pnp_fista(task.student, y, den, gamma, K, explode, safeguard=2.0, trace=True)
        first, _ = pnp_fista(task.student, y, den, gamma, 6, explode, trace=True)
        rest = pnp_fista(task.student, y, den, gamma, K - 7, None, x0=first)  # iteration 6 was rejected
        unguarded = pnp_fista(task.student, y, den, gamma, K, explode)
    assert [bool(a.any()) for a in trace.active] == [True] * 6 + [False] * 6
    torch.testing.assert_close(trace.x[6], first)  # the rejected step left x where it was
    torch.testing.assert_close(guarded, rest, rtol=1e-5, atol=1e-6)
    assert (unguarded - guarded).abs().max() > 0.1


def test_safeguard_needs_rho_at_least_one():
    task, y = _spc_problem()
    with pytest.raises(ValueError, match="safeguard"):
        pnp_fista(task.student, y, torch.tanh, 1.0, 2, lambda g, k: g, safeguard=0.5)


def _speed_restart_loop(physics, y, den, gamma, K, P):
    """An independent loop of PnP-FISTA with O'Donoghue & Candès's speed restart, one image at a time."""
    outs = []
    for i in range(len(y)):
        yi = y[i:i + 1]
        x = gamma * physics.A_adjoint(yi)
        z, t, last, restarts = x, 1.0, math.inf, []
        for k in range(K):
            x_new = den(z - gamma * P(physics.A_adjoint(physics.A(z) - yi), k))
            r = float((x_new - x).norm())
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            if r > last:
                restarts.append(k)
                z, t = x_new, 1.0
            else:
                z, t = x_new + ((t - 1) / t_new) * (x_new - x), t_new
            x, last = x_new, r
        outs.append((x, restarts))
    return torch.cat([o for o, _ in outs]), [r for _, r in outs]


def test_restart_matches_an_independent_loop_and_resets_where_steps_grow():
    """γ = 1.8/L with momentum oscillates: restart resets it where a step grows, per image."""
    task, y = _spc_problem()
    den = lambda v: 0.9 * v.clamp(0, 1)  # noqa: E731
    gamma, K = 1.8 * task.student_step_size, 15
    P = lambda g, k: g  # noqa: E731
    with torch.no_grad():
        restarted = pnp_fista(task.student, y, den, gamma, K, P, restart=True)
        plain = pnp_fista(task.student, y, den, gamma, K, P)
        expected, restarts = _speed_restart_loop(task.student, y, den, gamma, K, P)
    torch.testing.assert_close(restarted, expected, rtol=1e-5, atol=1e-6)
    assert all(restarts) and (restarted - plain).abs().max() > 1e-3  # it did restart, and that changed x_K


def test_restart_leaves_shrinking_steps_alone():
    """A contraction (identity denoiser scaled by ½, small γ): every step is shorter than the last, no restart."""
    task, y = _spc_problem()
    den = lambda v: 0.5 * v  # noqa: E731
    with torch.no_grad():
        _, restarts = _speed_restart_loop(task.student, y, den, 0.5 * task.student_step_size, 10, lambda g, k: g)
        restarted = pnp_fista(task.student, y, den, 0.5 * task.student_step_size, 10, restart=True)
        plain = pnp_fista(task.student, y, den, 0.5 * task.student_step_size, 10)
    assert restarts == [[]] * len(y)
    torch.testing.assert_close(restarted, plain, rtol=1e-6, atol=1e-7)


def test_restart_with_the_safeguard_and_under_autograd():
    task, y = _spc_problem()
    scale = torch.tensor(1.0, requires_grad=True)
    out = pnp_fista(task.student, y, lambda v: 0.9 * v.clamp(0, 1), 1.5 * task.student_step_size, 8,
                    lambda g, k: scale * g, safeguard=2.0, restart=True)
    out.sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


# --- the host algorithms: pgd and hqs beside fista ----------------------------------------------------
def reference_pgd(A, At, y, D, gamma, K, P=lambda g, k: g):
    """Preconditioned PnP-PGD written out: x_{k+1} = D(x_k − γ P(∇f(x_k), k))."""
    x = gamma * At(y)
    for k in range(K):
        x = D(x - gamma * P(At(A(x) - y), k))
    return x


def reference_hqs(A, At, y, D, gamma, K, J, P=lambda g, k: g):
    """PnP-HQS whose data step is J preconditioned gradient steps of step γ on ½‖Au − y‖² + ‖u − x_k‖²/(4γ)."""
    x = gamma * At(y)
    for k in range(K):
        u = x
        for _ in range(J):
            u = u - gamma * P(At(A(u) - y) + (u - x) / (2 * gamma), k)
        x = D(u)
    return x


@pytest.mark.parametrize("name", ["spc", "mri"])
def test_pgd_and_hqs_match_independent_loops(name):
    task = make_task(name)
    x = torch.rand((2, *task.image_shape), generator=torch.Generator().manual_seed(0))
    y, _ = task.measure(x, seed=0)
    D, A, At = TinyDenoiser(task.image_shape[0]), task.student.A, task.student.A_adjoint
    gamma = task.student_step_size
    P = lambda g, k: (1 + 0.1 * k) * torch.tanh(g)  # noqa: E731  (nonlinear, depends on k)
    with torch.no_grad():
        torch.testing.assert_close(solve("pgd", task.student, y, D, gamma, 8), reference_pgd(A, At, y, D, gamma, 8),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(solve("pgd", task.student, y, D, gamma, 5, P), reference_pgd(A, At, y, D, gamma, 5, P),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(solve("hqs", task.student, y, D, gamma, 5, P),
                                   reference_hqs(A, At, y, D, gamma, 5, HQS_INNER_STEPS, P), atol=1e-6, rtol=0)
        torch.testing.assert_close(pnp_hqs(task.student, y, D, 0.5 * gamma, 4, inner_steps=5),
                                   reference_hqs(A, At, y, D, 0.5 * gamma, 4, 5), atol=1e-6, rtol=0)
        # one inner step from x_k, where the proximal term vanishes, is PnP-PGD
        assert torch.equal(pnp_hqs(task.student, y, D, gamma, 5, P, inner_steps=1), pnp_pgd(task.student, y, D, gamma, 5, P))


def test_fista_through_solve_is_pnp_fista_bit_for_bit():
    task, y = _spc_problem()
    den = lambda v: 0.9 * v.clamp(0, 1)  # noqa: E731
    P = lambda g, k: (1.0 + 0.05 * k) * g  # noqa: E731
    gamma = 1.5 * task.student_step_size
    for options in ({}, {"restart": True}, {"safeguard": 2.0}, {"safeguard": 2.0, "restart": True}):
        with torch.no_grad():
            ours, trace = solve("fista", task.student, y, den, gamma, 10, P, trace=True, **options)
            theirs, reference = pnp_fista(task.student, y, den, gamma, 10, P, trace=True, **options)
        assert torch.equal(ours, theirs), options
        for name in ("x", "z", "grad", "preconditioned", "fidelity", "active"):
            assert all(torch.equal(a, b) for a, b in zip(getattr(trace, name), getattr(reference, name))), name


@pytest.mark.parametrize("algorithm", ["pgd", "hqs"])
def test_host_traces_record_the_first_gradient_of_each_iteration(algorithm):
    task = make_task("spc")
    y, _ = task.measure(torch.rand(2, 1, 32, 32), seed=0)
    P = lambda g, k: 0.8 * g  # noqa: E731
    with torch.no_grad():
        out, trace = solve(algorithm, task.student, y, TinyDenoiser(), 1.0, 4, P, trace=True)
    assert len(trace.x) == len(trace.z) == len(trace.grad) == len(trace.preconditioned) == len(trace.fidelity) == 4
    torch.testing.assert_close(trace.x[-1], out)
    torch.testing.assert_close(trace.z[0], task.student.A_adjoint(y))  # x_0 = γAᵀy
    for k in range(4):
        if k:
            assert torch.equal(trace.z[k], trace.x[k - 1])  # no momentum: z_k = x_k
        torch.testing.assert_close(trace.grad[k], task.student.A_adjoint(task.student.A(trace.z[k]) - y))
        torch.testing.assert_close(trace.preconditioned[k], 0.8 * trace.grad[k])
        torch.testing.assert_close(trace.fidelity[k], fidelity(task.student, trace.z[k], y))


def _host_grads(algorithm, checkpoint):
    task = make_task("spc", image_size=16)
    x = torch.rand((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    y, _ = task.measure(x, seed=0)
    P = ScaledPreconditioner(4)
    with torch.no_grad():
        P.a.copy_(torch.linspace(-0.2, 0.3, 4))
    D = TinyDenoiser()
    out = solve(algorithm, task.student, y, D, 0.5, 4, P, checkpoint=checkpoint)
    loss = (out - x).pow(2).mean()
    loss.backward()
    return P.a.grad.clone(), D.conv.weight.grad.clone(), loss.item()


@pytest.mark.parametrize("algorithm", ["fista", "pgd", "hqs"])
def test_gradients_flow_through_every_host_and_checkpointing_matches(algorithm):
    ga, gw, loss = _host_grads(algorithm, checkpoint=False)
    ga_c, gw_c, loss_c = _host_grads(algorithm, checkpoint=True)
    assert torch.all(ga != 0) and torch.all(torch.isfinite(gw))
    assert loss == pytest.approx(loss_c, rel=1e-6)
    torch.testing.assert_close(ga, ga_c, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(gw, gw_c, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("algorithm", ["pgd", "hqs"])
def test_truncated_backpropagation_in_every_host(algorithm):
    task = make_task("spc", image_size=16)
    y, _ = task.measure(torch.rand(2, 1, 16, 16), seed=0)
    scales = torch.nn.Parameter(torch.ones(4))
    solve(algorithm, task.student, y, torch.tanh, 0.5, 4, lambda g, k: scales[k] * g, grad_from=2).sum().backward()
    assert torch.all(scales.grad[:2] == 0) and torch.all(scales.grad[2:] != 0)


@pytest.mark.parametrize("algorithm", ["pgd", "hqs"])
def test_safeguard_in_pgd_and_hqs_rejects_a_blow_up_and_continues_plain(algorithm):
    """P explodes from k = 6 on: that step is rejected, and the rest is the plain host from x_6."""
    task, y = _spc_problem()
    den = lambda v: 0.9 * v.clamp(0, 1)  # noqa: E731
    gamma, K = 0.5 * task.student_step_size, 12
    explode = lambda g, k: g if k < 6 else 1e3 * g  # noqa: E731
    with torch.no_grad():
        guarded, trace = solve(algorithm, task.student, y, den, gamma, K, explode, safeguard=2.0, trace=True)
        first = solve(algorithm, task.student, y, den, gamma, 6, explode)
        rest = solve(algorithm, task.student, y, den, gamma, K - 7, None, x0=first)
        unguarded = solve(algorithm, task.student, y, den, gamma, K, explode)
        calm, calm_trace = solve(algorithm, task.student, y, den, gamma, K, lambda g, k: 1.1 * g, safeguard=10.0,
                                 trace=True)
    assert [bool(a.any()) for a in trace.active] == [True] * 6 + [False] * 6
    torch.testing.assert_close(trace.x[6], first)
    torch.testing.assert_close(guarded, rest, rtol=1e-5, atol=1e-6)
    assert (unguarded - guarded).abs().max() > 0.1
    assert all(bool(a.all()) for a in calm_trace.active)
    torch.testing.assert_close(calm, solve(algorithm, task.student, y, den, gamma, K, lambda g, k: 1.1 * g))


def test_bad_algorithm_restart_and_inner_steps_are_refused():
    task, y = _spc_problem()
    with pytest.raises(ValueError, match="unknown algorithm 'admm'; choose one of fista, pgd, hqs"):
        solve("admm", task.student, y, torch.tanh, 1.0, 2)
    for algorithm in ("pgd", "hqs"):
        with pytest.raises(ValueError, match=f"restart.*{algorithm} has no momentum"):
            solve(algorithm, task.student, y, torch.tanh, 1.0, 2, restart=True)
        with pytest.raises(ValueError, match="step_size"):
            solve(algorithm, task.student, y, torch.tanh, -1.0, 2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="inner_steps"):
            pnp_hqs(task.student, y, torch.tanh, 1.0, 2, inner_steps=bad)

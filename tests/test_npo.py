"""The NPO preconditioner: identity at initialisation, scale equivariance, iteration conditioning."""

import pytest
import torch

from d2gp.preconditioners import NPO, Identity, IterationEncoding
from d2gp.preconditioners.encoding import sinusoidal_features
from d2gp.solver import pnp_fista
from d2gp.tasks import make_task


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(seed=0, **kwargs):
    """An NPO whose head is no longer zero (as after some training)."""
    torch.manual_seed(seed)
    P = NPO(**kwargs)
    with torch.no_grad():
        P.head.weight.normal_(0, 0.05)
        P.head.bias.normal_(0, 0.05)
    return P


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(16, 16), (32, 24)])
@pytest.mark.parametrize("use_iterate", [False, True])
def test_fresh_npo_is_exactly_identity(channels, size, use_iterate):
    P = NPO(channels=channels, use_iterate=use_iterate)
    g = torch.randn(2, channels, *size) * 37.0
    z = torch.rand(2, channels, *size) if use_iterate else None
    for k in (0, 1, 7, 39, 500):
        out = P(g, k, iterate=z)
        assert out.shape == g.shape and out.dtype == g.dtype
        assert torch.equal(out, g)
    assert torch.equal(P(g, torch.tensor([3, 4]), iterate=z), g)


def test_identity_module():
    g = torch.randn(2, 1, 8, 8)
    assert Identity()(g, 3) is g and Identity.uses_iterate is False


@pytest.mark.parametrize("use_iterate", [False, True])
def test_identity_npo_in_solver_matches_plain_fista(use_iterate):
    task = make_task("spc")
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    y = task.student.A(x)
    kw = dict(denoiser=lambda v: v.clamp(0, 1), step_size=task.student_step_size, iterations=4)
    with torch.no_grad():
        plain = pnp_fista(task.student, y, **kw)
        pre = pnp_fista(task.student, y, preconditioner=NPO(use_iterate=use_iterate), **kw)
    assert torch.equal(plain, pre)


def test_scale_equivariance_and_iteration_dependence():
    P = _perturbed()
    g = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = P(g, 5)
        assert not torch.allclose(out, g)
        for c in (1e4, 1e-3):
            # exact up to float rounding (an element near zero after cancellation may differ by ~1e-10·c)
            torch.testing.assert_close(P(c * g, 5), c * out, rtol=1e-4, atol=1e-6 * c * float(out.abs().max()))
        # different k, different output; same k, same output
        assert torch.equal(P(g, 5), out)
        assert (P(g, 6) - out).abs().max() > 1e-4
        # per-image k: each image gets its own iteration
        ks = torch.tensor([5, 6, 7])
        batched = P(g, ks)
        for i, k in enumerate(ks.tolist()):
            torch.testing.assert_close(batched[i:i + 1], P(g[i:i + 1], k))
        # k beyond the training horizon still works
        assert torch.isfinite(P(g, 10_000)).all()


def test_iteration_encoding_distinct():
    feats = sinusoidal_features(torch.arange(40), 128)
    assert feats.shape == (40, 128)
    assert torch.cdist(feats, feats).add(torch.eye(40) * 1e9).min() > 1e-2
    torch.manual_seed(0)
    enc = IterationEncoding(64)
    with torch.no_grad():
        e = enc(torch.arange(40))
        assert e.shape == (40, 64) and enc(3).shape == (1, 64)
        torch.testing.assert_close(enc(3)[0], e[3])
    assert torch.cdist(e, e).add(torch.eye(40) * 1e9).min() > 1e-4


def test_gradients_reach_every_parameter():
    P = _perturbed(use_iterate=True)
    g = torch.randn(2, 1, 16, 16)
    z = torch.rand(2, 1, 16, 16)
    P(g, 3, iterate=z).pow(2).sum().backward()
    for name, p in P.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 0, name


def test_parameter_count_and_config():
    P = NPO()
    n = P.num_parameters()
    assert n == sum(p.numel() for p in P.parameters())
    # fully convolutional: works on any size, the parameters do not depend on it
    for size in [(8, 8), (33, 17), (64, 64)]:
        assert P(torch.randn(1, 1, *size), 0).shape == (1, 1, *size)
    assert NPO().num_parameters() == n
    big = NPO(channels=3, kernel_size=7, activation="gelu", expansion=4, use_iterate=True, channels_last=False)
    clone = NPO(**big.config)
    assert clone.config == big.config and clone.num_parameters() == big.num_parameters()
    clone.load_state_dict(big.state_dict())
    assert all(v is None or isinstance(v, (int, str, bool)) for v in big.config.values())


def test_zero_gradient_and_errors():
    P = _perturbed()
    g = torch.zeros(2, 1, 16, 16)
    out = P(g, 0)
    assert torch.equal(out, g) and not torch.isnan(out).any()
    # a zero image next to a non-zero one
    g2 = torch.cat([torch.zeros(1, 1, 16, 16), torch.randn(1, 1, 16, 16)])
    out2 = P(g2, 0)
    assert torch.equal(out2[0], g2[0]) and torch.isfinite(out2).all()
    with pytest.raises(ValueError, match="iterate"):
        NPO(use_iterate=True)(torch.randn(1, 1, 8, 8), 0)
    with pytest.raises(ValueError):
        NPO(activation="tanh")
    with pytest.raises(ValueError):
        NPO(channels=1)(torch.randn(1, 3, 8, 8), 0)


def test_channels_last_equals_contiguous():
    torch.manual_seed(0)
    a = _perturbed(channels_last=True, channels=3)
    b = NPO(**{**a.config, "channels_last": False})
    b.load_state_dict(a.state_dict())
    g = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(g, 2), b(g, 2), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_close_to_fp32():
    P = _perturbed()
    g = torch.randn(2, 1, 16, 16) * 1e3
    with torch.no_grad():
        ref = P(g, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = P(g, 4)
    assert out.shape == g.shape and torch.isfinite(out).all()
    err = (out.float() - ref).norm() / (ref - g).norm()
    assert err < 0.1, err  # relative error on the learned correction
    # and the fresh NPO is still the exact identity under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(NPO()(g, 4).float(), g)


def test_fused_blocks_equal_the_written_maths():
    """The blocks run with LayerNorm's affine map folded into pw1 and γ into pw2: same function."""
    torch.manual_seed(0)
    P = _perturbed(width=8, blocks=2)
    with torch.no_grad():
        for block in P.blocks:
            block.gamma.normal_(0, 0.3)
            block.norm.weight.normal_(1, 0.3)
            block.norm.bias.normal_(0, 0.3)
        u = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
        emb = torch.randn(1, 8)
        for block in P.blocks:
            torch.testing.assert_close(block(u, emb), block.reference_forward(u, emb), rtol=1e-5, atol=1e-6)


def test_channels_last_weights_and_max_iteration():
    P = _perturbed()
    assert P.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert P.blocks[0].dwconv.weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 1, 16, 16)
    clamped = NPO(**{**P.config, "max_iteration": 7})
    clamped.load_state_dict(P.state_dict())
    with torch.no_grad():
        assert torch.equal(clamped(g, 3), P(g, 3))  # below the clamp: the same operator
        assert torch.equal(clamped(g, 30), P(g, 7))  # past it: the last trained one
        torch.testing.assert_close(clamped(g, torch.tensor([3, 30])), torch.cat([P(g[:1], 3), P(g[1:], 7)]))
    with pytest.raises(ValueError, match="max_iteration"):
        NPO(max_iteration=-1)


# --- the global paths (issue 11): U-Net trunk, global pooling, Fourier multiplier --------------------
GLOBAL_PATHS = [{"levels": 3}, {"global_path": True}, {"spectral_size": 16},
                {"levels": 2, "global_path": True, "spectral_size": 16}]


def _trained_like(seed=0, **kwargs):
    """An NPO with every parameter moved off its initial value (as after some training)."""
    torch.manual_seed(seed)
    P = NPO(**kwargs)
    with torch.no_grad():
        for p in P.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return P


@pytest.mark.parametrize("settings", GLOBAL_PATHS)
def test_global_paths_start_as_identity_and_keep_the_properties(settings):
    P = NPO(**settings)
    g = torch.randn(2, 1, 16, 16) * 37.0
    assert torch.equal(P(g, 0), g) and torch.equal(P(g, torch.tensor([3, 40])), g)
    P = _trained_like(**settings)
    with torch.no_grad():
        out = P(g, 5)
        assert not torch.allclose(out, g)
        torch.testing.assert_close(P(1e3 * g, 5), 1e3 * out, rtol=1e-4, atol=1e-3 * float(out.abs().max()))
        for size in [(16, 16), (21, 10), (7, 9)]:  # any size, odd ones included (pooling rounds up)
            assert P(torch.randn(1, 1, *size), 2).shape == (1, 1, *size)
    P(g, 3).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in P.parameters())
    clone = NPO(**P.config)
    clone.load_state_dict(P.state_dict())
    assert torch.equal(clone(g, 5), P(g, 5).detach())


def test_plain_npo_config_unchanged_by_the_global_paths():
    # weights files of the default NPO keep their config (no new keys), and old files load
    assert set(NPO().config) == {"channels", "width", "blocks", "kernel_size", "expansion", "activation",
                                 "time_features", "time_hidden", "use_iterate", "channels_last", "max_iteration"}
    assert NPO(levels=3).num_parameters() == NPO().num_parameters()
    assert NPO(global_path=True).num_parameters() == NPO().num_parameters() + 32 + 1
    assert NPO(spectral_size=8, spectral_iterations=4).num_parameters() == NPO().num_parameters() + 4 * 8 * 5


def test_global_pooling_path_adds_a_per_image_constant():
    P = NPO(global_path=True)
    with torch.no_grad():
        P.pooled.bias.fill_(0.5)  # the head stays zero: only the pooled path acts
    g = torch.randn(2, 1, 8, 8)
    diff = P(g, 0) - g
    s = NPO.scale(g)
    torch.testing.assert_close(diff, (0.5 * s).expand_as(g))


def test_fourier_multiplier_is_the_written_operator():
    """P(g, k) = g + F⁻¹(M_k ⊙ F g) with M_k = exp(rate·θ_k) − 1: a known multiplier on the rfft grid,
    per iteration (k past K_s − 1 uses the last), exact at the grid's size."""
    from d2gp.preconditioners.npo import SPECTRAL_RATE

    P = NPO(spectral_size=8, spectral_iterations=3)
    torch.manual_seed(1)
    with torch.no_grad():
        P.multiplier.copy_(torch.randn_like(P.multiplier) * 0.05)
    g = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    for k, index in ((0, 0), (2, 2), (9, 2)):
        gain = torch.exp(SPECTRAL_RATE * P.multiplier[index].double())
        expected = torch.fft.irfft2(torch.fft.rfft2(g, norm="ortho") * gain, s=(8, 8), norm="ortho")
        torch.testing.assert_close(P(g, k).detach(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(P.spectral_gain(k, 8, 8).detach().double()[0], gain, rtol=1e-6, atol=1e-6)
    # a constant gain c everywhere is c·g at any size (the resampled grid stays constant)
    with torch.no_grad():
        P.multiplier.fill_(torch.log(torch.tensor(3.0)).item() / SPECTRAL_RATE)
    for size in [(8, 8), (12, 20)]:
        g = torch.randn(1, 1, *size)
        torch.testing.assert_close(P(g, 1).detach(), 3 * g, rtol=1e-4, atol=1e-5)


def test_fourier_multiplier_can_hold_newton_on_mri():
    """At the image's size, the multiplier represents Newton's (AᵀA + δI)⁻¹ of a Cartesian MRI exactly."""
    from d2gp.preconditioners.classical import Newton
    from d2gp.preconditioners.npo import SPECTRAL_RATE

    task = make_task("mri", image_size=16)
    newton = Newton(task.student, 0.1, task.image_shape)
    g = torch.randn(3, 1, 16, 16)
    e = torch.zeros(1, 1, 16, 16)
    e[..., 0, 0] = 1  # Newton is a circular convolution: its kernel's rfft is the multiplier
    gain = torch.fft.rfft2(newton(e, 0), norm="backward").real
    assert gain.min() > 0
    P = NPO(spectral_size=16, spectral_iterations=1)
    with torch.no_grad():
        P.multiplier.copy_(torch.log(gain) / SPECTRAL_RATE)
        torch.testing.assert_close(P(g, 0), newton(g, 0), rtol=1e-4, atol=1e-4 * float(newton(g, 0).abs().max()))


def test_global_path_settings_are_checked():
    for bad in ({"levels": 0}, {"spectral_size": 1}, {"spectral_size": 8.0}, {"spectral_iterations": 0}):
        with pytest.raises(ValueError):
            NPO(**bad)
        with pytest.raises(ValueError):
            NPO.check_config(bad)

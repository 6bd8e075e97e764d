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

"""Larger images (issue 15, item 4): the MRI task at 128² and fastMRI-sized 320², its fast operators,
and a checkpointed unroll that gives the full unroll's gradients (the memory cure; the time and
memory themselves are benchmarks/image_size.py's)."""

import pytest
import torch

from d2gp import training
from d2gp.preconditioners.classical import Newton
from d2gp.tasks import make_task


@pytest.mark.parametrize("size", [128, 320])
def test_mri_operators_at_large_sizes_are_adjoint_and_have_newton_closed_form(size, one_thread):
    task = make_task("mri", image_size=size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 1, size, size), generator=g, dtype=torch.float64)
    y = torch.randn_like(task.student.A(x.float())).double()
    lhs = (task.student.A(x.float()).double() * y).sum()
    rhs = (x * task.student.A_adjoint(y.float()).double()).sum()
    assert float(abs(lhs - rhs) / abs(lhs)) < 1e-4
    assert Newton(task.student, 0.01, task.image_shape).mode == "fourier"


def test_checkpointed_unroll_matches_full_gradients_at_128(tiny_denoiser, one_thread):
    task = make_task("mri", image_size=128, denoiser=str(tiny_denoiser))
    x = torch.nn.functional.avg_pool2d(torch.rand((1, 1, 136, 136), generator=torch.Generator().manual_seed(1)), 9, 1)
    grads = []
    for unroll in ("full", "checkpoint"):
        config = training.TrainConfig(task="mri", task_settings={"image_size": 128, "denoiser": str(tiny_denoiser)},
                                      iterations=2, unroll=unroll, method="supervised", npo={"width": 8, "blocks": 1})
        torch.manual_seed(0)
        npo = training.build_preconditioner(config, task)
        with torch.no_grad():
            npo.head.weight.normal_(0, 1e-2)
        loss, _ = training._loss(config, task, npo, task.denoiser().requires_grad_(False), x, seed=0)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in npo.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)

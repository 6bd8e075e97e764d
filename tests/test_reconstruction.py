"""The shipped denoisers with the default tasks: the teacher is better posed (measured), and
PnP-FISTA stays stable far past K = 20. Small validation subsets keep this fast."""

import pytest
import torch

from d2gp.evaluation import evaluate_solver
from d2gp.tasks import make_task

LIMIT = {"spc": 32, "mri": 16, "sr": 8}


@pytest.fixture(scope="module", params=["spc", "mri", "sr"])
def runs(request):
    name = request.param
    task = make_task(name)
    images = task.images("val", limit=LIMIT[name])
    denoiser = task.denoiser()
    out = {}
    for role in ("student", "teacher"):
        out[role] = evaluate_solver(role, getattr(task, role), images, denoiser, getattr(task, f"{role}_step_size"),
                                    100, progress=False)
    return name, out


def mean(run, k):
    return float(run.psnr[k].mean())


def test_teacher_beats_student(runs):
    name, out = runs
    gap = mean(out["teacher"], 20) - mean(out["student"], 20)
    assert gap > 1.5, f"{name}: teacher only {gap:.2f} dB above the student at K = 20"


def test_pnp_improves_on_linear_estimate(runs):
    """The student gains clearly over γAᵀy; the teacher's γAᵀy is already good on SR (×2), so it must not lose."""
    name, out = runs
    assert mean(out["student"], 20) > mean(out["student"], 0) + 0.5, f"{name}: student K = 20 no better than γAᵀy"
    assert mean(out["teacher"], 20) > mean(out["teacher"], 0), f"{name}: teacher K = 20 worse than γAᵀy"


def test_stable_to_k100(runs):
    """The shipped denoiser keeps PnP-FISTA from diverging: PSNR at K = 100 within 1 dB of K = 20."""
    name, out = runs
    for role, run in out.items():
        drop = mean(run, 20) - mean(run, 100)
        assert drop < 1.0, f"{name} {role}: PSNR falls {drop:.2f} dB from K = 20 to K = 100"
        assert torch.isfinite(run.psnr[100]).all()

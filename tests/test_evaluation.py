"""Step-size tuning: the golden-section refinement finds the optimum between grid points."""

import math

import pytest
import torch
from deepinv.physics import LinearPhysics

from d2gp.evaluation import golden_section_max, tune_step_size


@pytest.mark.parametrize("peak", [0.3, 1.0, 1.7])
def test_golden_section_finds_the_peak_of_a_parabola(peak):
    calls = []

    def f(t):
        calls.append(t)
        return -(t - peak) ** 2

    found = golden_section_max(f, 0.0, 2.0, 20)
    assert len(calls) == 20
    assert found == pytest.approx(peak, abs=2 * 0.618 ** 19)


def test_golden_section_tries_interior_points_only():
    calls = []
    assert golden_section_max(lambda t: calls.append(t) or t, 0.0, 1.0, 2) == pytest.approx(0.618, abs=1e-3)
    assert len(calls) == 2 and all(0 < t < 1 for t in calls)
    assert golden_section_max(lambda t: calls.append(t) or t, 0.0, 1.0, 1) == 0.0 and len(calls) == 2


def test_tuning_refines_between_grid_points():
    """A = a·I, noise-free, identity denoiser, K = 1: x₁ = t(2 − t)·x with t = γa², best at γ = 1/a²."""
    a2 = 0.7
    physics = LinearPhysics(A=lambda x: math.sqrt(a2) * x, A_adjoint=lambda y: math.sqrt(a2) * y)
    images = torch.rand(3, 1, 8, 8) + 0.1
    grid_only, coarse = tune_step_size(physics, images, torch.nn.Identity(), 1.0, 1, factors=(0.5, 1.0, 2.0), refine=0)
    assert grid_only == 1.0 and set(coarse) == {"0.5", "1", "2"}
    gamma, record = tune_step_size(physics, images, torch.nn.Identity(), 1.0, 1, factors=(0.5, 1.0, 2.0), refine=10)
    assert gamma == pytest.approx(1 / a2, abs=0.02)
    assert len(record) == 3 + 10 and record[f"{gamma:.6g}"] == max(record.values())
    assert record[f"{gamma:.6g}"] > coarse["1"] + 10  # the grid's best is 0.91·x: ~20 dB; the refined ~40+ dB


def test_tuning_reuses_an_earlier_record(monkeypatch):
    import d2gp.evaluation as evaluation

    a2 = 0.7
    physics = LinearPhysics(A=lambda x: math.sqrt(a2) * x, A_adjoint=lambda y: math.sqrt(a2) * y)
    images = torch.rand(2, 1, 8, 8) + 0.1
    _, grid = tune_step_size(physics, images, torch.nn.Identity(), 1.0, 1, factors=(0.5, 1.0, 2.0), refine=0)
    calls = []
    original = evaluation.evaluate_solver
    monkeypatch.setattr(evaluation, "evaluate_solver", lambda *a, **k: calls.append(a[4]) or original(*a, **k))
    gamma, record = tune_step_size(physics, images, torch.nn.Identity(), 1.0, 1, factors=(0.5, 1.0, 2.0), refine=4,
                                   tried=grid)
    assert len(calls) == 4 and all(0.5 < step < 2.0 for step in calls)  # only the refinement ran
    assert set(grid) < set(record) and gamma == pytest.approx(1 / a2, abs=0.15)

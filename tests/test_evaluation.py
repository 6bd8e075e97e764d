"""Step-size tuning: the golden-section refinement finds the optimum between grid points."""

import math

import pytest
import torch
from deepinv.physics import LinearPhysics

from d2gp.evaluation import golden_section_max, tune_step_size


def _scaled_identity(a2: float) -> LinearPhysics:
    """A = √a2 · I, noise-free."""
    return LinearPhysics(A=lambda x: math.sqrt(a2) * x, A_adjoint=lambda y: math.sqrt(a2) * y)


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
    physics = _scaled_identity(a2)
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
    physics = _scaled_identity(a2)
    images = torch.rand(2, 1, 8, 8) + 0.1
    _, grid = tune_step_size(physics, images, torch.nn.Identity(), 1.0, 1, factors=(0.5, 1.0, 2.0), refine=0)
    calls = []
    original = evaluation.evaluate_solver
    monkeypatch.setattr(evaluation, "evaluate_solver", lambda *a, **k: calls.append(a[4]) or original(*a, **k))
    gamma, record = tune_step_size(physics, images, torch.nn.Identity(), 1.0, 1, factors=(0.5, 1.0, 2.0), refine=4,
                                   tried=grid)
    assert len(calls) == 4 and all(0.5 < step < 2.0 for step in calls)  # only the refinement ran
    assert set(grid) < set(record) and gamma == pytest.approx(1 / a2, abs=0.15)


def test_examples_are_kept_at_the_asked_iteration(tmp_path):
    from d2gp.evaluation import evaluate_solver
    from d2gp.plots import examples_figure

    physics = _scaled_identity(0.64)
    images = torch.rand(5, 1, 8, 8)
    denoiser = lambda x: 0.9 * x  # noqa: E731 - contracts, so iterates differ from one k to the next
    short = evaluate_solver("short", physics, images, denoiser, 1.0, 2, keep_examples=3, progress=False)
    long = evaluate_solver("long", physics, images, denoiser, 1.0, 4, keep_examples=3, examples_at=2, progress=False)
    assert short.examples_at == long.examples_at == 2
    torch.testing.assert_close(long.examples, short.examples)
    last = evaluate_solver("last", physics, images, denoiser, 1.0, 4, keep_examples=3, progress=False)
    assert last.examples_at == 4 and not torch.allclose(last.examples, long.examples)
    examples_figure(images, [short, long], 2, tmp_path / "ok.png", "k = 2")
    with pytest.raises(ValueError, match="kept at iteration 4, not 2"):
        examples_figure(images, [short, last], 2, tmp_path / "bad.png", "k = 2")
    with pytest.raises(ValueError, match="examples_at"):
        evaluate_solver("bad", physics, images, denoiser, 1.0, 2, keep_examples=1, examples_at=3, progress=False)


@pytest.mark.parametrize("algorithm", ["fista", "pgd", "hqs"])
def test_evaluation_and_tuning_run_the_asked_host(algorithm):
    from d2gp.evaluation import evaluate_solver, psnr
    from d2gp.solver import solve

    physics = _scaled_identity(0.64)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    D = lambda v: 0.9 * v.clamp(0, 1)  # noqa: E731
    run = evaluate_solver("r", physics, images, D, 0.8, 4, progress=False, algorithm=algorithm)
    y = physics.A(images)  # noise-free
    expected = solve(algorithm, physics, y, D, 0.8, 4)
    torch.testing.assert_close(run.psnr[4], psnr(expected, images))
    gamma, record = tune_step_size(physics, images, D, 1.0, 2, factors=(0.5, 1.0), refine=0, algorithm=algorithm)
    score = {f: float(evaluate_solver("t", physics, images, D, f, 2, noise_seed=10_000, progress=False,
                                      algorithm=algorithm).psnr[2].mean()) for f in (0.5, 1.0)}
    assert record == {"0.5": pytest.approx(score[0.5]), "1": pytest.approx(score[1.0])}


def test_evaluation_refuses_a_bad_host_or_restart_without_momentum():
    from d2gp.evaluation import evaluate_solver

    physics, images = _scaled_identity(1.0), torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown algorithm 'admm'"):
        evaluate_solver("r", physics, images, torch.nn.Identity(), 1.0, 2, progress=False, algorithm="admm")
    with pytest.raises(ValueError, match="hqs has no momentum"):
        evaluate_solver("r", physics, images, torch.nn.Identity(), 1.0, 2, progress=False, algorithm="hqs", restart=True)

"""A learned preconditioner on top of a tuned classical one (d2gp.preconditioners.refined)."""

import json

import pytest
import torch

from d2gp.checkpoints import CheckpointError
from d2gp.evaluation import evaluate_solver
from d2gp.preconditioners import NPO
from d2gp.preconditioners.classical import Newton
from d2gp.preconditioners.refined import Refined, build_base
from d2gp.solver import pnp_fista
from d2gp.tasks import make_task
from d2gp.training import TrainConfig, TrainingError, build_preconditioner, load_npo, train, tune_base
from d2gp.tuning import classical_candidates, tune_classical


@pytest.fixture(scope="module")
def binary(tiny_denoiser):
    """A 16×16 {0, 1} single-pixel camera (ill-conditioned: the image mean rides on every pattern)."""
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.rand((24, 1, 20, 20), generator=g), 5, stride=1)
    settings = {"image_size": 16, "denoiser": str(tiny_denoiser)}
    return {"settings": settings, "task": make_task("spc-binary", **settings), "train": images[:16], "val": images[16:]}


def _config(binary, **overrides):
    base = dict(task="spc-binary", task_settings=binary["settings"], iterations=3, updates=4, batch_size=8,
                train_images=16, val_images=8, npo={"width": 8, "blocks": 1}, seed=0, base="newton",
                method="supervised", lr=3e-3)
    return TrainConfig(**{**base, **overrides})


def test_refined_starts_as_its_base_at_its_tuned_step(binary):
    task = binary["task"]
    spec = {"method": "newton", "candidate": "delta=0.01·L"}
    newton = build_base(spec, task)
    assert isinstance(newton, Newton) and newton.mode == "binary"
    gamma_newton = 0.8
    P = Refined(newton, NPO(), gain=gamma_newton / task.student_step_size, base_spec=spec)
    y, _ = task.measure(binary["val"], seed=0)
    denoiser = task.denoiser()
    with torch.no_grad():
        refined = pnp_fista(task.student, y, denoiser, task.student_step_size, 5, P)
        x0 = task.student_step_size * task.student.A_adjoint(y)  # the solver's start, x_0 = γ Aᵀy
        classical = pnp_fista(task.student, y, denoiser, gamma_newton, 5, newton, x0=x0)
    torch.testing.assert_close(refined, classical, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in P.parameters()) == NPO().num_parameters()  # the base is not trained
    assert set(P.state_dict()) == {f"learned.{k}" for k in NPO().state_dict()}


def test_refined_identity_base_is_a_tuned_step(binary):
    P = Refined(None, NPO(), gain=3.0, base_spec={"method": "baseline", "candidate": "identity"})
    g = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(P(g, 1), 3.0 * g)
    with pytest.raises(ValueError, match="gain"):
        Refined(None, NPO(), gain=0.0, base_spec={})
    with pytest.raises(ValueError, match="no candidate"):
        build_base({"method": "newton", "candidate": "delta=7·L"}, binary["task"])


def test_tune_base_is_tune_classical_as_a_gain(binary):
    config = _config(binary)
    task, denoiser = binary["task"], binary["task"].denoiser()
    spec = tune_base(config, task, denoiser, binary["val"])
    _, gamma, record = tune_classical("newton", task, binary["val"], denoiser, 3)
    assert spec["candidate"] == record["chosen"] and spec["step_size"] == gamma
    assert spec["gain"] == pytest.approx(gamma / task.student_step_size)
    assert tune_base(_config(binary, base=None), task, denoiser, binary["val"]) is None
    with pytest.raises(TrainingError, match="pass the tuned base"):
        build_preconditioner(config, task)
    assert spec["candidate"] in classical_candidates("newton", task)


def test_trained_refined_run_saves_reloads_and_starts_at_newton(binary, tmp_path, capsys):
    config = _config(binary)
    task = make_task("spc-binary", **binary["settings"])
    summary = train(config, tmp_path / "run", task=task, train_images=binary["train"], val_images=binary["val"],
                    progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    spec = saved["base"]
    assert spec["method"] == "newton" and spec["gain"] > 1  # Newton's step is far above 1/L on {0, 1} SPC
    P, meta = load_npo(tmp_path / "run" / "best.pt", task)
    assert isinstance(P, Refined) and isinstance(P.base, Newton) and meta["base"]["candidate"] == spec["candidate"]
    # The untrained refined preconditioner, at the task's step: Newton at its tuned step, from x_0 = γAᵀy.
    fresh = build_preconditioner(config, task, spec).eval()
    y, _ = task.measure(binary["val"], seed=0)
    with torch.no_grad():
        start = pnp_fista(task.student, y, task.denoiser(), task.student_step_size, 3, fresh)
        newton = pnp_fista(task.student, y, task.denoiser(), spec["step_size"], 3, P.base,
                           x0=task.student_step_size * task.student.A_adjoint(y))
    torch.testing.assert_close(start, newton, rtol=1e-4, atol=1e-5)
    plain = evaluate_solver("plain", task.student, binary["val"], task.denoiser(), task.student_step_size, 3,
                            progress=False)
    assert summary["best_val_psnr"] > float(plain.psnr[3].mean()) + 3  # far above plain FISTA at γ = 1/L
    with pytest.raises(CheckpointError, match="load it with its task"):
        load_npo(tmp_path / "run" / "best.pt")
    # resume reproduces the same base and weights, reading the base back (and says so) instead of tuning it
    capsys.readouterr()
    again = train(config, tmp_path / "run", task=task, train_images=binary["train"], val_images=binary["val"],
                  progress=True, resume=True)
    assert again["best_val_psnr"] == summary["best_val_psnr"]
    said = "".join(capsys.readouterr())
    assert "first session tuned it (read back)" in said and "tuning the base" not in said
    # the run's untrained start, rebuilt from its recorded base without tuning: Newton at its tuned step
    from d2gp.training import untrained_start

    rebuilt = untrained_start(config, task, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(pnp_fista(task.student, y, task.denoiser(), task.student_step_size, 3, rebuilt), start)


def test_a_base_needs_an_unrolled_loss_and_a_known_method(binary):
    with pytest.raises(TrainingError, match="unknown base"):
        _config(binary, base="cholesky").validate()
    with pytest.raises(TrainingError, match="not 'objective'"):
        _config(binary, method="objective").validate()


def test_the_command_line_sets_the_base():
    from d2gp.cli import _train_config_from_args, build_parser

    parse = lambda *flags: _train_config_from_args(build_parser().parse_args(["train", "--task", "spc-binary", *flags]))
    assert parse().base is None and parse("--base", "newton").base == "newton"
    with pytest.raises(TrainingError, match="tune_step, not both"):
        parse("--base", "newton", "--tune-step").validate()

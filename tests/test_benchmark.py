"""`d2gp benchmark` end to end on a tiny SPC problem: every method is a real, working row."""

import json

import pytest
from d2gp.benchmark import METHODS, benchmark
from d2gp.tasks import make_task
from d2gp.training import TrainConfig, build_preconditioner


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory, tiny_denoiser):
    folder = tmp_path_factory.mktemp("bench")
    settings = {"image_size": 16, "denoiser": str(tiny_denoiser)}
    overrides = dict(train_images=8, val_images=4, epochs=1, batch_size=8, npo={"width": 8, "blocks": 1})
    result = benchmark(["spc"], list(METHODS), out=folder / "out", runs=folder / "runs", iterations=2, examples=2,
                       progress=False, task_settings=settings, limit=12, tune_images=8, early=(1, 5), converge=30,
                       **overrides)
    return {"folder": folder, "settings": settings, "overrides": overrides, "result": result}


def test_every_method_has_a_row_and_files(tiny_benchmark):
    folder, result = tiny_benchmark["folder"], tiny_benchmark["result"]
    for method in METHODS.values():
        assert f"| spc | {method.label} |" in result["table"]
    for name in ("table.md", "table.csv", "results.json"):
        assert (folder / "out" / name).is_file() and (folder / "out" / "spc" / name).is_file()
    for name in ("examples.png", "psnr_curves.png"):
        assert (folder / "out" / "spc" / name).is_file()


def test_reported_parameter_counts_are_the_modules(tiny_benchmark):
    methods = {m["method"]: m for m in tiny_benchmark["result"]["results"]["spc"]["methods"]}
    task = make_task("spc", **tiny_benchmark["settings"])
    for name, method in METHODS.items():
        if not method.learned:
            continue
        config = TrainConfig(task="spc", iterations=2, **{**tiny_benchmark["overrides"], **method.train})
        base = {"method": "baseline", "candidate": "identity", "gain": 1.0} if config.base else None  # not trained
        module = build_preconditioner(config, task, base)
        assert methods[name]["parameters"] == sum(p.numel() for p in module.parameters()), name
    n = 16 * 16
    assert methods["scalar-objective"]["parameters"] == 2
    assert methods["pointwise-supervised"]["parameters"] == 2 * n
    assert methods["convolutional-objective"]["parameters"] == 2 * 25
    assert methods["full-objective"]["parameters"] == n * n


def test_early_iterations_and_iterations_to_the_baseline_best(tiny_benchmark):
    results = json.loads((tiny_benchmark["folder"] / "out" / "spc" / "results.json").read_text())
    config, methods = results["config"], {m["method"]: m for m in results["methods"]}
    assert config["early"] == [1] and config["converge"] == 30  # 5 ≥ K = 2 is not an early iteration
    header = (tiny_benchmark["folder"] / "out" / "spc" / "table.md").read_text().splitlines()[0]
    assert "PSNR K=1 (dB) | PSNR K=2 (dB)" in header and "iterations to the baseline's best (≤ 30)" in header
    target = config["baseline_best_minus_tolerance"]
    for name, method in methods.items():
        curve, reached = method["psnr_per_iteration"], method["iterations_to_baseline_best"]
        assert len(curve) == 5 * 2 + 1, name  # every row's curve stops at 5K, the baseline's too
        if reached is not None and reached <= 10:
            assert curve[reached] >= target and all(v < target for v in curve[1:reached]), name
        else:
            assert all(v < target for v in curve[1:]), name
    assert methods["baseline"]["iterations_to_baseline_best"] is not None  # it reaches its own best


def test_tuning_is_recorded_on_validation(tiny_benchmark):
    results = json.loads((tiny_benchmark["folder"] / "out" / "spc" / "results.json").read_text())
    methods = {m["method"]: m for m in results["methods"]}
    newton = methods["newton"]["tuning_or_runs"]
    assert newton["chosen"].startswith("delta=") and len(newton["tried"]) == 4
    assert methods["poly-chebyshev"]["tuning_or_runs"]["chosen"].startswith("lower=")
    assert str(methods["baseline"]["step_size"]) in [str(float(v)) for v in methods["baseline"]["tuning_or_runs"]["tried"]["identity"]]
    assert results["config"]["tune_images"] == 8 and results["config"]["test_images"] == 12


def test_rerun_reuses_finished_runs(tiny_benchmark):
    folder = tiny_benchmark["folder"]
    best = folder / "runs" / "spc" / "d2gp-seed0" / "best.pt"
    mtime = best.stat().st_mtime
    benchmark(["spc"], ["d2gp"], out=folder / "again", runs=folder / "runs", iterations=2, progress=False,
              task_settings=tiny_benchmark["settings"], limit=4, tune_images=4, **tiny_benchmark["overrides"])
    assert best.stat().st_mtime == mtime


def test_restart_tunes_and_evaluates_with_the_restarted_solver(tiny_benchmark, tmp_path):
    """benchmark(restart=True) is the baseline of evaluate_solver(restart=True) at its own tuned γ."""
    import torch

    from d2gp.evaluation import evaluate_solver, tune_step_size
    from d2gp.tuning import STEP_FACTORS

    settings = tiny_benchmark["settings"]
    result = benchmark(["spc"], ["baseline"], out=tmp_path / "out", runs=tmp_path / "runs", iterations=2,
                       progress=False, task_settings=settings, limit=4, tune_images=4, restart=True)
    spc = result["results"]["spc"]
    assert spc["config"]["restart"] is True
    task = make_task("spc", device="cpu", **settings)
    den, val, test = task.denoiser(), task.images("val", limit=4), task.images("test", limit=4)
    gamma, _ = tune_step_size(task.student, val, den, task.student_step_size, 2, factors=STEP_FACTORS, restart=True)
    run = evaluate_solver("b", task.student, test, den, gamma, 10, progress=False, restart=True)
    assert spc["methods"][0]["psnr"][2][0] == pytest.approx(float(run.psnr[2].mean()), abs=1e-4)
    assert torch.isfinite(run.psnr[10]).all()


def test_another_host_tunes_trains_and_evaluates_every_row_in_it(tiny_benchmark, tmp_path):
    """benchmark(algorithm="pgd"): the baseline is evaluate_solver's PnP-PGD at its own tuned γ, the learned rows are
    trained in PnP-PGD; restart (FISTA's) is refused before any work."""
    from d2gp.checkpoints import CheckpointError
    from d2gp.evaluation import evaluate_solver, tune_step_size
    from d2gp.tuning import STEP_FACTORS

    settings = tiny_benchmark["settings"]
    result = benchmark(["spc"], ["baseline", "supervised"], out=tmp_path / "out", runs=tmp_path / "runs", iterations=2,
                       progress=False, task_settings=settings, limit=4, tune_images=4, algorithm="pgd",
                       **tiny_benchmark["overrides"])
    spc = result["results"]["spc"]
    assert spc["config"]["algorithm"] == "pgd"
    assert json.loads((tmp_path / "runs" / "spc" / "supervised-seed0" / "config.json").read_text())["train"]["algorithm"] == "pgd"
    task = make_task("spc", device="cpu", **settings)
    den, val, test = task.denoiser(), task.images("val", limit=4), task.images("test", limit=4)
    gamma, _ = tune_step_size(task.student, val, den, task.student_step_size, 2, factors=STEP_FACTORS, algorithm="pgd")
    run = evaluate_solver("b", task.student, test, den, gamma, 2, progress=False, algorithm="pgd")
    assert spc["methods"][0]["step_size"] == gamma
    assert spc["methods"][0]["psnr"][2][0] == pytest.approx(float(run.psnr[2].mean()), abs=1e-4)
    with pytest.raises(CheckpointError, match="pgd has no momentum"):
        benchmark(["spc"], ["baseline"], progress=False, algorithm="pgd", restart=True)


def test_unknown_method_is_refused():
    from d2gp.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="unknown method"):
        benchmark(["spc"], ["magic"], progress=False)


def test_iterations_to_reach_counts_from_the_first_iteration():
    from d2gp.benchmark import iterations_to_reach

    assert iterations_to_reach([5.0, 20.0, 27.9, 28.0], 27.95) == 3
    assert iterations_to_reach([30.0, 1.0], 29.0) is None  # k = 0, the start x_0, does not count

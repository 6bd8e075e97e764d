"""The bilevel training loop on a tiny problem: learning, exact resume, NaN stop, refusals (losses: test_losses)."""

import json

import pytest
import torch

import d2gp.training as training
from d2gp.checkpoints import CheckpointError, atomic_save, load_checkpoint
from d2gp.losses import supervised_loss
from d2gp.solver import pnp_fista, solve
from d2gp.tasks import make_task
from d2gp.training import TrainConfig, TrainingError, load_npo, train


# --- unrolling ------------------------------------------------------------------------------------
def test_truncated_unrolling_stops_gradients():
    task = make_task("spc", image_size=16)
    y, _ = task.measure(torch.rand(2, 1, 16, 16), seed=0)
    scales = torch.nn.Parameter(torch.ones(4))
    out = pnp_fista(task.student, y, torch.tanh, 1.0, 4, lambda g, k: scales[k] * g, grad_from=2)
    out.sum().backward()
    assert torch.all(scales.grad[:2] == 0) and torch.all(scales.grad[2:] != 0)


# --- training -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_denoiser):
    """A 16×16 SPC task with a small fixed denoiser, and 16 + 8 smooth images."""
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.rand((24, 1, 20, 20), generator=g), 5, stride=1)
    settings = {"image_size": 16, "denoiser": str(tiny_denoiser)}
    return {"settings": settings, "train": images[:16], "val": images[16:]}


def _config(tiny, **overrides):
    base = dict(task="spc", task_settings=tiny["settings"], iterations=3, epochs=2, batch_size=8, train_images=16,
                val_images=8, lr=3e-3, npo={"width": 8, "blocks": 1}, autocast=False, seed=0)
    return TrainConfig(**{**base, **overrides})


def _train(tiny, config, run_dir, **kw):
    task = make_task(config.task, **config.task_settings)
    return train(config, run_dir, task=task, train_images=tiny["train"], val_images=tiny["val"], progress=False, **kw)


def _fixed_batch_loss(tiny, config, npo):
    task = make_task(config.task, **config.task_settings)
    with torch.no_grad():
        loss, _ = training._loss(config, task, npo, task.denoiser(), tiny["train"], seed=123)
    return float(loss)


@pytest.mark.parametrize("overrides", [
    {}, {"method": "supervised"}, {"teacher_gradient": "teacher"}, {"unroll": "checkpoint"},
    {"unroll": "truncated", "truncate": 2}, {"npo": {"width": 8, "blocks": 1, "use_iterate": True}},
    {"method": "objective"}, {"preconditioner": "scalar", "method": "objective"},
    {"preconditioner": "pointwise", "method": "supervised"}, {"preconditioner": "convolutional"},
    {"algorithm": "pgd"}, {"algorithm": "hqs"}, {"algorithm": "hqs", "teacher_gradient": "teacher"},
])
def test_training_lowers_the_loss(tiny, tmp_path, overrides):
    config = _config(tiny, **overrides)
    summary = _train(tiny, config, tmp_path / "run")
    task = make_task("spc", **config.task_settings)
    fresh = training.build_preconditioner(config, task)
    trained, meta = load_npo(tmp_path / "run" / "last.pt", task)
    assert meta["method"] == config.method and meta["kind"] == config.preconditioner
    assert type(trained) is type(fresh) and trained.config == fresh.config
    assert _fixed_batch_loss(tiny, config, trained) < _fixed_batch_loss(tiny, config, fresh)
    for name in ("config.json", "checkpoint.pt", "best.pt", "last.pt", "log.csv", "summary.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert summary["epochs"] == 2
    assert len((tmp_path / "run" / "log.csv").read_text().strip().splitlines()) == 3


def test_autocast_unset_is_decided_once_and_a_resumed_run_keeps_its_own(tiny, tmp_path, monkeypatch):
    """``autocast=None``: the machine decides at the start (d2gp.device.use_bf16) and config.json
    records the decision; resuming with ``None`` continues in the precision the run began in —
    also a run from before the setting could be unset (saved ``False``) — on any machine."""
    import d2gp.device as device_module

    monkeypatch.setattr(device_module, "cpu_has_amx_bf16", lambda: False)
    config = _config(tiny, autocast=None, epochs=1)
    _train(tiny, config, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["autocast"] is False
    monkeypatch.setattr(device_module, "cpu_has_amx_bf16", lambda: True)  # resumed on a machine with AMX
    assert training.resolve_autocast(config, torch.device("cpu"), tmp_path / "run", resume=True).autocast is False
    assert training.resolve_autocast(config, torch.device("cpu"), tmp_path / "new", resume=False).autocast is True
    assert training.resolve_autocast(config, torch.device("cpu"), tmp_path / "run", resume=False).autocast is True
    _train(tiny, config, tmp_path / "run", resume=True)  # same run, nothing left to do: no "differs in autocast"
    with pytest.raises(TrainingError, match="differs in autocast"):
        _train(tiny, _config(tiny, autocast=True, epochs=1), tmp_path / "run", resume=True)


def test_resume_after_interruption_gives_the_same_weights(tiny, tmp_path, monkeypatch):
    config = _config(tiny, epochs=3)
    _train(tiny, config, tmp_path / "straight")

    calls = {"n": 0}
    original = training.evaluate_solver

    def dies_in_second_validation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during epoch 2
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_solver", dies_in_second_validation)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny, config, tmp_path / "killed")
    monkeypatch.setattr(training, "evaluate_solver", original)
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["update"] == 2  # one epoch of 2 updates
    with pytest.raises(TrainingError, match="resume"):
        _train(tiny, config, tmp_path / "killed")
    _train(tiny, config, tmp_path / "killed", resume=True)

    a = load_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "killed" / "last.pt")["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = (tmp_path / "killed" / "log.csv").read_text().strip().splitlines()
    assert len(log) == 4


def test_resume_with_other_settings_is_refused(tiny, tmp_path):
    _train(tiny, _config(tiny, epochs=1), tmp_path / "run")
    with pytest.raises(TrainingError, match="differs in lr"):
        _train(tiny, _config(tiny, epochs=1, lr=1e-2), tmp_path / "run", resume=True)


def test_a_finished_constant_rate_run_extends_to_exactly_the_longer_run(tiny, tmp_path):
    """--resume with more --updates continues a finished run (constant learning rate): the weights
    equal those of a run trained for the larger count from the start, bit for bit, and the log
    keeps the first run's rows; the config and summary say the new count."""
    long = _config(tiny, updates=6, val_every=2, schedule="constant", warmup=2)
    _train(tiny, long, tmp_path / "straight")
    short = _config(tiny, updates=3, val_every=2, schedule="constant", warmup=2)
    _train(tiny, short, tmp_path / "extended")
    summary = _train(tiny, long, tmp_path / "extended", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "extended" / "last.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "extended" / "log.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [2, 3, 4, 6]  # 3: where the first run ended
    assert summary["updates"] == 6
    assert json.loads((tmp_path / "extended" / "config.json").read_text())["train"]["updates"] == 6


@pytest.mark.parametrize("first, then, message", [
    (dict(updates=3, schedule="cosine"), dict(updates=6, schedule="cosine"), "cosine learning-rate schedule"),
    (dict(updates=4, schedule="constant"), dict(updates=3, schedule="constant"), "extended, not shortened"),
    (dict(updates=3, schedule="constant"), dict(updates=6, schedule="constant", lr=1e-2), "differs in lr, updates$"),
])
def test_runs_that_cannot_be_extended_exactly_are_refused_with_the_reason(tiny, tmp_path, first, then, message):
    _train(tiny, _config(tiny, warmup=1, **first), tmp_path / "run")
    with pytest.raises(TrainingError, match=message):
        _train(tiny, _config(tiny, warmup=1, **then), tmp_path / "run", resume=True)


def test_nan_loss_stops_with_last_checkpoint_intact(tiny, tmp_path, monkeypatch):
    original = training._loss
    calls = {"n": 0}

    def nan_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        loss, terms = original(*args, **kwargs)
        return (loss * float("nan"), terms) if calls["n"] > 2 else (loss, terms)

    monkeypatch.setattr(training, "_loss", nan_in_epoch_two)
    with pytest.raises(TrainingError, match="last good checkpoint"):
        _train(tiny, _config(tiny), tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["update"] == 2


def test_foreign_checkpoints_are_refused(tiny, tmp_path):
    _train(tiny, _config(tiny, epochs=1), tmp_path / "run")
    best = tmp_path / "run" / "best.pt"
    with pytest.raises(CheckpointError, match="trained for task 'spc', not 'sr'"):
        load_npo(best, make_task("sr"))
    data = load_checkpoint(best)
    data["npo"]["width"] = 16
    atomic_save(data, tmp_path / "other_arch.pt")
    with pytest.raises(CheckpointError, match="do not fit the npo architecture"):
        load_npo(tmp_path / "other_arch.pt")
    with pytest.raises(CheckpointError, match="not a d2gp-npo file"):
        load_npo(tmp_path / "run" / "checkpoint.pt")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_npo(tmp_path / "broken.pt")


@pytest.mark.parametrize("overrides,message", [
    ({"method": "magic"}, "unknown method"), ({"unroll": "half"}, "unknown unroll"),
    ({"teacher_gradient": "both"}, "teacher_gradient"), ({"unroll": "truncated", "truncate": 9}, "truncate"),
    ({"lr": 0.0}, "lr"), ({"preconditioner": "cubic"}, "unknown preconditioner 'cubic'"),
    ({"lambda_gradient": 0.0, "lambda_imitation": 0.0, "lambda_supervised": 0.0}, "all loss weights are zero"),
    ({"algorithm": "admm"}, "unknown algorithm 'admm'; choose one of fista, pgd, hqs"),
])
def test_bad_training_settings(tiny, tmp_path, overrides, message):
    with pytest.raises((TrainingError, ValueError), match=message):
        _train(tiny, _config(tiny, **overrides), tmp_path / "run")


def test_config_is_saved_next_to_the_run(tiny, tmp_path):
    _train(tiny, _config(tiny, epochs=1), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["iterations"] == 3 and saved["task"]["image_size"] == 16
    assert saved["environment"]["torch"] and saved["data"]["train"] == 16


@pytest.mark.parametrize("task_name", ["spc", "mri", "sr"])
@pytest.mark.parametrize("method", ["d2gp", "supervised"])
def test_shipped_npo_weights_load_and_run(task_name, method):
    task = make_task(task_name)
    npo, meta = load_npo(method, task)
    assert meta["method"] == method and meta["task"] == task_name and meta["kind"] == "npo"
    grad = torch.randn(2, *task.image_shape)
    with torch.no_grad():
        assert torch.isfinite(npo(grad, 0)).all() and npo(grad, 0).shape == grad.shape


@pytest.mark.parametrize("kind, expected", [("npo", 1e-3), ("scalar", 3e-2), ("pointwise", 3e-2),
                                            ("convolutional", 1e-3), ("full", 1e-5)])
def test_default_learning_rate_per_preconditioner(tiny, kind, expected):
    config = _config(tiny, lr=None, preconditioner=kind)
    task = make_task(config.task, **config.task_settings)
    optimizer = training._build_optimizer(config, training.build_preconditioner(config, task))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    explicit = _config(tiny, lr=0.5, preconditioner=kind)
    assert training._build_optimizer(explicit, training.build_preconditioner(explicit, task)).param_groups[0]["lr"] == 0.5


def test_runs_saved_with_the_old_explicit_default_still_match(tiny, tmp_path):
    """Before lr=None, config.json held the NPO's 1e-3: that run is the same as one with the default."""
    (tmp_path / "config.json").write_text(json.dumps({"train": {**_config(tiny).to_dict(), "lr": 1e-3}}))
    assert training.saved_train_config(tmp_path) == _config(tiny, lr=None).to_json_dict()
    assert training.saved_train_config(tmp_path) != _config(tiny, lr=2e-3).to_json_dict()
    assert _config(tiny, lr=3e-2, preconditioner="scalar").to_json_dict()["lr"] is None
    assert _config(tiny, lr=1e-3, preconditioner="scalar").to_json_dict()["lr"] == 1e-3


# --- budgets, schedules, the loss's tail, the teacher's cache -------------------------------------
def test_learning_rate_schedules():
    cosine = TrainConfig(schedule="cosine", warmup=4, final_lr_ratio=0.1)
    factors = [training.lr_factor(cosine, u, 104) for u in range(104)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up
    assert factors[4] == pytest.approx(1.0) and factors[54] == pytest.approx(0.55)  # half-way: the mean
    assert factors[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(factors[4:], factors[5:]))
    constant = TrainConfig(schedule="constant", warmup=2)
    assert [training.lr_factor(constant, u, 10) for u in range(4)] == [0.5, 1.0, 1.0, 1.0]
    with pytest.raises(TrainingError, match="warmup needs"):
        TrainConfig(schedule="plateau", warmup=3).validate()


def test_validation_points():
    config = TrainConfig(val_every=4, val_points=[1, 2, 100])
    assert training.validation_points(config, 5, 10) == [1, 2, 4, 8, 10]
    assert training.validation_points(TrainConfig(), 5, 12) == [5, 10, 12]  # once per epoch and at the end


def test_update_budget_resumes_mid_epoch_bit_for_bit(tiny, tmp_path, monkeypatch):
    """A budget in updates, validated every update (mid-epoch), cosine schedule: kill and resume."""
    config = _config(tiny, updates=5, val_every=1, schedule="cosine", warmup=2, grad_clip=0.5, tail=2)
    _train(tiny, config, tmp_path / "straight")
    calls = {"n": 0}
    original = training.evaluate_solver

    def dies_in_third_validation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_solver", dies_in_third_validation)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny, config, tmp_path / "killed")
    monkeypatch.setattr(training, "evaluate_solver", original)
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["update"] == 2
    summary = _train(tiny, config, tmp_path / "killed", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "killed" / "last.pt")["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = (tmp_path / "killed" / "log.csv").read_text().strip().splitlines()
    assert len(log) == 6 and log[0].startswith("update,epoch,loss") and "grad_norm" in log[0]
    assert summary["updates"] == 5 and summary["epochs"] == 2.5


def test_teacher_targets_are_the_teachers_seeded_run(tiny):
    task = make_task("spc", **tiny["settings"])
    den = task.denoiser()
    images = tiny["train"][:5]
    targets = training.TeacherTargets(task, den, images, iterations=3, seed=2, batch_size=2)
    base = training.TEACHER_NOISE_SEED + 200_000
    for i in range(5):
        y = training.measure(task.teacher, images[i:i + 1], seed=base + i)
        with torch.no_grad():
            x = pnp_fista(task.teacher, y, den, task.teacher_step_size, 3)
        assert torch.equal(targets.y[i:i + 1], y)
        torch.testing.assert_close(targets.x[i:i + 1], x, rtol=1e-5, atol=1e-6)  # batched vs single
    y_t, x_t = targets[torch.tensor([4, 0])]
    assert torch.equal(y_t, targets.y[[4, 0]]) and torch.equal(x_t, targets.x[[4, 0]])


def test_the_tail_averages_the_supervised_loss_over_the_last_iterates(tiny):
    config = _config(tiny, method="supervised", tail=2)
    task = make_task("spc", **config.task_settings)
    den, x = task.denoiser(), tiny["train"][:4]
    npo = training.build_preconditioner(config, task)
    with torch.no_grad():
        loss, terms = training._loss(config, task, npo, den, x, seed=5)
        y = training.measure(task.student, x, seed=5)
        _, trace = pnp_fista(task.student, y, den, task.student_step_size, 3, npo, trace=True)
    expected = 0.5 * (supervised_loss(trace.x[1], x) + supervised_loss(trace.x[2], x))
    assert terms["supervised"] == pytest.approx(float(expected), rel=1e-6)
    assert float(loss) == pytest.approx(300 * float(expected), rel=1e-6)
    with pytest.raises(TrainingError, match="tail"):
        _config(tiny, tail=4).validate()
    with pytest.raises(TrainingError, match="tail .* must not exceed truncate"):
        _config(tiny, tail=3, unroll="truncated", truncate=2).validate()


def test_defaults_are_the_stable_laptop_settings():
    """TrainConfig() takes batches of 8 (1.7 GB on SPC; batch 32 was killed at 24 GB on MRI in a user's
    trial) and trains the way that stays stable past K."""
    config = TrainConfig()
    assert config.batch_size == 8 and config.schedule == "cosine" and config.grad_clip == 1.0
    assert config.loss_tail == 10 and TrainConfig(iterations=4).loss_tail == 4
    assert TrainConfig(unroll="truncated", truncate=5).loss_tail == 5 and TrainConfig(tail=1).loss_tail == 1
    TrainConfig(iterations=4).validate()
    TrainConfig(unroll="truncated", truncate=5).validate()


def test_trained_npo_repeats_its_last_operator_past_k(tiny, tmp_path):
    _train(tiny, _config(tiny, epochs=1), tmp_path / "run")
    npo, meta = load_npo(tmp_path / "run" / "best.pt")
    assert meta["npo"]["max_iteration"] == 2  # K − 1
    g = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(npo(g, 9), npo(g, 2))


def test_progress_bar_shows_no_nan_before_the_first_validation(tiny, tmp_path, monkeypatch):
    postfixes = []

    class Bar:  # records what the progress bar would show
        def __init__(self, iterable=(), **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def update(self, n=1):
            pass

        def write(self, text):
            pass

        def close(self):
            pass

        def set_postfix(self, **kwargs):
            postfixes.append(kwargs["val_psnr"])

    monkeypatch.setattr(training, "tqdm", Bar)
    _train(tiny, _config(tiny, epochs=2), tmp_path / "run")
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    first_epoch = dict(zip(log[0].split(","), log[1].split(",")))
    # 16 images in batches of 8: two updates per epoch; the first epoch has no validation PSNR yet
    assert postfixes == ["–", "–", *[f"{float(first_epoch['val_psnr']):.2f}"] * 2]


def test_the_unrolled_loss_compiles_as_one_graph(tiny, one_thread):
    """What ``train(..., compile=True)`` captures (with CUDA graphs on a GPU) must have no graph break."""
    import functools

    config = _config(tiny, iterations=2, tail=2)
    task = make_task("spc", **config.task_settings)
    den, x = task.denoiser().requires_grad_(False), tiny["train"][:4]
    npo = training.build_preconditioner(config, task)
    teacher = training.TeacherTargets(task, den, x, config.iterations)
    y_s = training.measure(task.student, x, seed=1)
    eager = functools.partial(training.unrolled_loss, config, task, npo, den)
    compiled = torch.compile(eager, backend="eager", fullgraph=True)  # fullgraph: a break is an error
    (a, terms_a), (b, terms_b) = eager(x, y_s, teacher.y, teacher.x), compiled(x, y_s, teacher.y, teacher.x)
    assert torch.equal(a, b) and terms_a.keys() == terms_b.keys() == {"gradient", "imitation", "supervised"}


# --- the step size a preconditioner is trained with -----------------------------------------------
def test_training_step_size_defaults_to_the_tasks_and_is_checked(tiny):
    task = make_task("spc", **tiny["settings"])
    assert training.training_step_size(_config(tiny), task) == task.student_step_size
    assert training.training_step_size(_config(tiny, step_size=0.7), task) == 0.7
    for bad in (0.0, -1.0, float("inf"), True, "1"):
        with pytest.raises(TrainingError, match="step_size must be a finite number > 0"):
            _config(tiny, step_size=bad).validate()
    with pytest.raises(TrainingError, match=r"give step_size \(0.5\) or tune_step, not both"):
        _config(tiny, step_size=0.5, tune_step=True).validate()


def test_the_unrolled_loss_runs_the_student_at_the_training_step(tiny):
    config = _config(tiny, method="supervised", tail=1, step_size=0.6)
    task = make_task("spc", **config.task_settings)
    den, x = task.denoiser(), tiny["train"][:4]
    npo = training.build_preconditioner(config, task)
    with torch.no_grad():
        _, terms = training._loss(config, task, npo, den, x, seed=5)
        y = training.measure(task.student, x, seed=5)
        expected = supervised_loss(pnp_fista(task.student, y, den, 0.6, 3, npo), x)
    assert terms["supervised"] == pytest.approx(float(expected), rel=1e-6)
    assert task.student_step_size == pytest.approx(1.0)  # so 0.6 is another step than the task's


def test_a_run_at_its_own_step_records_it_and_is_evaluated_at_it(tiny, tmp_path):
    from d2gp.apps import evaluate_runs

    summary = _train(tiny, _config(tiny, epochs=1, step_size=0.6), tmp_path / "run")
    assert summary["step_size"] == 0.6
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["step_size"] == 0.6 and saved["step_size"]["training"] == 0.6
    for name in ("best.pt", "last.pt"):
        assert load_checkpoint(tmp_path / "run" / name)["step_size"] == 0.6
    npo, meta = load_npo(tmp_path / "run", make_task("spc", **tiny["settings"]))
    assert training.trained_step_size(meta, make_task("spc", **tiny["settings"])) == 0.6
    result = evaluate_runs([tmp_path / "run"], images=tiny["val"][:2], val_images=tiny["val"], progress=False)
    steps = {m["label"]: m["step_size"] for m in result["results"]["methods"]}
    assert steps["D2GP"] == 0.6 and steps["teacher (upper bound)"] == pytest.approx(1.0)
    assert result["results"]["images"] == 2


def test_tune_step_starts_from_the_tuned_step_and_resume_keeps_it(tiny, tmp_path, monkeypatch):
    from d2gp.evaluation import tune_step_size

    config = _config(tiny, epochs=1, tune_step=True)
    summary = _train(tiny, config, tmp_path / "run")
    task = make_task("spc", **tiny["settings"])
    tuned, record = tune_step_size(task.student, tiny["val"], task.denoiser(), task.student_step_size, 3)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["tune_step"] is True and saved["train"]["step_size"] is None  # as asked for
    assert saved["step_size"]["training"] == tuned == summary["step_size"] != task.student_step_size
    assert saved["step_size"]["tuning"] == {"chosen": tuned, "val_psnr_by_step": record}
    assert load_checkpoint(tmp_path / "run" / "best.pt")["step_size"] == tuned

    def no_tuning(*args, **kwargs):
        raise AssertionError("a resumed run reads its tuned step, it does not tune again")

    monkeypatch.setattr(training, "tune_step_size", no_tuning)
    assert _train(tiny, config, tmp_path / "run", resume=True)["step_size"] == tuned


def test_runs_and_weights_from_before_the_step_size_still_load(tiny, tmp_path):
    """config.json without step_size/tune_step is the default run; a weights file without step_size was
    trained at the task's step; a crafted one is refused."""
    old = _config(tiny).to_dict()
    del old["step_size"], old["tune_step"]
    (tmp_path / "config.json").write_text(json.dumps({"train": old}))
    assert training.saved_train_config(tmp_path) == _config(tiny).to_json_dict()
    task = make_task("spc")
    _, meta = load_npo("d2gp", task)
    assert "step_size" not in meta and training.trained_step_size(meta, task) == task.student_step_size
    data = load_checkpoint(training.shipped_npo_path("spc"))
    atomic_save({**data, "step_size": "fast"}, tmp_path / "crafted.pt")
    with pytest.raises(CheckpointError, match="records the training step size 'fast', not a number > 0"):
        load_npo(tmp_path / "crafted.pt")


def test_the_command_line_sets_the_training_step():
    from d2gp.cli import _train_config_from_args, build_parser

    parse = lambda *flags: _train_config_from_args(build_parser().parse_args(["train", "--task", "spc", *flags]))
    assert parse().step_size is None and parse().tune_step is False
    assert parse("--step-size", "1.5").step_size == 1.5 and parse("--tune-step").tune_step is True


# --- host algorithms --------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["pgd", "hqs"])
def test_a_run_in_another_host_trains_validates_and_is_evaluated_in_it(tiny, tmp_path, algorithm):
    """The student, the teacher's targets, the validation and every later evaluation run the run's algorithm."""
    from d2gp.apps import evaluate_runs
    from d2gp.evaluation import evaluate_solver

    config = _config(tiny, epochs=1, algorithm=algorithm)
    summary = _train(tiny, config, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["algorithm"] == algorithm
    task = make_task("spc", **tiny["settings"])
    npo, meta = load_npo(tmp_path / "run", task)
    assert training.trained_algorithm(meta) == algorithm
    den = task.denoiser()
    val = {host: float(evaluate_solver("v", task.student, tiny["val"], den, task.student_step_size, 3, preconditioner=npo,
                                       progress=False, algorithm=host).psnr[3].mean()) for host in ("fista", algorithm)}
    assert summary["best_val_psnr"] == pytest.approx(val[algorithm], abs=1e-4) and val["fista"] != val[algorithm]
    # the teacher's cached targets are the teacher's run of the same algorithm
    targets = training.TeacherTargets(task, den, tiny["train"][:2], 3, seed=0, algorithm=algorithm)
    with torch.no_grad():
        expected = solve(algorithm, task.teacher, targets.y, den, task.teacher_step_size, 3)
    torch.testing.assert_close(targets.x, expected, rtol=1e-5, atol=1e-6)
    # evaluated in its own algorithm (restart off: no momentum), or in another when asked
    result = evaluate_runs([tmp_path / "run"], images=tiny["val"][:4], val_images=tiny["val"], progress=False,
                           out=tmp_path / "eval")
    assert result["results"]["algorithm"] == algorithm and result["results"]["restart"] is False
    row = next(m for m in result["results"]["methods"] if m["label"] == "D2GP")
    direct = evaluate_solver("d", task.student, tiny["val"][:4], den, task.student_step_size, 15, preconditioner=npo,
                             progress=False, algorithm=algorithm)
    assert row["psnr_per_iteration"] == pytest.approx(direct.summary()["psnr_per_iteration"], abs=1e-5)
    other = evaluate_runs([tmp_path / "run"], images=tiny["val"][:2], val_images=tiny["val"], progress=False,
                          out=tmp_path / "eval2", algorithm="fista")
    assert other["results"]["algorithm"] == "fista" and other["results"]["restart"] is True
    assert f"D2GP, trained in {algorithm}" in other["table"]
    with pytest.raises(CheckpointError, match=f"{algorithm} has no momentum"):
        evaluate_runs([tmp_path / "run"], images=tiny["val"][:2], val_images=tiny["val"], progress=False,
                      out=tmp_path / "eval3", restart=True)


def test_runs_and_weights_from_before_the_algorithm_are_fista(tiny, tmp_path):
    old = _config(tiny).to_dict()
    del old["algorithm"]
    (tmp_path / "config.json").write_text(json.dumps({"train": old}))
    assert training.saved_train_config(tmp_path) == _config(tiny).to_json_dict()
    assert TrainConfig.from_dict(old).algorithm == "fista"
    _, meta = load_npo("d2gp", make_task("spc"))
    assert "algorithm" not in meta["train_config"] and training.trained_algorithm(meta) == "fista"
    with pytest.raises(CheckpointError, match="trained in the algorithm 'admm', which this version does not know"):
        training.trained_algorithm({"train_config": {"algorithm": "admm"}})


def test_the_command_line_sets_the_algorithm():
    from d2gp.cli import _train_config_from_args, build_parser

    parse = lambda *flags: _train_config_from_args(build_parser().parse_args(["train", "--task", "spc", *flags]))
    assert parse().algorithm == "fista" and parse("--algorithm", "hqs").algorithm == "hqs"


def test_an_npo_with_the_global_paths_trains_saves_and_reloads(tiny, tmp_path):
    """The architecture flags reach the NPO, the weights file records them, and the reloaded network
    is the trained one (issue 11's architecture ablation trains these)."""
    from d2gp.cli import _train_config_from_args, build_parser

    parsed = _train_config_from_args(build_parser().parse_args(
        ["train", "--task", "spc", "--levels", "2", "--global-path", "--spectral-size", "16"]))
    assert parsed.npo == {"levels": 2, "global_path": True, "spectral_size": 16}
    side = make_task("spc", **tiny["settings"]).image_shape[-1]
    settings = {"width": 8, "blocks": 3, "levels": 2, "global_path": True, "spectral_size": side}
    _train(tiny, _config(tiny, epochs=1, npo=settings), tmp_path / "run")
    npo, meta = load_npo(tmp_path / "run")
    assert {k: meta["npo"][k] for k in settings} == settings
    assert npo.multiplier.abs().max() > 0 and npo.pooled.weight.abs().max() > 0  # trained, not left at zero
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(state[k], v) for k, v in npo.state_dict().items())


def test_the_default_npo_is_the_u_net_trunk_and_old_runs_keep_theirs():
    """A run without NPO settings gets DEFAULT_NPO (the architecture ablation's pick); a run or file that
    recorded other settings, the plain trunk's {} included, is rebuilt with exactly those."""
    from d2gp.cli import _train_config_from_args, build_parser

    assert training.DEFAULT_NPO == {"levels": 3} and TrainConfig().npo == {"levels": 3}
    assert TrainConfig().npo is not training.DEFAULT_NPO  # a copy: no run can change the default
    parse = lambda *flags: _train_config_from_args(build_parser().parse_args(["train", "--task", "spc", *flags]))
    assert parse().npo == {"levels": 3} and parse("--levels", "1").npo == {"levels": 1}
    assert parse("--width", "16").npo == {"levels": 3, "width": 16}
    assert TrainConfig.from_dict({**TrainConfig().to_dict(), "npo": {}}).npo == {}  # a run from before the default
    task = make_task("spc", image_size=16)
    assert training.build_preconditioner(TrainConfig(), task).levels == [0, 1, 2, 1, 0]
    assert training.build_preconditioner(TrainConfig(npo={}), task).levels == [0] * 5

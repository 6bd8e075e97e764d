"""Your own operators (tasks/own.py, register_task): a Gaussian blur of std 3 (student) against std 1
(teacher), a pair no built-in task uses, trained, evaluated, saved, reloaded, resumed and evaluated
again from its run directory alone; derived teachers; and every refusal, by name."""

import dataclasses
import json
import sys
import textwrap

import pytest
import torch
from deepinv.physics import Blur, BlurFFT, Inpainting, LinearPhysics
from deepinv.physics.functional import gaussian_blur

import d2gp.training as training
from d2gp.apps import evaluate_runs
from d2gp.checkpoints import CheckpointError, load_checkpoint
from d2gp.cli import main
from d2gp.tasks import (
    TASKS, Task, TaskConfig, TaskError, check_pair, gaussian_blur_operator, make_task, own_task, register_task,
    teacher_of,
)
from d2gp.tasks.own import measured_fraction
from d2gp.training import TrainConfig, TrainingError, load_npo, train

SHAPE = (1, 16, 16)
NAME = "blur-test"


@pytest.fixture(autouse=True)
def registry():
    """Every test leaves the registry of tasks as it found it."""
    saved = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(saved)


def _pair(student_sigma=3.0, teacher_sigma=1.0):
    student = gaussian_blur_operator(SHAPE, student_sigma)
    return student, teacher_of(student, sigma=teacher_sigma)


def _register(denoiser, **kw):
    return own_task(NAME, *_pair(), dataset="mnist-embedded", denoiser=str(denoiser), **kw)


def _config(**overrides):
    base = dict(task=NAME, iterations=3, updates=2, batch_size=2, train_images=4, val_images=2, lr=3e-3,
                npo={"width": 8, "blocks": 1}, seed=0)
    return TrainConfig(**{**base, **overrides})


# --- the pair -------------------------------------------------------------------------------------
def test_blur_pair_is_checked_and_measured():
    student, teacher = _pair()
    assert isinstance(student, BlurFFT) and isinstance(teacher, BlurFFT)
    found = check_pair(student, teacher, SHAPE)
    # a Gaussian blur of unit gain: ‖AᵀA‖ = 1; the narrower one keeps more of every frequency
    assert found["student"]["norm"] == pytest.approx(1, rel=1e-5) and found["teacher"]["norm"] == pytest.approx(1, rel=1e-4)
    assert found["teacher"]["measured_fraction"] > 5 * found["student"]["measured_fraction"]


def test_measured_fraction_is_the_share_of_rows_for_orthonormal_rows():
    spc = make_task("spc", image_size=16)  # 26 and 128 of 256 ±1 rows: tr(AᵀA)/n = m/n, to Hutchinson's error
    assert measured_fraction(spc.student, spc.image_shape) == pytest.approx(26 / 256, rel=0.1)
    assert measured_fraction(spc.teacher, spc.image_shape) == pytest.approx(128 / 256, rel=0.05)


@pytest.mark.parametrize("name", ["spc", "spc-binary", "mri", "sr"])
def test_every_built_in_pair_passes_the_check(name):
    task = make_task(name, **({"image_size": 32} if name in ("mri", "sr") else {}))
    found = check_pair(task.student, task.teacher, task.image_shape)
    assert found["teacher"]["measured_fraction"] > found["student"]["measured_fraction"]


def test_operators_of_other_images_are_refused():
    student, _ = _pair()
    with pytest.raises(TaskError, match=r"the teacher operator \(BlurFFT\) cannot be applied to images of shape \(1, 16, 16\)"):
        check_pair(student, gaussian_blur_operator((1, 8, 8), 1.0), SHAPE)
    with pytest.raises(TaskError, match="the student operator .* cannot be applied"):
        own_task("x", gaussian_blur_operator((1, 8, 8), 3.0), teacher_of(student), image_shape=SHAPE)
    with pytest.raises(TaskError, match="the teacher must be a deepinv.physics.LinearPhysics, got Conv2d"):
        check_pair(student, torch.nn.Conv2d(1, 1, 3), SHAPE)


def test_a_teacher_that_is_not_better_posed_is_refused():
    student, teacher = _pair()
    with pytest.raises(TaskError, match=r"the teacher is not better posed than the student: it measures 0.89% of the "
                                        r"image, the student 8.05%.*were they swapped\?"):
        own_task("x", teacher, student)
    with pytest.raises(TaskError, match="not better posed"):  # the same operator twice
        check_pair(student, student, SHAPE)


def test_an_operator_whose_adjoint_is_wrong_is_refused():
    class Wrong(LinearPhysics):
        def A(self, x, **kwargs):
            return 2 * x

        def A_adjoint(self, y, **kwargs):
            return y

    with pytest.raises(TaskError, match="the student's A_adjoint is not the adjoint of its A"):
        check_pair(Wrong(), gaussian_blur_operator(SHAPE, 1.0), SHAPE)


# --- derived teachers -----------------------------------------------------------------------------
def test_teacher_of_a_gaussian_blur_is_the_narrower_blur():
    student = gaussian_blur_operator((1, 32, 32), 3.0)
    teacher = teacher_of(student, sigma=1.0)
    assert torch.allclose(teacher.filter, gaussian_blur_operator((1, 32, 32), 1.0).filter)
    half = teacher_of(student)  # default: half the student's width
    assert torch.allclose(half.filter, gaussian_blur_operator((1, 32, 32), 1.5).filter, atol=1e-7)
    direct = Blur(filter=student.filter, padding="circular")  # the convolution form keeps its form
    derived = teacher_of(direct, sigma=1.0)
    assert isinstance(derived, Blur) and derived.padding == "circular"
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(derived.A(x), teacher.A(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,how", [("spc", {"ratio": 0.5}), ("mri", {}), ("sr", {})])
def test_teacher_of_a_built_in_student_is_the_built_in_teacher(name, how):
    task = make_task(name)
    teacher = teacher_of(task.student, **how)
    x = torch.rand(2, *task.image_shape)
    assert type(teacher) is type(task.teacher)
    assert torch.equal(teacher.A_adjoint(teacher.A(x)), task.teacher.A_adjoint(task.teacher.A(x)))


@pytest.mark.parametrize("student,how,message", [
    (gaussian_blur_operator(SHAPE, 1.0), {"sigma": 2.0}, r"narrower than the student's \(std 1\)"),
    (BlurFFT(img_size=SHAPE, filter=torch.ones(1, 1, 3, 3) / 9), {}, "filter is not a centred Gaussian"),
    (BlurFFT(img_size=SHAPE, filter=gaussian_blur(sigma=(1.0, 2.0))), {}, "filter is not an isotropic Gaussian"),
    (Inpainting(img_size=SHAPE, mask=0.5), {}, "no teacher can be derived from a Inpainting"),
])
def test_teacher_of_refusals(student, how, message):
    with pytest.raises(TaskError, match=message):
        teacher_of(student, **how)
    with pytest.raises(TaskError, match="more rows than the student"):
        teacher_of(make_task("spc").student, ratio=0.05)
    with pytest.raises(TaskError, match="less accelerated"):
        teacher_of(make_task("mri").student, acceleration=8.0)
    with pytest.raises(TaskError, match=r"factor must be an integer in \[1, 4\)"):
        teacher_of(make_task("sr").student, factor=4)


# --- registering ----------------------------------------------------------------------------------
def test_own_task_registers_a_task_that_make_task_rebuilds(tiny_denoiser):
    task = _register(tiny_denoiser)
    assert task.name == NAME and task.image_shape == SHAPE and NAME in TASKS
    again = make_task(NAME)
    x = torch.rand(2, *SHAPE)
    assert torch.equal(again.student.A(x), task.student.A(x)) and torch.equal(again.teacher.A(x), task.teacher.A(x))
    assert again.config.to_dict() == task.config.to_dict() and "operators" in task.config.to_dict()
    assert make_task(NAME).images("val", limit=2).shape == (2, *SHAPE)
    assert "BlurFFT student, BlurFFT teacher, 16×16" in repr(task)
    _register(tiny_denoiser)  # the same call again (a later session): harmless
    with pytest.raises(TaskError, match=f"task '{NAME}' is already registered .*replace=True"):
        own_task(NAME, *_pair(teacher_sigma=2.0), dataset="mnist-embedded", denoiser=str(tiny_denoiser))
    with pytest.raises(TaskError, match=r"operators for 16×16 images: its image_size cannot be changed \(got 32\)"):
        make_task(NAME, image_size=32)


def test_own_task_does_not_change_the_objects_passed(tiny_denoiser):
    student, teacher = _pair()
    noise = student.noise_model
    own_task(NAME, student, teacher, dataset="mnist-embedded", denoiser=str(tiny_denoiser), noise_sigma=0.05)
    assert student.noise_model is noise


@pytest.mark.parametrize("name,message", [
    ("spc", "'spc' is a built-in task"), ("My Task", "lower-case name"), ("", "lower-case name"),
])
def test_bad_task_names(name, message):
    with pytest.raises(TaskError, match=message):
        own_task(name, *_pair(), dataset="mnist-embedded", denoiser="spc")


def test_denoiser_and_data_refusals(tiny_denoiser):
    with pytest.raises(TaskError, match="pass the denoiser as a weights file"):
        own_task(NAME, *_pair(), denoiser=torch.nn.Identity())
    with pytest.raises(TaskError, match="no denoiser is shipped for 'blur'"):
        own_task(NAME, *_pair(), denoiser="blur")
    with pytest.raises(TaskError, match="unknown dataset 'digits'"):
        own_task(NAME, *_pair(), dataset="digits", denoiser="spc")
    task = own_task(NAME, *_pair())  # neither: said when they are needed, with the way out
    with pytest.raises(CheckpointError, match=f"no denoiser is shipped for '{NAME}' \\(shipped: mri, spc, sr\\); give the "
                                              f"task a denoiser .* train-denoiser --task {NAME}"):
        task.denoiser()
    with pytest.raises(TaskError, match=f"task '{NAME}' has no dataset: .* pass the images yourself"):
        task.images("train")


def test_a_shipped_denoiser_by_name_loads_without_a_warning(recwarn):
    task = own_task(NAME, *_pair(), denoiser="spc")
    assert task.config.shipped_denoiser == "spc" and task.config.denoiser is None
    task.denoiser()
    assert not [w for w in recwarn if "trained for task" in str(w.message)]


@dataclasses.dataclass
class WideBlurConfig(TaskConfig):
    """A task of one's own as a configuration class: Gaussian blur, student std 2, teacher std 0.5."""

    name = "wide-blur"
    default_dataset = "mnist-embedded"
    shipped_denoiser = "spc"

    image_size: int = 16
    student_sigma: float = 2.0

    def build_student(self):
        return gaussian_blur_operator((1, self.image_size, self.image_size), self.student_sigma)

    def build_teacher(self):
        return gaussian_blur_operator((1, self.image_size, self.image_size), 0.5)


def test_register_task_makes_a_configuration_class_a_task():
    assert register_task(WideBlurConfig) is WideBlurConfig and register_task(WideBlurConfig) is WideBlurConfig
    task = make_task("wide-blur", student_sigma=1.5)
    assert task.config.student_sigma == 1.5 and "wide-blur" in repr(task)  # describe() has a default


def test_register_task_refusals():
    @dataclasses.dataclass
    class NoTeacher(TaskConfig):
        name = "no-teacher"

        def build_student(self):
            return gaussian_blur_operator(SHAPE, 1.0)

    @dataclasses.dataclass
    class Random(WideBlurConfig):
        name = "random-blur"

        def build_student(self):  # a new width on every call: runs could not be rebuilt
            return gaussian_blur_operator((1, 16, 16), 2 + float(torch.rand(())))

    @dataclasses.dataclass
    class Swapped(WideBlurConfig):
        name = "swapped"
        student_sigma: float = 0.25

    with pytest.raises(TaskError, match="NoTeacher must implement build_teacher"):
        register_task(NoTeacher)
    with pytest.raises(TaskError, match=r"Random.build_student\(\) built another operator on its second call"):
        register_task(Random)
    with pytest.raises(TaskError, match="not better posed"):
        register_task(Swapped)
    with pytest.raises(TaskError, match="dataclass subclass of d2gp.tasks.TaskConfig"):
        register_task(dict)
    register_task(WideBlurConfig)
    with pytest.raises(TaskError, match="already registered"):
        register_task(dataclasses.dataclass(type("Other", (WideBlurConfig,), {})))


# --- training, evaluating, saving, reloading, resuming ---------------------------------------------
def test_the_pair_trains_evaluates_reloads_resumes_and_is_evaluated_again_from_its_run(tiny_denoiser, tmp_path,
                                                                                      monkeypatch):
    task = _register(tiny_denoiser)
    config = _config(val_every=1)
    straight = tmp_path / "straight"
    summary = train(config, straight, progress=False)  # the task found by name, its data from the dataset
    assert summary["updates"] == 2 and summary["step_size"] == pytest.approx(task.student_step_size)
    saved = json.loads((straight / "config.json").read_text())
    assert saved["train"]["task"] == NAME and saved["task"]["operators"] == task.config.to_dict()["operators"]

    first = evaluate_runs([straight], limit=2, progress=False)
    labels = [m["label"] for m in first["results"]["methods"]]
    assert labels == ["student baseline", "D2GP", "teacher (upper bound)"]
    npo, meta = load_npo(straight, make_task(NAME))
    assert meta["task"] == NAME and meta["step_size"] is None  # trained at the task's own step

    calls = {"n": 0}  # killed in its second validation, then resumed: the same weights
    original = training.evaluate_solver

    def dies_in_second_validation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_solver", dies_in_second_validation)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", progress=False)
    monkeypatch.setattr(training, "evaluate_solver", original)
    train(config, tmp_path / "killed", resume=True, progress=False)
    a, b = (load_checkpoint(d / "last.pt")["state_dict"] for d in (straight, tmp_path / "killed"))
    assert all(torch.equal(a[key], b[key]) for key in a)

    del TASKS[NAME]  # a new session: the pair is not registered yet
    with pytest.raises(TaskError, match=f"unknown task '{NAME}'.*registered in this process first"):
        evaluate_runs([straight], limit=2, progress=False)
    _register(tiny_denoiser)  # the same own_task call as before
    again = evaluate_runs([straight], limit=2, out=tmp_path / "again", progress=False)
    assert [m["psnr_per_iteration"] for m in again["results"]["methods"]] == \
        [m["psnr_per_iteration"] for m in first["results"]["methods"]]

    own_task(NAME, *_pair(teacher_sigma=0.5), dataset="mnist-embedded", denoiser=str(tiny_denoiser), replace=True)
    with pytest.raises(CheckpointError, match=f"trained on other operators than task '{NAME}' has now"):
        evaluate_runs([straight], limit=2, out=tmp_path / "other", progress=False)


def test_the_command_line_knows_the_pair_through_import(tiny_denoiser, tmp_path, monkeypatch, capsys):
    module = tmp_path / "my_blur_pair.py"
    module.write_text(textwrap.dedent(f"""
        from d2gp.tasks import gaussian_blur_operator, own_task, teacher_of

        student = gaussian_blur_operator((1, 16, 16), 3.0)
        own_task("{NAME}", student, teacher_of(student, sigma=1.0), dataset="mnist-embedded",
                 denoiser={str(tiny_denoiser)!r})
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_blur_pair", raising=False)
    tiny = ["--train-images", "4", "--val-images", "2", "--updates", "2", "--iterations", "3", "--batch-size", "2",
            "--width", "8", "--blocks", "1"]
    with pytest.raises(SystemExit):  # argparse's choices: the task is not known without its module
        main(["train", "--task", NAME, *tiny, "--out", "run"])
    assert f"invalid choice: '{NAME}'" in capsys.readouterr().err
    assert main(["--import", "my_blur_pair", "train", "--task", NAME, *tiny, "--out", "run"]) == 0
    del TASKS[NAME]
    sys.modules.pop("my_blur_pair")
    assert main(["evaluate", "run", "--limit", "2"]) == 2
    assert f"unknown task '{NAME}'" in capsys.readouterr().err
    assert main(["--import", "my_blur_pair", "evaluate", "run", "--limit", "2"]) == 0
    assert "| D2GP |" in capsys.readouterr().out
    assert main(["--import", "no_such_module_here", "tasks"]) == 2
    assert "--import no_such_module_here: ModuleNotFoundError" in capsys.readouterr().err


def test_train_refuses_a_task_its_run_could_not_rebuild(tiny_denoiser, tmp_path):
    task = _register(tiny_denoiser)
    with pytest.raises(TrainingError, match=f"TrainConfig.task is 'spc' but the task given is '{NAME}'"):
        train(_config(task="spc"), tmp_path / "a", task=task, progress=False)
    noisier = make_task(NAME, noise_sigma=0.05)
    with pytest.raises(TrainingError, match=r"differs from TrainConfig.task_settings in noise_sigma \(noise_sigma=0.05\)"):
        train(_config(), tmp_path / "b", task=noisier, progress=False)

    @dataclasses.dataclass
    class Unregistered(WideBlurConfig):
        name = "unregistered"

    with pytest.raises(TrainingError, match="task 'unregistered' is not registered: register its configuration"):
        train(_config(task="unregistered"), tmp_path / "c", task=Task(Unregistered()), progress=False)
    assert not any((tmp_path / run / "config.json").exists() for run in "abc")  # refused before writing

"""Tasks: pairs of (student, teacher) linear operators, with their data and defaults.

>>> from d2gp.tasks import make_task
>>> task = make_task("spc", student_ratio=0.05)
>>> task.student.m, task.teacher.m
(51, 512)
"""

from __future__ import annotations

import dataclasses
import re

from d2gp.tasks.base import Task, TaskConfig, TaskError
from d2gp.tasks.mri import CartesianMRI, MRIConfig
from d2gp.tasks.own import OwnTaskConfig, check_pair, gaussian_blur_operator, operator_fingerprint, own_task, teacher_of
from d2gp.tasks.spc import HadamardSPC, SPCBinaryConfig, SPCConfig
from d2gp.tasks.sr import SRConfig

__all__ = [
    "TASKS", "BUILT_IN_TASKS", "Task", "TaskConfig", "TaskError", "make_task", "task_config", "register_task",
    "own_task", "teacher_of", "check_pair", "gaussian_blur_operator", "OwnTaskConfig",
    "SPCConfig", "SPCBinaryConfig", "MRIConfig", "SRConfig", "HadamardSPC", "CartesianMRI",
]

#: Registry of task names and their configuration classes (add yours with :func:`register_task`).
TASKS: dict[str, type[TaskConfig]] = {cls.name: cls for cls in (SPCConfig, MRIConfig, SRConfig, SPCBinaryConfig)}
#: The tasks that come with d2gp: their names cannot be registered again.
BUILT_IN_TASKS = frozenset(TASKS)
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


def register_task(cls: type[TaskConfig] | None = None, *, replace: bool = False, check: bool = True):
    """Register a task configuration class of your own under its ``name`` (usable as a decorator).

    Then ``make_task(name)``, ``TrainConfig(task=name)``, :func:`d2gp.apps.evaluate_runs` of its
    runs, ``load_npo`` and the ``d2gp`` command (``d2gp --import MODULE …`` with the module that
    registers it) find it like a built-in task. Registering the same class again does nothing.

    :param cls: a dataclass subclass of :class:`TaskConfig` (see its documentation) that sets
        ``name`` and implements ``build_student`` and ``build_teacher``.
    :param replace: replace another class registered under the same name (never a built-in task).
    :param check: build the default configuration's operators twice and check them: the same
        operators on both calls, and a valid pair (:func:`~d2gp.tasks.own.check_pair`).
    :return: ``cls``.
    :raises TaskError: naming what is missing or wrong.
    """
    if cls is None:
        return lambda c: register_task(c, replace=replace, check=check)
    if not (isinstance(cls, type) and issubclass(cls, TaskConfig) and dataclasses.is_dataclass(cls)):
        raise TaskError(f"register_task takes a dataclass subclass of d2gp.tasks.TaskConfig, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TaskError(f"{cls.__name__}.name must be a lower-case name of letters, digits, '-' and '_', got {name!r}")
    for method in ("build_student", "build_teacher"):
        if getattr(cls, method) is getattr(TaskConfig, method):
            raise TaskError(f"{cls.__name__} must implement {method}()")
    existing = TASKS.get(name)
    if existing is cls:
        return cls
    if name in BUILT_IN_TASKS:
        raise TaskError(f"{name!r} is a built-in task: give {cls.__name__} another name")
    if existing is not None and not replace:
        raise TaskError(f"task {name!r} is already registered ({existing.__qualname__}); pass replace=True to replace it")
    if check:
        try:
            config = cls()
        except TypeError as error:
            raise TaskError(f"{cls.__name__}() must build with its defaults (every setting needs one): {error}") from None
        config.validate()
        shape = (cls.channels, config.image_size, config.image_size)
        student, teacher = config.build_student(), config.build_teacher()
        check_pair(student, teacher, shape)
        for role, first, again in (("student", student, config.build_student()),
                                   ("teacher", teacher, config.build_teacher())):
            if operator_fingerprint(first, shape) != operator_fingerprint(again, shape):
                raise TaskError(f"{cls.__name__}.build_{role}() built another operator on its second call: it must "
                                f"build the same one every time (seed its random parts), or runs cannot be rebuilt")
    TASKS[name] = cls
    return cls


def task_config(name: str, **overrides) -> TaskConfig:
    """The configuration of task ``name`` with ``overrides`` applied (``None`` values ignored)."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(TASKS)} (a task of your own must be "
                        f"registered in this process first: register_task or own_task in Python, "
                        f"`d2gp --import MODULE` on the command line)")
    cls = TASKS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TaskError(f"task {name!r} has no setting {', '.join(unknown)}; its settings are {', '.join(sorted(known))}")
    return cls(**{k: v for k, v in overrides.items() if v is not None})


def make_task(name: str, device: str | None = "cpu", **overrides) -> Task:
    """Build task ``name`` (``"spc"``, ``"mri"``, ``"sr"``, or one registered with :func:`register_task`) with its defaults and ``overrides``, its
    operators on ``device`` (``"cpu"``, ``"cuda"`` or ``"auto"``: see :mod:`d2gp.device`)."""
    return Task(task_config(name, **overrides), device=device)

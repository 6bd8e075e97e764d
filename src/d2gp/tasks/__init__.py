"""Tasks: pairs of (student, teacher) linear operators, with their data and defaults.

>>> from d2gp.tasks import make_task
>>> task = make_task("spc", student_ratio=0.05)
>>> task.student.m, task.teacher.m
(51, 512)
"""

from __future__ import annotations

import dataclasses

from d2gp.tasks.base import Task, TaskConfig, TaskError
from d2gp.tasks.mri import CartesianMRI, MRIConfig
from d2gp.tasks.spc import HadamardSPC, SPCBinaryConfig, SPCConfig
from d2gp.tasks.sr import SRConfig

__all__ = [
    "TASKS", "Task", "TaskConfig", "TaskError", "make_task", "task_config",
    "SPCConfig", "SPCBinaryConfig", "MRIConfig", "SRConfig", "HadamardSPC", "CartesianMRI",
]

#: Registry of task names and their configuration classes.
TASKS: dict[str, type[TaskConfig]] = {cls.name: cls for cls in (SPCConfig, MRIConfig, SRConfig, SPCBinaryConfig)}


def task_config(name: str, **overrides) -> TaskConfig:
    """The configuration of task ``name`` with ``overrides`` applied (``None`` values ignored)."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    cls = TASKS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TaskError(f"task {name!r} has no setting {', '.join(unknown)}; its settings are {', '.join(sorted(known))}")
    return cls(**{k: v for k, v in overrides.items() if v is not None})


def make_task(name: str, device: str | None = "cpu", **overrides) -> Task:
    """Build task ``name`` (``"spc"``, ``"mri"``, ``"sr"``) with its defaults and ``overrides``, its
    operators on ``device`` (``"cpu"``, ``"cuda"`` or ``"auto"``: see :mod:`d2gp.device`)."""
    return Task(task_config(name, **overrides), device=device)

"""Weights files of trained preconditioners: the format, saving, loading, the shipped ones.

A weights file is a dict saved with :func:`d2gp.checkpoints.atomic_save` (CPU tensors only, so it
loads on any machine) and loaded with ``weights_only=True``::

    {"format": "d2gp-npo", "kind": "npo" | "scalar" | "pointwise" | "convolutional" | "full",
     "npo": {constructor arguments}, "state_dict": {...}, "task": name, "task_config": {...},
     "method": ..., "iterations": K, "train_config": {...}, "step_size": γ | None,
     ...extra (val_psnr, update, ...),
     "base": {"method", "candidate", "step_size", "gain", ...}}   # only for a refined preconditioner

A :class:`~d2gp.preconditioners.refined.Refined` preconditioner is saved as its learned part, with
the ``base`` entry that rebuilds its classical base from the task (so loading it needs the task).

``step_size`` is the student's step the preconditioner was trained with (``None``: the task's own
student step, 1/L); :func:`trained_step_size` reads it back, for every evaluation must run the
preconditioner with it. Files written before ``kind`` existed hold NPOs; files without
``step_size`` were trained with the task's step; :func:`trained_algorithm` reads the host algorithm
(``train_config["algorithm"]``, ``"fista"`` in files before it existed). The training loop (:mod:`d2gp.training`) writes
them; :func:`load_npo` reads them for evaluation, ``d2gp reconstruct`` and the benchmarks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from d2gp.checkpoints import CheckpointError, atomic_save, load_checkpoint, require_entries
from d2gp.device import to_cpu
from d2gp.preconditioners.learned_linear import build_linear
from d2gp.preconditioners.npo import NPO
from d2gp.preconditioners.refined import Refined, build_base
from d2gp.solver import ALGORITHMS
from d2gp.tasks.own import same_operators

__all__ = ["NPO_FORMAT", "save_npo", "load_npo", "shipped_npo_path", "rebuild", "trained_step_size", "trained_algorithm"]

NPO_FORMAT = "d2gp-npo"

#: Methods whose trained NPO may be shipped inside the package (``load_npo("d2gp", task)``).
SHIPPED_METHODS = ("d2gp", "supervised", "objective")


def rebuild(kind: str, architecture: dict) -> torch.nn.Module:
    """An untrained preconditioner of ``kind`` with the constructor arguments ``architecture``."""
    return NPO(**architecture) if kind == "npo" else build_linear(kind, **architecture)


def _refined(learned: torch.nn.Module, spec, task, path: Path) -> Refined:
    """The refined preconditioner of a weights file's ``base`` entry, its base rebuilt for ``task``."""
    if task is None:
        raise CheckpointError(f"{path} holds a preconditioner refined on top of a classical one ({spec.get('method') if isinstance(spec, dict) else spec}): "
                              f"load it with its task, load_npo(path, task), to rebuild that base")
    if not isinstance(spec, dict) or not {"method", "candidate", "gain"} <= set(spec):
        raise CheckpointError(f"{path}: its 'base' entry {spec!r} lacks method, candidate or gain")
    try:
        return Refined(build_base(spec, task), learned, spec["gain"], spec)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot rebuild its base preconditioner {spec}: {error}") from None


def save_npo(npo: torch.nn.Module, path: str | os.PathLike, task, config, extra: dict | None = None) -> None:
    """Save a trained preconditioner (an NPO or a learned linear one: ``kind``) with its metadata.

    :param npo: the preconditioner (on any device: the file holds CPU tensors).
    :param task: the :class:`~d2gp.tasks.Task` it was trained for.
    :param config: its :class:`~d2gp.training.TrainConfig`.
    :param extra: more entries (validation PSNR, update count, the training ``step_size``, …).
    """
    base = {"base": dict(npo.base_spec)} if isinstance(npo, Refined) else {}
    learned = npo.learned if isinstance(npo, Refined) else npo
    atomic_save({
        "format": NPO_FORMAT, "task": task.name, "task_config": task.config.to_dict(),
        "kind": getattr(learned, "kind", "npo"), "npo": dict(learned.config), "state_dict": to_cpu(learned.state_dict()),
        "method": config.method, "iterations": config.iterations, "train_config": config.to_dict(), **base,
        **(extra or {}),
    }, path)


def shipped_npo_path(task: str, method: str = "d2gp") -> Path:
    """Where the NPO trained with ``method`` for the default ``task`` lies inside the package."""
    from importlib import resources

    return Path(str(resources.files("d2gp") / "weights" / f"npo_{task}_{method}.pt"))


def trained_step_size(meta: dict, task) -> float:
    """The student's step γ to run a loaded preconditioner with: the one it was trained with (``meta``
    from :func:`load_npo`), else — files before it was recorded, runs at the task's step — the task's."""
    step = meta.get("step_size")
    return float(step) if step is not None else task.student_step_size


def trained_algorithm(meta: dict) -> str:
    """The host algorithm a loaded preconditioner was trained in (``meta`` from :func:`load_npo`): its
    ``train_config``'s ``algorithm``, else — files before it was recorded, the shipped NPOs — ``"fista"``.

    :raises CheckpointError: the file records an algorithm this version does not know.
    """
    config = meta.get("train_config")
    algorithm = config.get("algorithm", "fista") if isinstance(config, dict) else "fista"
    if algorithm not in ALGORITHMS:
        raise CheckpointError(f"the preconditioner was trained in the algorithm {algorithm!r}, which this version does not "
                              f"know (it knows {', '.join(ALGORITHMS)})")
    return algorithm


def load_npo(source: str | os.PathLike, task=None, device: str | torch.device | None = None) -> tuple[torch.nn.Module, dict]:
    """Load a trained preconditioner; with ``task``, refuse one trained for another task or image channels.

    :param source: a weights file, a training run directory (its ``best.pt``), or — with
        ``task`` — a method name (``"d2gp"``, ``"supervised"``) for the weights shipped for it.
        A refined preconditioner (a ``base`` entry) needs ``task``: its base is rebuilt from it.
    :param device: where to put it (default: the task's device, else the CPU).
    :return: the preconditioner (eval mode) and the file's metadata (method, iterations, task_config, …).
    """
    path = Path(source)
    if str(source) in SHIPPED_METHODS and task is not None and not path.exists():
        path = shipped_npo_path(task.name, str(source))
        if not path.is_file():
            raise CheckpointError(f"no {source} NPO is shipped for task {task.name!r}; train one with "
                                  f"`d2gp train --task {task.name} --method {source}`")
    elif path.is_dir():
        path = path / "best.pt"
    data = load_checkpoint(path, NPO_FORMAT, what="NPO weights file")
    require_entries(data, {"task": str, "npo": dict, "state_dict": dict, "method": str}, path, "NPO weights file")
    step = data.get("step_size")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))
                             or not (step > 0 and math.isfinite(step))):
        raise CheckpointError(f"NPO weights file {path} records the training step size {step!r}, not a number > 0")
    if task is not None:
        if data["task"] != task.name:
            raise CheckpointError(f"NPO weights {path} were trained for task {data['task']!r}, not {task.name!r}")
        channels = data["npo"].get("channels", 1)
        if channels != task.image_shape[0]:
            raise CheckpointError(f"NPO weights {path} work on {channels}-channel images, the task has {task.image_shape[0]}")
        recorded = data.get("task_config", {}).get("operators") if isinstance(data.get("task_config"), dict) else None
        if recorded is not None and not same_operators(recorded, task.config.to_dict().get("operators")):
            raise CheckpointError(f"NPO weights {path} were trained on other operators than task {task.name!r} has now: "
                                  f"register the pair it was trained on (the same own_task call)")
    kind = data.get("kind", "npo")
    try:
        npo = rebuild(kind, data["npo"])
        npo.load_state_dict(data["state_dict"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"weights {path} do not fit the {kind} architecture {data['npo']}: {str(error)[:200]}") from None
    if "base" in data:
        npo = _refined(npo, data["base"], task, path)
    meta = {**{k: v for k, v in data.items() if k != "state_dict"}, "kind": kind}  # files before "kind": NPOs
    if device is None:
        device = task.device if task is not None else "cpu"
    return npo.to(device).eval(), meta

r"""Bilevel training of the NPO (Algorithm 2 of D2GP): run directories, checkpoints, resume.

One training step on a batch x:

1. measure it with both operators, y_s = A_s x + e, y_t = A_t x + e;
2. run the teacher's plain PnP-FISTA (no autograd: the teacher has no parameters);
3. run the student's PnP-FISTA preconditioned by P_θ with autograd through the K iterations
   (``unroll``: ``full`` backpropagation, ``checkpoint`` — the same gradients with per-iteration
   recomputation, less memory — or ``truncated``: only the last ``truncate`` iterations);
4. L = λ_g L_g + λ_i L_i + λ_s L_s (:mod:`d2gp.losses`), one Adam/AdamW step.

``method="supervised"`` trains the same NPO with L_s alone (no teacher); ``method="objective"``
with the objective-decrease loss of Ehrhardt et al. (:func:`~d2gp.preconditioners.objective_loss`).
``preconditioner`` picks what is trained: the ``"npo"`` (default) or one of the learned linear
preconditioners (``"scalar"``, ``"pointwise"``, ``"convolutional"``, ``"full"``), with any method.

A run directory holds ``config.json`` (everything needed to reproduce it, with the command,
machine and date), ``checkpoint.pt`` (the full training state, written atomically after every
epoch), ``best.pt`` (the NPO with the best validation PSNR), ``log.csv`` and, optionally,
TensorBoard events. ``resume=True`` continues a killed run from its last epoch and gives the
same weights as an uninterrupted run. A NaN/Inf loss stops training with a
:class:`TrainingError`; the last good checkpoint stays intact.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from d2gp.checkpoints import (
    CheckpointError, atomic_save, atomic_write_text, load_checkpoint, restore_training_state, save_training_state,
    seed_everything, write_json,
)
from d2gp.evaluation import evaluate_solver
from d2gp.losses import TEACHER_GRADIENT_AT, LossWeights, gradient_loss, imitation_loss, supervised_loss
from d2gp.preconditioners import NPO
from d2gp.preconditioners.learned_linear import LINEAR_PRECONDITIONERS, build_linear, objective_loss
from d2gp.reports import environment
from d2gp.solver import pnp_fista
from d2gp.tasks import Task, make_task

__all__ = ["TrainConfig", "TrainingError", "train", "saved_train_config", "load_npo", "save_npo", "shipped_npo_path", "build_preconditioner",
           "NPO_FORMAT", "METHODS", "PRECONDITIONERS", "UNROLL_MODES", "DEFAULT_LR"]

NPO_FORMAT = "d2gp-npo"
_STATE_FORMAT = "d2gp-npo-training"
METHODS = ("d2gp", "supervised", "objective")
PRECONDITIONERS = ("npo", *LINEAR_PRECONDITIONERS)
UNROLL_MODES = ("full", "checkpoint", "truncated")

#: Default learning rate of each preconditioner (``TrainConfig.lr = None``), chosen on the validation
#: split by ``benchmarks/linear_lr.py`` (SPC, MRI, and SR for ``full``). Adam moves every parameter by
#: about ``lr`` per step: 1e-3 suits the NPO but barely moves a scalar step or a diagonal of ones in a
#: short budget, while a dense n×n matrix's operator norm can move by about n·lr per step — 1e-3 is
#: best for it on 32×32 SPC (n = 1024) but diverges on 64×64 MRI (n = 4096), where 1e-5 is best.
DEFAULT_LR = {"npo": 1e-3, "scalar": 3e-2, "pointwise": 3e-2, "convolutional": 1e-3, "full": 1e-5}


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a run directory that does not match, …)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the run directory)."""

    task: str = "spc"
    task_settings: dict[str, Any] = field(default_factory=dict)
    method: str = "d2gp"
    iterations: int = 20
    epochs: int = 6
    batch_size: int = 32
    train_images: int | None = 1000
    val_images: int = 64
    optimizer: str = "adam"
    lr: float | None = None  # None: the preconditioner's default, see DEFAULT_LR
    weight_decay: float = 0.0
    lambda_gradient: float = 1.0
    lambda_imitation: float = 300.0
    lambda_supervised: float = 300.0
    teacher_gradient: str = "student"
    unroll: str = "full"
    truncate: int = 5
    autocast: bool = False
    npo: dict[str, Any] = field(default_factory=dict)
    preconditioner: str = "npo"
    linear: dict[str, Any] = field(default_factory=dict)
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    seed: int = 0
    tensorboard: bool = False

    def validate(self) -> None:
        if self.method not in METHODS:
            raise TrainingError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.preconditioner not in PRECONDITIONERS:
            raise TrainingError(f"unknown preconditioner {self.preconditioner!r}; choose one of {', '.join(PRECONDITIONERS)}")
        if self.unroll not in UNROLL_MODES:
            raise TrainingError(f"unknown unroll mode {self.unroll!r}; choose one of {', '.join(UNROLL_MODES)}")
        if self.teacher_gradient not in TEACHER_GRADIENT_AT:
            raise TrainingError(f"teacher_gradient must be one of {', '.join(TEACHER_GRADIENT_AT)}")
        if self.optimizer not in ("adam", "adamw"):
            raise TrainingError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        for name in ("iterations", "epochs", "batch_size", "val_images"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.unroll == "truncated" and not 1 <= self.truncate <= self.iterations:
            raise TrainingError(f"truncate must be in [1, iterations], got {self.truncate}")
        if self.lr is not None and not self.lr > 0:
            raise TrainingError(f"lr must be > 0, got {self.lr}")
        self.weights  # validates the λ

    @property
    def weights(self) -> LossWeights:
        """λ_g, λ_i, λ_s (``objective`` uses none of them: its own loss)."""
        if self.method in ("supervised", "objective"):
            return LossWeights(gradient=0.0, imitation=0.0, supervised=self.lambda_supervised or 1.0)
        return LossWeights(self.lambda_gradient, self.lambda_imitation, self.lambda_supervised)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` as it reads back from ``config.json`` (tuples become lists…), for comparisons.

        An ``lr`` equal to the preconditioner's fixed default compares as ``None`` (the default):
        runs saved before ``lr=None`` existed wrote the NPO's 1e-3 out.
        """
        data = json.loads(json.dumps(self.to_dict()))
        if data["lr"] == DEFAULT_LR.get(self.preconditioner):
            data["lr"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- NPO weights files --------------------------------------------------------------------------
def build_preconditioner(config: TrainConfig, task: Task) -> torch.nn.Module:
    """The untrained preconditioner of ``config`` for ``task``'s images (identity at init)."""
    channels = task.image_shape[0]
    if config.preconditioner == "npo":
        return NPO(**{"channels": channels, **config.npo})
    try:
        return build_linear(config.preconditioner, channels, tuple(task.image_shape[1:]), config.iterations,
                            **config.linear)
    except ValueError as error:
        raise TrainingError(str(error)) from None


def _rebuild(kind: str, architecture: dict) -> torch.nn.Module:
    return NPO(**architecture) if kind == "npo" else build_linear(kind, **architecture)


def save_npo(npo: torch.nn.Module, path: str | os.PathLike, task: Task, config: TrainConfig,
             extra: dict | None = None) -> None:
    """Save a trained preconditioner (an NPO or a learned linear one: ``kind``) with its metadata."""
    atomic_save({
        "format": NPO_FORMAT, "task": task.name, "task_config": task.config.to_dict(),
        "kind": getattr(npo, "kind", "npo"), "npo": dict(npo.config),
        "state_dict": {k: v.detach().clone() for k, v in npo.state_dict().items()},
        "method": config.method, "iterations": config.iterations, "train_config": config.to_dict(), **(extra or {}),
    }, path)


def shipped_npo_path(task: str, method: str = "d2gp") -> Path:
    """Where the NPO trained with ``method`` for the default ``task`` lies inside the package."""
    from importlib import resources

    return Path(str(resources.files("d2gp") / "weights" / f"npo_{task}_{method}.pt"))


def load_npo(source: str | os.PathLike, task: Task | None = None) -> tuple[NPO, dict]:
    """Load an NPO; with ``task``, refuse one trained for another task or image channels.

    :param source: a weights file, a training run directory (its ``best.pt``), or — with
        ``task`` — a method name (``"d2gp"``, ``"supervised"``) for the weights shipped for it.
    :return: the NPO (eval mode) and the file's metadata (method, iterations, task_config, …).
    """
    path = Path(source)
    if str(source) in METHODS and task is not None and not path.exists():
        path = shipped_npo_path(task.name, str(source))
        if not path.is_file():
            raise CheckpointError(f"no {source} NPO is shipped for task {task.name!r}; train one with "
                                  f"`d2gp train --task {task.name} --method {source}`")
    elif path.is_dir():
        path = path / "best.pt"
    data = load_checkpoint(path, NPO_FORMAT, what="NPO weights file")
    if task is not None:
        if data["task"] != task.name:
            raise CheckpointError(f"NPO weights {path} were trained for task {data['task']!r}, not {task.name!r}")
        channels = data["npo"].get("channels", 1)
        if channels != task.image_shape[0]:
            raise CheckpointError(f"NPO weights {path} work on {channels}-channel images, the task has {task.image_shape[0]}")
    kind = data.get("kind", "npo")
    try:
        npo = _rebuild(kind, data["npo"])
        npo.load_state_dict(data["state_dict"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"weights {path} do not fit the {kind} architecture {data['npo']}: {str(error)[:200]}") from None
    meta = {**{k: v for k, v in data.items() if k != "state_dict"}, "kind": kind}  # files before "kind": NPOs
    return npo.eval(), meta


# --- the training loop --------------------------------------------------------------------------
def _build_optimizer(config: TrainConfig, npo: torch.nn.Module):
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.preconditioner]
    return cls(npo.parameters(), lr=lr, weight_decay=config.weight_decay)


def _loss(config: TrainConfig, task: Task, npo: NPO, denoiser, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    """The training loss on one batch and its terms (floats, for the log)."""
    weights, K = config.weights, config.iterations
    y_s, y_t = task.measure(x, seed=seed)
    gamma_s, gamma_t = task.student_step_size, task.teacher_step_size
    grad_from = K - config.truncate if config.unroll == "truncated" else 0
    if config.method == "objective":
        _, trace = pnp_fista(task.student, y_s, denoiser, gamma_s, K, npo, trace=True,
                             checkpoint=config.unroll == "checkpoint", autocast=config.autocast, grad_from=grad_from)
        loss = objective_loss(task.student, trace, y_s)
        return loss, {"objective": loss.item()}
    teacher_out = teacher_trace = None
    if weights.needs_teacher:
        with torch.no_grad():
            teacher_out, teacher_trace = pnp_fista(task.teacher, y_t, denoiser, gamma_t, K, trace=True,
                                                   autocast=config.autocast)
    student_out, student_trace = pnp_fista(task.student, y_s, denoiser, gamma_s, K, npo, trace=True,
                                           checkpoint=config.unroll == "checkpoint", autocast=config.autocast,
                                           grad_from=grad_from)
    terms: dict[str, torch.Tensor] = {}
    if weights.gradient > 0:
        A_s, A_t = task.student, task.teacher
        if config.teacher_gradient == "student":
            predicted = student_trace.preconditioned
            with torch.no_grad():
                targets = [A_t.A_adjoint(A_t.A(z) - y_t) for z in student_trace.z]
        else:
            targets = teacher_trace.grad
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=config.autocast):
                predicted = [npo(A_s.A_adjoint(A_s.A(z) - y_s), k, **({"iterate": z} if npo.uses_iterate else {}))
                             for k, z in enumerate(teacher_trace.z)]
        terms["gradient"] = gradient_loss(predicted, targets)
    if weights.imitation > 0:
        terms["imitation"] = imitation_loss(student_out, teacher_out)
    if weights.supervised > 0:
        terms["supervised"] = supervised_loss(student_out, x)
    loss = sum(getattr(weights, name) * value for name, value in terms.items())
    return loss, {name: value.item() for name, value in terms.items()}


def saved_train_config(run_dir: str | os.PathLike) -> dict:
    """The run's saved training configuration, as :meth:`TrainConfig.to_json_dict` gives it today
    (fields added since the run was made take their defaults, so older runs still match)."""
    saved = json.loads((Path(run_dir) / "config.json").read_text())["train"]
    return TrainConfig.from_dict(saved).to_json_dict()


def _check_run_dir(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    saved = run_dir / "config.json"
    if (run_dir / "checkpoint.pt").exists():
        if not resume:
            raise TrainingError(f"{run_dir} already holds a training run: pass resume=True (--resume) to continue it, "
                                f"or choose another directory")
        if saved.is_file():
            previous, current = saved_train_config(run_dir), config.to_json_dict()
            if previous != current:
                changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
                raise TrainingError(f"cannot resume {run_dir}: its configuration differs in {', '.join(changed)}")


def _write_log(history: list[dict], path: Path) -> None:
    if not history:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[-1]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(buffer.getvalue(), path)


def train(config: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          task: Task | None = None, train_images: torch.Tensor | None = None,
          val_images: torch.Tensor | None = None) -> dict:
    """Train an NPO; returns the summary (best validation PSNR, epochs, seconds, paths).

    :param config: the run's settings.
    :param run_dir: its directory (created).
    :param resume: continue the run found in ``run_dir``.
    :param task, train_images, val_images: for tests and the Python API: give them directly
        instead of building them from ``config`` (the run is then reproducible only with the same ones).
    """
    config.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_run_dir(run_dir, config, resume)
    task = task or make_task(config.task, **config.task_settings)
    if train_images is None:
        train_images = task.images("train", limit=config.train_images)
    if val_images is None:
        val_images = task.images("val", limit=config.val_images)
    write_json({"train": config.to_dict(), "task": task.config.to_dict(), "environment": environment(),
                "data": {"train": len(train_images), "val": len(val_images), "dataset": task.dataset},
                "step_size": {"student": task.student_step_size, "teacher": task.teacher_step_size}},
               run_dir / "config.json")

    seed_everything(config.seed)
    denoiser = task.denoiser().requires_grad_(False)
    npo = build_preconditioner(config, task)
    optimizer = _build_optimizer(config, npo)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=config.plateau_factor,
                                                           patience=config.plateau_patience)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    best, start_epoch = -math.inf, 0
    state_path = run_dir / "checkpoint.pt"
    if resume and state_path.exists():
        state = restore_training_state(state_path, _STATE_FORMAT, npo, optimizer, scheduler, generator)
        history, best, start_epoch = state["history"], state["best"], state["epoch"]

    writer = _tensorboard(run_dir) if config.tensorboard else None
    steps = math.ceil(len(train_images) / config.batch_size)
    began = time.perf_counter()
    val_psnr = history[-1]["val_psnr"] if history else float("nan")
    for epoch in range(start_epoch, config.epochs):
        npo.train()
        order = torch.randperm(len(train_images), generator=generator)
        sums: dict[str, float] = {}
        epoch_began = time.perf_counter()
        bar = tqdm(range(steps), desc=f"{config.method} {task.name} epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, leave=False)
        for step in bar:
            x = train_images[order[step * config.batch_size:(step + 1) * config.batch_size]]
            seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
            loss, terms = _loss(config, task, npo, denoiser, x, seed)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} (terms {terms}); "
                    f"training stopped, the last good checkpoint {state_path} is intact — lower --lr or the λ weights")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in {"loss": loss.item(), **terms}.items():
                sums[name] = sums.get(name, 0.0) + value
            bar.set_postfix(loss=f"{loss.item():.3g}", val_psnr="–" if math.isnan(val_psnr) else f"{val_psnr:.2f}")
        npo.eval()
        run = evaluate_solver("val", task.student, val_images, denoiser, task.student_step_size, config.iterations,
                              preconditioner=npo, progress=False)
        val_psnr = float(run.psnr[config.iterations].mean())
        scheduler.step(val_psnr)
        row = {"epoch": epoch + 1, **{name: value / steps for name, value in sums.items()}, "val_psnr": val_psnr,
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - epoch_began}
        history.append(row)
        if val_psnr > best:
            best = val_psnr
            save_npo(npo, run_dir / "best.pt", task, config, {"val_psnr": val_psnr, "epoch": epoch + 1})
        if progress:
            tqdm.write(f"{config.method} {task.name} epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4g}, "
                       f"val PSNR {val_psnr:.2f} dB (best {best:.2f}), {row['seconds']:.0f} s")
        if writer is not None:
            for name, value in row.items():
                writer.add_scalar(name, value, epoch + 1)
        save_training_state(state_path, _STATE_FORMAT, npo, optimizer, scheduler, generator,
                            history=history, best=best, epoch=epoch + 1)
        _write_log(history, run_dir / "log.csv")
    save_npo(npo, run_dir / "last.pt", task, config, {"val_psnr": val_psnr, "epoch": config.epochs})
    summary = {"best_val_psnr": best, "final_val_psnr": val_psnr, "epochs": config.epochs,
               "seconds_this_session": time.perf_counter() - began,
               "seconds_per_epoch": sum(r["seconds"] for r in history) / max(1, len(history)), "run_dir": str(run_dir)}
    write_json(summary, run_dir / "summary.json")
    return summary


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run_dir / "tensorboard"))

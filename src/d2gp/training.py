r"""Bilevel training of the NPO (Algorithm 2 of D2GP): run directories, checkpoints, resume.

One training update on a batch x:

1. measure it with the student, y_s = A_s x + e (fresh noise every update);
2. the teacher's targets: its measurements y_t and its output x_K^t. They have no parameters,
   so by default (``teacher_cache``) they are computed once per training image, with one
   fixed noise draw per image, before the first update (:class:`TeacherTargets`), instead of
   re-running the teacher's K iterations in every update;
3. run the student's PnP-FISTA (or the host ``algorithm``: ``pgd``, ``hqs``, :func:`d2gp.solver.solve`;
   the teacher's targets come from the same algorithm) preconditioned by P_θ with autograd through the K iterations
   (``unroll``: ``full`` backpropagation, ``checkpoint`` — the same gradients with per-iteration
   recomputation, less memory — or ``truncated``: only the last ``truncate`` iterations);
4. L = λ_g L_g + λ_i L_i + λ_s L_s (:mod:`d2gp.losses`); the imitation and supervised terms
   average over the last ``tail`` iterates x_{K−tail+1} … x_K (default min(10, K); ``tail = 1``:
   x_K only, the paper's loss, which teaches a "final jump" that is right at K and ruinous after
   it; a longer tail rewards every late iterate, which keeps the iteration stable past K), each
   compared with the ground truth and with the teacher's x_K^t;
5. one Adam/AdamW step, after clipping the gradient norm to ``grad_clip``.

The budget is counted in updates (``updates``, else ``epochs`` passes over the data). The
learning rate follows ``schedule``: ``cosine`` (linear warm-up over ``warmup`` updates, then a
cosine decay to ``final_lr_ratio``·lr), ``plateau`` (ReduceLROnPlateau on the validation PSNR)
or ``constant``. The validation PSNR at K is measured every ``val_every`` updates (default: once
per epoch) and at the ``val_points``; the preconditioner with the best one is kept as
``best.pt``, so a long run never ends worse than it was at its best validation point.

``method="supervised"`` trains the same NPO with L_s alone (no teacher); ``method="objective"``
with the objective-decrease loss of Ehrhardt et al. (:func:`~d2gp.preconditioners.objective_loss`).
``preconditioner`` picks what is trained: the ``"npo"`` (default) or one of the learned linear
preconditioners (``"scalar"``, ``"pointwise"``, ``"convolutional"``, ``"full"``), with any method.

A run directory holds ``config.json`` (everything needed to reproduce it, with the command,
machine, device and date), ``checkpoint.pt`` (the full training state, written atomically at
every validation point), ``best.pt``, ``last.pt``, ``log.csv`` (one row per validation point)
and ``summary.json``. ``resume=True`` continues a killed run from its last validation point and
gives the same weights as an uninterrupted run on the same device. A NaN/Inf loss stops
training with a :class:`TrainingError`; the last good checkpoint stays intact. So does a run that
diverged while staying finite (:func:`check_not_diverged`). A run directory is locked while it
trains (:func:`~d2gp.checkpoints.locked_run_dir`): a second process refuses to write into it.

**Several processes** (``torchrun --nproc_per_node N -m d2gp train …``, one per GPU, or a process
group of your own, :mod:`d2gp.distributed`): data-parallel training of one global batch of
``batch_size`` images. Every process draws the same data order and noise seeds from the same
seeded generator and takes its contiguous share of each update's batch (shares differ by one at
most; :func:`check_batch_split` refuses a batch that leaves a process without an image); its
images get the noise they get in one process (``measure(..., offset=start of its share)``). Its
loss is weighted by its share of the batch and the gradients are summed over the processes (one
all-reduce, as DistributedDataParallel does, done by hand because the solver calls the
preconditioner K times per backward pass and the validation runs it on rank 0 alone), so every
process takes the same optimizer step as one process on the whole batch, up to float rounding.
Each process computes the teacher's cached targets for all the training images (the same numbers
as in one process). Rank 0 alone holds the lock and reads and writes the run directory (config,
checkpoints, best/last, log, summary; it need not be shared between machines) and measures the
validation PSNR; the others get its decisions (:func:`d2gp.distributed.from_rank0`) and raise its
errors. The checkpoint holds the one global training state, so a run resumes with any number of
processes.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from d2gp import distributed
from d2gp.checkpoints import (
    atomic_write_text, load_checkpoint, locked_run_dir, read_json, require_entries, restore_training_state,
    save_training_state, seed_everything, write_json,
)
from d2gp.device import precision, prepare, resolve_device, use_bf16
from d2gp.distributed import from_rank0
from d2gp.evaluation import evaluate_solver, tune_step_size
from d2gp.graphs import GraphedLoss
from d2gp.losses import TEACHER_GRADIENT_AT, LossWeights, gradient_loss, imitation_loss, supervised_loss
from d2gp.preconditioners import NPO
from d2gp.preconditioners.files import NPO_FORMAT, load_npo, save_npo, shipped_npo_path, trained_algorithm, trained_step_size
from d2gp.preconditioners.learned_linear import LINEAR_PRECONDITIONERS, build_linear, objective_loss
from d2gp.preconditioners.refined import Refined, build_base
from d2gp.reports import environment
from d2gp.solver import ALGORITHMS, solve
from d2gp.tasks import Task, make_task
from d2gp.tasks.base import measure
from d2gp.tuning import CLASSICAL_METHODS, tune_classical

__all__ = ["TrainConfig", "TrainingError", "DEFAULT_NPO", "train", "saved_train_config", "load_npo", "save_npo",
           "shipped_npo_path", "build_preconditioner", "untrained_start", "tune_base", "TeacherTargets", "NPO_FORMAT",
           "METHODS", "PRECONDITIONERS", "UNROLL_MODES", "SCHEDULES", "DEFAULT_LR", "check_not_diverged", "DIVERGED_DB",
           "training_step_size", "trained_step_size", "trained_algorithm", "check_task", "check_batch_split"]

_STATE_FORMAT = "d2gp-npo-training"
METHODS = ("d2gp", "supervised", "objective")
PRECONDITIONERS = ("npo", *LINEAR_PRECONDITIONERS)
UNROLL_MODES = ("full", "checkpoint", "truncated")
SCHEDULES = ("cosine", "plateau", "constant")

#: Default learning rate of each preconditioner (``TrainConfig.lr = None``), chosen on the validation
#: split by ``benchmarks/linear_lr.py`` (SPC, MRI, and SR for ``full``). Adam moves every parameter by
#: about ``lr`` per step: 1e-3 suits the NPO but barely moves a scalar step or a diagonal of ones in a
#: short budget, while a dense n×n matrix's operator norm can move by about n·lr per step — 1e-3 is
#: best for it on 32×32 SPC (n = 1024) but diverges on 64×64 MRI (n = 4096), where 1e-5 is best.
DEFAULT_LR = {"npo": 1e-3, "scalar": 3e-2, "pointwise": 3e-2, "convolutional": 1e-3, "full": 1e-5}

#: The NPO settings of a run that does not give its own (``TrainConfig.npo``; ``d2gp train`` puts its
#: flags on top): the default ConvNeXt blocks on a U-Net-shaped trunk over 3 resolutions. Chosen by
#: ``benchmarks/architecture_ablation.py`` (``benchmarks/results/architecture_ablation/``): as good as
#: the plain trunk at K on the {0,1} single-pixel camera (2 seeds) and better on MRI (3 seeds), and
#: 1.4× cheaper per update, with the same 42 k parameters (past K: better on MRI, worse on the
#: camera). ``npo={}`` is the plain trunk, as every run before this default and the shipped NPOs have
#: it (their files record their settings).
DEFAULT_NPO = {"levels": 3}

#: Base of the per-image seeds of the teacher's fixed noise draws (far from the evaluation seeds).
TEACHER_NOISE_SEED = 1 << 30


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a run directory that does not match, …)."""


#: A run whose best validation PSNR ends more than this many dB below the untrained preconditioner's
#: (the identity: plain PnP-FISTA) has diverged. Healthy short runs end within a fraction of a dB
#: of it or above (README, Table I); a too-large learning rate ends tens or hundreds of dB below.
DIVERGED_DB = 3.0


def check_not_diverged(best_val_psnr: float, identity_val_psnr: float, margin_db: float = DIVERGED_DB) -> None:
    """Refuse the outcome of a training run that made PnP-FISTA worse than not training at all.

    :param best_val_psnr: the best validation PSNR of the run (its ``best.pt``).
    :param identity_val_psnr: the validation PSNR of the untrained (identity) preconditioner.
    :param margin_db: how far below ``identity_val_psnr`` a run may end.
    :raises TrainingError: ``best_val_psnr`` is not finite, or below ``identity_val_psnr - margin_db``.
    """
    if not math.isfinite(best_val_psnr) or best_val_psnr < identity_val_psnr - margin_db:
        raise TrainingError(
            f"training diverged: the best validation PSNR {best_val_psnr:.2f} dB is more than {margin_db:g} dB below "
            f"the untrained (identity) preconditioner's {identity_val_psnr:.2f} dB; lower --lr and train again")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the run directory)."""

    task: str = "spc"
    task_settings: dict[str, Any] = field(default_factory=dict)
    method: str = "d2gp"
    iterations: int = 20
    epochs: int = 6
    batch_size: int = 8  # 1.7 GB peak on 32×32 SPC at K = 20 (benchmarks/results/training_speed/batch8)
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
    autocast: bool | None = None  # None: bf16 on CPUs with AMX, else float32 (d2gp.device.use_bf16)
    npo: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_NPO))
    preconditioner: str = "npo"
    linear: dict[str, Any] = field(default_factory=dict)
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    seed: int = 0
    tensorboard: bool = False
    # The budget and its schedule.
    updates: int | None = None  # None: epochs × updates per epoch
    val_every: int | None = None  # None: once per epoch
    val_points: list[int] = field(default_factory=list)  # extra validation points (learning curves)
    schedule: str = "cosine"
    warmup: int = 0
    final_lr_ratio: float = 0.01
    grad_clip: float | None = 1.0
    # What the loss looks at.
    tail: int | None = None  # None: min(10, iterations), see loss_tail
    teacher_cache: bool = True
    # Where the preconditioner starts: None, the identity at γ = 1/L; a non-learned method ("newton", …):
    # the learned part refines that method, tuned on the validation split (see d2gp.preconditioners.refined).
    base: str | None = None
    # The student's step γ that the preconditioner is trained (and evaluated) with.
    step_size: float | None = None  # None: the task's student step (1/L unless its settings give one)
    tune_step: bool = False  # tune γ on the validation split before training (tune_step_size), as the baseline is
    # The host algorithm (d2gp.solver.ALGORITHMS) the student and the teacher run, in training and in every evaluation.
    algorithm: str = "fista"

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise TrainingError(f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
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
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("iterations", "epochs", "batch_size", "val_images"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("updates", "val_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainingError(f"{name} must be ≥ 1 (or unset), got {value}")
        if any(p < 1 for p in self.val_points):
            raise TrainingError(f"val_points must be update counts ≥ 1, got {self.val_points}")
        if self.warmup < 0:
            raise TrainingError(f"warmup must be ≥ 0 updates, got {self.warmup}")
        if self.warmup and self.schedule == "plateau":
            raise TrainingError("warmup needs a per-update schedule: set schedule to cosine or constant")
        if not 0 <= self.final_lr_ratio <= 1:
            raise TrainingError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise TrainingError(f"grad_clip must be > 0 (or unset), got {self.grad_clip}")
        if self.tail is not None and not 1 <= self.tail <= self.iterations:
            raise TrainingError(f"tail must be in [1, iterations = {self.iterations}], got {self.tail}")
        if self.unroll == "truncated" and not 1 <= self.truncate <= self.iterations:
            raise TrainingError(f"truncate must be in [1, iterations], got {self.truncate}")
        if self.unroll == "truncated" and self.tail is not None and self.tail > self.truncate:
            raise TrainingError(f"tail ({self.tail}) must not exceed truncate ({self.truncate}): the loss would "
                                f"look at iterates that no gradient reaches")
        if self.step_size is not None and (isinstance(self.step_size, bool) or not isinstance(self.step_size, (int, float))
                                           or not (self.step_size > 0 and math.isfinite(self.step_size))):
            raise TrainingError(f"step_size must be a finite number > 0 (or unset: the task's 1/L), got {self.step_size!r}")
        if self.base is not None and self.tune_step:
            raise TrainingError(f"give base ({self.base!r}) or tune_step, not both: the base is tuned with its own "
                                f"step (base 'baseline' is the tuned step)")
        if self.tune_step and self.step_size is not None:
            raise TrainingError(f"give step_size ({self.step_size}) or tune_step, not both: tune_step chooses the step")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"lr must be a finite number > 0, got {self.lr}")
        if self.train_images is not None and not (isinstance(self.train_images, int) and self.train_images >= 1):
            raise TrainingError(f"train_images must be ≥ 1, or None for all (--train-images 0), got {self.train_images!r}")
        if self.base is not None and self.base not in CLASSICAL_METHODS:
            raise TrainingError(f"unknown base {self.base!r}; choose one of {', '.join(CLASSICAL_METHODS)} (or none)")
        if self.base is not None and self.method == "objective":
            raise TrainingError("a base preconditioner is for the unrolled losses (d2gp, supervised), not 'objective'")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise TrainingError(f"weight_decay must be a finite number ≥ 0, got {self.weight_decay}")
        try:
            self.weights  # validates the λ
            if self.preconditioner == "npo":
                NPO.check_config(self.npo)
        except ValueError as error:
            raise TrainingError(str(error)) from None

    @property
    def weights(self) -> LossWeights:
        """λ_g, λ_i, λ_s (``objective`` uses none of them: its own loss)."""
        if self.method in ("supervised", "objective"):
            return LossWeights(gradient=0.0, imitation=0.0, supervised=self.lambda_supervised or 1.0)
        return LossWeights(self.lambda_gradient, self.lambda_imitation, self.lambda_supervised)

    @property
    def loss_tail(self) -> int:
        """How many of the last iterates the loss averages over: ``tail``, by default min(10, K) (and
        no more than the iterations a truncated unroll backpropagates through)."""
        if self.tail is not None:
            return self.tail
        return min(10, self.iterations, self.truncate if self.unroll == "truncated" else self.iterations)

    @property
    def learning_rate(self) -> float:
        """``lr``, or the preconditioner's default (:data:`DEFAULT_LR`)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.preconditioner]

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


def training_step_size(config: TrainConfig, task: Task) -> float:
    """The student's step γ a preconditioner is trained with: ``config.step_size``, else the task's
    student step (1/‖A_sᵀA_s‖ unless the task's settings give one)."""
    return config.step_size if config.step_size is not None else task.student_step_size


def check_task(config: TrainConfig, task: Task) -> None:
    """Refuse a task given to :func:`train` that the run directory could not rebuild: another name than
    ``config.task``, a class that is not registered under it, or settings that ``config.task_settings``
    does not give (the run is evaluated and resumed on ``make_task(config.task, **config.task_settings)``).

    :raises TrainingError: naming what differs.
    """
    from d2gp.tasks import TASKS, task_config

    if config.task != task.name:
        raise TrainingError(f"TrainConfig.task is {config.task!r} but the task given is {task.name!r}: set "
                            f"TrainConfig(task={task.name!r}, ...), the name its runs are rebuilt from")
    if TASKS.get(task.name) is not type(task.config):
        raise TrainingError(f"task {task.name!r} is not registered: register its configuration with "
                            f"d2gp.tasks.register_task (or build it with d2gp.tasks.own_task), so that its runs can be "
                            f"evaluated and resumed later")
    rebuilt, given = task_config(config.task, **config.task_settings).to_dict(), task.config.to_dict()
    changed = sorted(k for k in set(rebuilt) | set(given) if rebuilt.get(k) != given.get(k))
    if changed:
        raise TrainingError(f"the task given differs from TrainConfig.task_settings in {', '.join(changed)} "
                            f"({', '.join(f'{k}={given.get(k)!r}' for k in changed)}): put them in task_settings, "
                            f"from which its runs are rebuilt")


def build_preconditioner(config: TrainConfig, task: Task, base: dict[str, Any] | None = None) -> torch.nn.Module:
    """The untrained preconditioner of ``config`` for ``task``'s images (identity at init), on the task's device.

    An NPO gets ``max_iteration = K − 1`` unless ``config.npo`` sets it: past the K it was
    trained for, it repeats its last operator (the learned linear ones do the same).

    :param base: with ``config.base``, the tuned base (:func:`tune_base`): the result is then a
        :class:`~d2gp.preconditioners.refined.Refined` that starts as that classical method.
    """
    if config.base is not None and base is None:
        raise TrainingError(f"config.base = {config.base!r}: pass the tuned base, build_preconditioner(config, task, "
                            f"tune_base(config, task, denoiser, val_images))")
    channels = task.image_shape[0]
    if config.preconditioner == "npo":
        try:
            npo = NPO(**{"channels": channels, "max_iteration": config.iterations - 1, **config.npo})
        except (TypeError, ValueError) as error:
            raise TrainingError(f"NPO settings {config.npo}: {error}") from None
        learned = prepare(npo, task.device) if npo.channels_last else npo.to(task.device)
    else:
        try:
            learned = build_linear(config.preconditioner, channels, tuple(task.image_shape[1:]), config.iterations,
                                   **config.linear).to(task.device)
        except ValueError as error:
            raise TrainingError(str(error)) from None
    if base is None:
        return learned
    return Refined(build_base(base, task), learned, base["gain"], base)


def untrained_start(config: TrainConfig, task: Task, run_dir: str | os.PathLike) -> torch.nn.Module:
    """The untrained preconditioner of ``config`` on the base the run in ``run_dir`` recorded in its
    ``config.json`` (not tuned again): what that run's training started from, in eval mode."""
    base = read_json(Path(run_dir) / "config.json", "run configuration").get("base")
    return build_preconditioner(config, task, base).eval()


def tune_base(config: TrainConfig, task: Task, denoiser, val_images: torch.Tensor) -> dict[str, Any] | None:
    """Tune ``config.base`` (a non-learned method) on the validation images at K, as Table I does
    (:func:`d2gp.tuning.tune_classical`, in ``config.algorithm``): ``{"method", "candidate", "step_size", "gain",
    "val_psnr"}`` with gain = its γ over the training step (:func:`training_step_size`); ``None`` without
    a base. Deterministic (fixed noise seeds), so a resumed run finds the same base."""
    if config.base is None:
        return None
    _, gamma, record = tune_classical(config.base, task, val_images, denoiser, config.iterations,
                                      algorithm=config.algorithm)
    return {"method": config.base, "candidate": record["chosen"], "step_size": gamma,
            "gain": gamma / training_step_size(config, task), "val_psnr": record["val_psnr"]}


# --- the teacher's targets ------------------------------------------------------------------------
class TeacherTargets:
    r"""The teacher's measurements :math:`y_t = A_t x + e` and output :math:`x_K^t` for every training
    image, computed once (no autograd) with one fixed noise draw per image (seed
    ``TEACHER_NOISE_SEED + 100000·seed + i`` for image i).

    The teacher has no parameters, so re-running its K iterations in every update (as the paper's
    Algorithm 2 does) only redraws its noise; this saves a third of an update's time.
    ``targets[idx]`` gives ``(y_t, x_K^t)`` for the images ``idx``. The teacher runs the host
    ``algorithm`` (:func:`d2gp.solver.solve`), the student's.
    """

    def __init__(self, task: Task, denoiser, images: torch.Tensor, iterations: int, seed: int = 0,
                 batch_size: int = 64, progress: bool = False, algorithm: str = "fista"):
        ys, xs = [], []
        base = TEACHER_NOISE_SEED + 100_000 * seed
        with torch.no_grad():
            for start in tqdm(range(0, len(images), batch_size), desc="teacher targets", disable=not progress,
                              leave=False):
                x = images[start:start + batch_size]
                y = measure(task.teacher, x, seed=base, offset=start)
                ys.append(y)
                xs.append(solve(algorithm, task.teacher, y, denoiser, task.teacher_step_size, iterations))
        self.y, self.x = torch.cat(ys), torch.cat(xs)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.y[index], self.x[index]


def _loss(config: TrainConfig, task: Task, npo, denoiser, x: torch.Tensor, seed: int,
          teacher: tuple[torch.Tensor, torch.Tensor] | None = None, unrolled=None,
          offset: int = 0) -> tuple[torch.Tensor, dict]:
    """The training loss on one batch and its terms (floats, for the log).

    :param seed: the update's noise seed: image i of ``x`` gets the noise of seed ``seed + offset + i``.
    :param teacher: the cached ``(y_t, x_K^t)`` of the batch (:class:`TeacherTargets`); ``None``:
        measure with the teacher (noise seeded by ``seed``) and run it now.
    :param unrolled: :func:`unrolled_loss` with its first four arguments bound, possibly compiled.
    :param offset: where ``x`` begins in the update's batch (a process's share of it, in distributed
        training), so that each image gets the noise it gets when the whole batch is in one process.
    """
    y_s = measure(task.student, x, seed=seed, offset=offset)
    y_t = teacher_out = None
    teacher_points = teacher_gradients = None
    if config.method != "objective" and config.weights.needs_teacher:
        if teacher is not None and config.teacher_gradient == "student":
            y_t, teacher_out = teacher
        else:
            y_t = measure(task.teacher, x, seed=seed, offset=offset)
            with torch.no_grad():
                teacher_out, trace = solve(config.algorithm, task.teacher, y_t, denoiser, task.teacher_step_size,
                                           config.iterations, trace=True, autocast=use_bf16(config.autocast, x.device))
            teacher_points, teacher_gradients = trace.z, trace.grad
    if unrolled is None:
        unrolled = functools.partial(unrolled_loss, config, task, npo, denoiser)
    loss, terms = unrolled(x, y_s, y_t, teacher_out, teacher_points, teacher_gradients)
    return loss, {name: value.item() for name, value in terms.items()}


def unrolled_loss(config: TrainConfig, task: Task, npo, denoiser, x: torch.Tensor, y_s: torch.Tensor,
                  y_t: torch.Tensor | None = None, teacher_out: torch.Tensor | None = None,
                  teacher_points: list | None = None, teacher_gradients: list | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The student's unrolled run and the loss terms, from measurements already drawn.

    No host synchronisation happens in here (terms stay tensors), so that ``torch.compile`` can
    capture it whole — on a GPU with CUDA graphs (``train(..., compile=True)``).

    :param teacher_points, teacher_gradients: the teacher's z_k and ∇f_t(z_k), for
        ``teacher_gradient="teacher"`` only.
    """
    weights, K = config.weights, config.iterations
    gamma_s = training_step_size(config, task)
    grad_from = K - config.truncate if config.unroll == "truncated" else 0
    autocast = use_bf16(config.autocast, x.device)
    run = dict(trace=True, checkpoint=config.unroll == "checkpoint", autocast=autocast, grad_from=grad_from)
    _, student_trace = solve(config.algorithm, task.student, y_s, denoiser, gamma_s, K, npo, **run)
    if config.method == "objective":
        loss = objective_loss(task.student, student_trace, y_s)
        return loss, {"objective": loss}
    outputs = student_trace.x[K - config.loss_tail:]  # x_{K−tail+1} … x_K
    terms: dict[str, torch.Tensor] = {}
    if weights.gradient > 0:
        A_s, A_t = task.student, task.teacher
        if config.teacher_gradient == "student":
            predicted = student_trace.preconditioned
            with torch.no_grad():
                targets = [A_t.A_adjoint(A_t.A(z) - y_t) for z in student_trace.z]
        else:
            targets = teacher_gradients
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
                predicted = [npo(A_s.A_adjoint(A_s.A(z) - y_s), k, **({"iterate": z} if npo.uses_iterate else {}))
                             for k, z in enumerate(teacher_points)]
        terms["gradient"] = gradient_loss(predicted, targets)
    if weights.imitation > 0:
        terms["imitation"] = sum(imitation_loss(out, teacher_out) for out in outputs) / len(outputs)
    if weights.supervised > 0:
        terms["supervised"] = sum(supervised_loss(out, x) for out in outputs) / len(outputs)
    loss = sum(getattr(weights, name) * value for name, value in terms.items())
    return loss, terms


# --- run directories --------------------------------------------------------------------------------
def saved_train_config(run_dir: str | os.PathLike) -> dict:
    """The run's saved training configuration, as :meth:`TrainConfig.to_json_dict` gives it today
    (fields added since the run was made take their defaults, so older runs still match)."""
    path = Path(run_dir) / "config.json"
    saved = read_json(path, "run configuration")
    require_entries(saved, {"train": dict}, path, "run configuration")
    return TrainConfig.from_dict(saved["train"]).to_json_dict()


def _check_run_dir(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    saved = run_dir / "config.json"
    if (run_dir / "checkpoint.pt").exists():
        if not resume:
            raise TrainingError(f"{run_dir} already holds a training run: pass resume=True (--resume) to continue it, "
                                f"or choose another directory")
        if not saved.is_file():
            raise TrainingError(f"cannot resume {run_dir}: its config.json is missing, so its settings cannot be "
                                f"checked; start the run again in another directory")
        previous, current = saved_train_config(run_dir), config.to_json_dict()
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            why = _extension_refused(previous, current, changed)
            if why is not None:
                raise TrainingError(f"cannot resume {run_dir}: its configuration differs in {', '.join(changed)}{why}")


#: What a resumed run may change: the number of updates (a longer run) and when it validates.
EXTENSIBLE = frozenset({"updates", "val_every", "val_points"})


def _extension_refused(previous: dict, current: dict, changed: list[str]) -> str | None:
    """``None`` when ``current`` extends the run of ``previous`` (saved configurations): only
    :data:`EXTENSIBLE` fields differ, both count ``updates``, the new count is larger and the
    learning rate does not depend on it (``schedule="constant"``: every update already made got the
    rate a run of the new length gives it, and validation draws no training randomness, so the
    extended run is the longer run, validated at more points). Otherwise the reason (appended to
    the refusal), or ``""`` when other settings differ."""
    if not set(changed) <= EXTENSIBLE or "updates" not in changed:
        return ""
    if not previous["updates"] or not current["updates"]:
        return " (a run extends by --updates, and both runs must count updates, not epochs)"
    if current["updates"] < previous["updates"]:
        return f" (it was set to {previous['updates']} updates: a run can be extended, not shortened)"
    if previous["schedule"] != "constant":
        return (f" (its {previous['schedule']} learning-rate schedule depends on the number of updates, so only a "
                f"run with --schedule constant can be extended; train a new run instead)")
    return None


def _write_log(history: list[dict], path: Path) -> None:
    if not history:
        return
    buffer = io.StringIO()
    fields = list(dict.fromkeys(key for row in history for key in row))
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(buffer.getvalue(), path)


# --- the schedule ---------------------------------------------------------------------------------
def _build_optimizer(config: TrainConfig, npo: torch.nn.Module):
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(npo.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


def lr_factor(config: TrainConfig, update: int, total: int) -> float:
    """The learning-rate multiplier of update ``update`` (0-based) of ``total`` under ``config.schedule``
    (``plateau`` is driven by the validation PSNR instead, and has no warm-up)."""
    if update < config.warmup:
        return (update + 1) / config.warmup
    if config.schedule != "cosine":
        return 1.0
    progress = (update - config.warmup) / max(1, total - config.warmup)
    return config.final_lr_ratio + (1 - config.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _build_scheduler(config: TrainConfig, optimizer, total: int):
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=config.plateau_factor,
                                                          patience=config.plateau_patience)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(config, u, total))


def validation_points(config: TrainConfig, updates_per_epoch: int, total: int) -> list[int]:
    """The update counts after which the validation PSNR is measured (and the state checkpointed)."""
    every = config.val_every or updates_per_epoch
    return sorted({*range(every, total + 1, every), *(p for p in config.val_points if p <= total), total})


# --- the loop ---------------------------------------------------------------------------------------
@locked_run_dir
def train(config: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          task: Task | None = None, train_images: torch.Tensor | None = None,
          val_images: torch.Tensor | None = None, device: str | torch.device | None = "auto",
          compile: bool = False, cuda_graph: bool = False) -> dict:
    """Train a preconditioner; returns the summary (best validation PSNR, updates, seconds, paths).

    :param config: the run's settings.
    :param run_dir: its directory (created).
    :param resume: continue the run found in ``run_dir``.
    :param task, train_images, val_images: for tests and the Python API: give them directly
        instead of building them from ``config`` (the run is then reproducible only with the same ones).
    :param device: ``"auto"`` (a CUDA GPU when there is one), ``"cpu"`` or ``"cuda"`` — ignored
        when ``task`` is given (its device is used).
    :param compile: run the unrolled loss through ``torch.compile`` — with CUDA graphs on a GPU
        (``mode="reduce-overhead"``), where an eager step is launch-bound (thousands of small
        kernels per update); the first updates then pay the compilation. On a CPU it warns: it
        measured slower there than eager.
    :param cuda_graph: record the unrolled loss and its backward pass once as a CUDA graph and
        replay it (:class:`d2gp.graphs.GraphedLoss`): the eager update's kernels and numbers
        without its launch overhead and without a compilation. One process, the teacher's cached
        targets; on a CPU nothing is recorded and the update runs eagerly.
    :raises TrainingError: bad settings, a run directory of another run, a NaN loss, or a diverged run
        (in distributed training also a batch too small to give every process an image: :func:`check_batch_split`).
    :raises ~d2gp.checkpoints.LockedError: another process trains into ``run_dir``.

    In a process group (``torchrun``, :mod:`d2gp.distributed`) every process calls it with the same
    arguments, and all of them return rank 0's summary or raise the same error.
    """
    config.validate()
    if task is not None:
        check_task(config, task)
    _check_cuda_graph(config, cuda_graph, compile)
    run_dir = Path(run_dir)  # created, and locked, by @locked_run_dir
    device = task.device if task is not None else resolve_device(device)
    if compile and device.type == "cpu":
        warnings.warn("compile on a CPU: on a 2-core Xeon, torch.compile took 14.6 min to compile the float32 update, "
                      "which then ran 1.5x slower than eager (benchmarks/results/training_speed/compile/); "
                      "it is meant for GPUs", stacklevel=2)
    config = resolve_autocast(config, device, run_dir, resume)
    from_rank0(lambda: _check_run_dir(run_dir, config, resume))
    task = task or make_task(config.task, device=device, **config.task_settings)
    precision("training", device)
    if train_images is None:
        train_images = task.images("train", limit=config.train_images)
    if val_images is None:
        val_images = task.images("val", limit=config.val_images)
    train_images = task.check_images(train_images, "training images").to(device)
    updates_per_epoch = math.ceil(len(train_images) / config.batch_size)
    total = config.updates or config.epochs * updates_per_epoch
    check_batch_split(len(train_images), config.batch_size, distributed.world_size())
    progress = progress and distributed.rank() == 0

    seed_everything(config.seed)
    denoiser = task.denoiser().requires_grad_(False)
    # ``given`` is recorded as it was asked for; ``config`` carries the step it resolved to (tune_step).
    given, (config, tuning) = config, from_rank0(lambda: _resolve_step(config, task, val_images, denoiser, run_dir,
                                                                       resume))
    base = from_rank0(lambda: _resolve_base(config, task, val_images, denoiser, run_dir, resume, progress))
    settings = {"train": given.to_dict(), "task": task.config.to_dict(), "environment": environment(device),
                "data": {"train": len(train_images), "val": len(val_images), "dataset": task.dataset},
                "updates": {"total": total, "per_epoch": updates_per_epoch},
                "runtime": {"device": str(device), "compile": bool(compile), "cuda_graph": bool(cuda_graph),
                            "world_size": distributed.world_size(),
                            "backend": distributed.backend()},
                "step_size": {"student": task.student_step_size, "teacher": task.teacher_step_size,
                              "training": training_step_size(config, task),
                              **({"tuning": tuning} if tuning is not None else {})},
                **({"base": base} if base is not None else {})}
    from_rank0(lambda: write_json(settings, run_dir / "config.json"))
    npo = build_preconditioner(config, task, base)
    optimizer = _build_optimizer(config, npo)
    scheduler = _build_scheduler(config, optimizer, total)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    best, update, order = -math.inf, 0, None
    state_path = run_dir / "checkpoint.pt"
    # Rank 0 reads the checkpoint; every rank restores the same global state, whatever the world size was.
    state = from_rank0(lambda: load_checkpoint(state_path, _STATE_FORMAT, "training checkpoint")
                       if resume and state_path.exists() else None)
    if state is not None:
        restore_training_state(state_path, _STATE_FORMAT, npo, optimizer, scheduler, generator, state=state)
        history, best = state["history"], state["best"]
        update, order = state.get("update", state.get("epoch", 0) * updates_per_epoch), state.get("order")
    cached = config.weights.needs_teacher and config.method != "objective" and teacher_cached(config)
    teacher = TeacherTargets(task, denoiser, train_images, config.iterations, config.seed, progress=progress,
                             algorithm=config.algorithm) \
        if cached else None

    unrolled = functools.partial(unrolled_loss, config, task, npo, denoiser)
    graphs = compile and device.type == "cuda"
    if compile:
        unrolled = torch.compile(unrolled, mode="reduce-overhead" if graphs else None, dynamic=False)
    graphed = None
    if cuda_graph:  # the loss computes the gradients too: the loop below neither zeroes nor back-propagates
        graphed = unrolled = GraphedLoss(unrolled, list(npo.parameters()), capture=device.type == "cuda")
    writer = None
    if config.tensorboard:
        def open_writer() -> None:  # on rank 0 only: it writes the run directory
            nonlocal writer
            writer = _tensorboard(run_dir)

        from_rank0(open_writer)
    checkpoints = [p for p in validation_points(config, updates_per_epoch, total) if p > update]
    val_psnr = history[-1]["val_psnr"] if history else float("nan")
    sums: dict[str, float] = {}
    count, window_began, began = 0, time.perf_counter(), time.perf_counter()
    bar = tqdm(total=total, initial=update, desc=f"{config.method} {task.name}", disable=not progress,
               unit="update")
    npo.train()
    while update < total:
        step = update % updates_per_epoch
        if step == 0:
            order = torch.randperm(len(train_images), generator=generator)
        index = order[step * config.batch_size:(step + 1) * config.batch_size]
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        # In distributed training each process takes its contiguous share of the batch (all of it in one
        # process); its loss, weighted by its share, sums over the processes to the batch's mean loss.
        start, stop = distributed.share(len(index))
        mine, weight = index[start:stop].to(device), (stop - start) / len(index)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, terms = _loss(config, task, npo, denoiser, train_images[mine], seed,
                            teacher[mine] if teacher is not None else None, unrolled, offset=start)
        value, *means = distributed.sum_values([weight * loss.item(), *(weight * v for v in terms.values())], device)
        terms = dict(zip(terms, means))
        if not math.isfinite(value):
            where = (f"the last good checkpoint {state_path} (update {history[-1]['update']}) is intact"
                     if history else "no checkpoint had been written yet")
            raise TrainingError(f"the loss became {value} at update {update + 1} (terms {terms}); training "
                                f"stopped, {where} — lower --lr or the λ weights, or set --grad-clip")
        if graphed is None:
            optimizer.zero_grad(set_to_none=True)
            (weight * loss).backward()
        distributed.sum_gradients(npo.parameters())
        norm = torch.nn.utils.clip_grad_norm_(npo.parameters(), config.grad_clip or math.inf)
        optimizer.step()
        if config.schedule != "plateau":
            scheduler.step()
        update += 1
        count += 1
        for name, number in {"loss": value, **terms, "grad_norm": float(norm)}.items():
            sums[name] = sums.get(name, 0.0) + number
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3g}", val_psnr=f"{val_psnr:.2f}" if history else "–")
        if checkpoints and update == checkpoints[0]:
            checkpoints.pop(0)
            val_psnr = from_rank0(lambda: _val_psnr("val", config, task, denoiser, val_images, npo))
            if config.schedule == "plateau":
                scheduler.step(val_psnr)
            seconds = time.perf_counter() - window_began
            row = {"update": update, "epoch": round(update / updates_per_epoch, 4),
                   **{name: value / count for name, value in sums.items()}, "val_psnr": val_psnr,
                   "lr": optimizer.param_groups[0]["lr"], "seconds": seconds}
            history.append(row)
            improved, best = val_psnr > best, max(best, val_psnr)

            def record() -> None:  # rank 0 writes the run directory
                if improved:
                    meta = {"val_psnr": val_psnr, "update": update, "epoch": row["epoch"], "step_size": config.step_size}
                    save_npo(npo, run_dir / "best.pt", task, given, meta)
                if progress:
                    bar.write(f"{config.method} {task.name} update {update}/{total}: loss {row['loss']:.4g}, "
                              f"val PSNR {val_psnr:.2f} dB (best {best:.2f}), {seconds:.0f} s")
                if writer is not None:
                    for name, number in row.items():
                        writer.add_scalar(name, number, update)
                save_training_state(state_path, _STATE_FORMAT, npo, optimizer, scheduler, generator,
                                    history=history, best=best, update=update, order=order)
                _write_log(history, run_dir / "log.csv")

            from_rank0(record)
            sums, count, window_began = {}, 0, time.perf_counter()
    bar.close()
    npo.eval()
    if base is not None:  # the untrained preconditioner is the tuned base
        untrained = base["val_psnr"]
    else:
        untrained = from_rank0(lambda: _val_psnr("identity", config, task, denoiser, val_images))
    check_not_diverged(best, untrained)

    def finish() -> dict:  # rank 0 writes the run directory; every process returns its summary
        save_npo(npo, run_dir / "last.pt", task, given, {"val_psnr": val_psnr, "update": total,
                                                         "epoch": round(total / updates_per_epoch, 4),
                                                         "step_size": config.step_size})
        training_seconds = sum(r["seconds"] for r in history)
        summary = {"best_val_psnr": best, "final_val_psnr": val_psnr, "updates": total,
                   "epochs": round(total / updates_per_epoch, 4), "training_seconds": training_seconds,
                   "seconds_per_update": training_seconds / max(1, total),
                   "seconds_this_session": time.perf_counter() - began,
                   "step_size": training_step_size(config, task), "run_dir": str(run_dir)}
        write_json(summary, run_dir / "summary.json")
        return summary

    return from_rank0(finish)


def teacher_cached(config: TrainConfig) -> bool:
    """Whether the teacher's targets are computed once (:class:`TeacherTargets`) rather than in every
    update: ``teacher_cache``, and the gradient targets taken at the student's iterates."""
    return config.teacher_cache and config.teacher_gradient == "student"


def _check_cuda_graph(config: TrainConfig, cuda_graph: bool, compile: bool) -> None:
    """Refuse what :class:`~d2gp.graphs.GraphedLoss` cannot record: with ``compile`` (two ways of
    capturing the same loss), several processes (the loss is weighted by each one's share of the
    batch) or a teacher run inside the update (its trace is a list, not a fixed tensor)."""
    if not cuda_graph:
        return
    if compile:
        raise TrainingError("cuda_graph and compile are two ways of capturing the unrolled loss: choose one")
    if distributed.world_size() > 1:
        raise TrainingError("cuda_graph trains in one process only; under torchrun, leave it out")
    if config.weights.needs_teacher and config.method != "objective" and not teacher_cached(config):
        raise TrainingError("cuda_graph needs the teacher's cached targets (teacher_cache=True, "
                            "teacher_gradient='student'): a teacher run inside the update cannot be recorded")


def _val_psnr(label: str, config: TrainConfig, task: Task, denoiser, val_images: torch.Tensor,
              preconditioner: torch.nn.Module | None = None) -> float:
    """The student's mean validation PSNR at K with ``preconditioner`` (``None``: the identity) at the
    training step; the preconditioner is back in training mode afterwards."""
    if preconditioner is not None:
        preconditioner.eval()
    try:
        run = evaluate_solver(label, task.student, val_images, denoiser, training_step_size(config, task),
                              config.iterations, preconditioner=preconditioner, progress=False,
                              algorithm=config.algorithm)
    finally:
        if preconditioner is not None:
            preconditioner.train()
    return float(run.psnr[config.iterations].mean())


def check_batch_split(images: int, batch_size: int, processes: int) -> None:
    """Refuse distributed training whose batches cannot give every process at least one image.

    Each update's batch is split into contiguous shares, one per process (:func:`d2gp.distributed.share`);
    shares may differ by one image (the loss is weighted by them), but none may be empty.

    :param images: the training images (an epoch's last batch holds ``images % batch_size`` of them).
    :param batch_size: the images of one update, over all processes.
    :param processes: the world size.
    :raises TrainingError: naming the batch that is too small.
    """
    if batch_size < processes:
        raise TrainingError(f"batch_size {batch_size} cannot be split over {processes} processes: each computes "
                            f"part of every batch; use a batch of at least {processes} images (or fewer processes)")
    last = images % batch_size
    if 0 < last < processes:
        raise TrainingError(f"the last batch of each epoch holds {last} images ({images} training images in batches "
                            f"of {batch_size}), too few for {processes} processes (each needs at least one); "
                            f"change train_images or batch_size so that it holds none or at least {processes}")


def resolve_autocast(config: TrainConfig, device: torch.device, run_dir: str | os.PathLike,
                     resume: bool) -> TrainConfig:
    """``config`` with ``autocast`` decided: as given, or (``None``) the precision of the run in
    ``run_dir`` when it is resumed (or found finished), else :func:`~d2gp.device.use_bf16`'s choice
    for ``device``. Saved so in ``config.json``, a run continues in the precision it began in, on
    whatever machine."""
    if config.autocast is not None:
        return config
    run_dir = Path(run_dir)
    recorded = _recorded(run_dir, resume, "train") if (run_dir / "config.json").is_file() else None
    if isinstance(recorded, dict) and isinstance(recorded.get("autocast"), bool):
        return dataclasses.replace(config, autocast=recorded["autocast"])
    return dataclasses.replace(config, autocast=use_bf16(None, device))


def _recorded(run_dir: Path, resume: bool, key: str):
    """Entry ``key`` of the ``config.json`` of a run being resumed (``None`` otherwise): what its first
    session tuned (the step, the base) is read back instead of tuned again."""
    if not (resume and (run_dir / "checkpoint.pt").exists()):
        return None
    return read_json(run_dir / "config.json", "run configuration").get(key)


def _resolve_base(config: TrainConfig, task: Task, val_images: torch.Tensor, denoiser, run_dir: Path,
                  resume: bool, progress: bool = False) -> dict[str, Any] | None:
    """:func:`tune_base`, or the base a resumed run recorded (the same: tuning is deterministic)."""
    recorded = _recorded(run_dir, resume, "base")
    if config.base is not None and isinstance(recorded, dict) and recorded.get("method") == config.base \
            and {"candidate", "step_size", "gain", "val_psnr"} <= set(recorded):
        if progress:
            tqdm.write(f"the base preconditioner {config.base!r} as the run's first session tuned it (read back)")
        return recorded
    if config.base is not None and progress:
        tqdm.write(f"tuning the base preconditioner {config.base!r} on {len(val_images)} validation images")
    return tune_base(config, task, denoiser, val_images)


def _resolve_step(config: TrainConfig, task: Task, val_images: torch.Tensor, denoiser, run_dir: Path,
                  resume: bool) -> tuple[TrainConfig, dict | None]:
    """``config`` with the step it trains with, and the tuning record (``None`` unless ``tune_step``).

    With ``tune_step`` the step is :func:`~d2gp.evaluation.tune_step_size` of the plain student
    (P = I, the preconditioner's starting point) on the validation images at K — the baseline's
    tuning, without restart as training runs — unless a resumed run recorded it already.
    """
    if not config.tune_step:
        return config, None
    recorded = _recorded(run_dir, resume, "step_size")
    if isinstance(recorded, dict) and isinstance(recorded.get("training"), (int, float)) and "tuning" in recorded:
        return dataclasses.replace(config, step_size=float(recorded["training"])), recorded["tuning"]
    with torch.no_grad():
        gamma, record = tune_step_size(task.student, val_images, denoiser, task.student_step_size, config.iterations,
                                       algorithm=config.algorithm)
    return dataclasses.replace(config, step_size=gamma), {"chosen": gamma, "val_psnr_by_step": record}


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run_dir / "tensorboard"))

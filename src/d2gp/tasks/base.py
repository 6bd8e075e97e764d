"""What every task shares: the configuration base, the :class:`Task` object and its errors.

A *task* is a pair of linear operators on the same images — the practical ``student`` and the
better-conditioned ``teacher`` — together with the data, the measurement noise, the denoiser
and the step sizes of plug-and-play FISTA. The solver never sees a task: it only receives a
``deepinv.physics.LinearPhysics``, a denoiser and a step size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch
from deepinv.physics import GaussianNoise, LinearPhysics

__all__ = ["TaskError", "TaskConfig", "Task", "power_norm", "measure", "spec", "denoiser_scale_spec"]


class TaskError(ValueError):
    """A task was asked for with settings that cannot work (the message says which)."""


def spec(default: Any, help: str) -> Any:
    """A dataclass field with a help text, shown by ``d2gp ... --help`` and in the docs."""
    return field(default=default, metadata={"help": help})


def denoiser_scale_spec(default: float) -> Any:
    """The ``denoiser_scale`` field with a task's own default (see :class:`d2gp.denoisers.ScaledDenoiser`)."""
    return spec(default, "PnP prior c·D(x): c < 1 makes the iteration contractive (stable past K)")


@dataclass
class TaskConfig:
    """Settings common to every task. Subclasses add the operator settings.

    Every field can be overridden from Python (``make_task("spc", student_ratio=0.05)``) and
    from the command line (``--student-ratio 0.05``).

    A task of your own is a dataclass subclass that sets the class attributes ``name`` (how runs,
    ``make_task`` and the CLI refer to it), ``channels``, and usually ``default_dataset`` (a name of
    ``d2gp datasets``) and ``shipped_denoiser`` (a built-in task whose shipped DnCNN fits its images,
    e.g. ``"spc"`` for grey images) or a ``denoiser`` file; it implements :meth:`build_student` and
    :meth:`build_teacher`, which must build the same operator on every call (seed any random
    part): a run's task is rebuilt from its settings when it is evaluated or resumed. Register it
    with :func:`d2gp.tasks.register_task`; :func:`d2gp.tasks.own_task` does all of this for two
    ``LinearPhysics`` objects.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    channels: ClassVar[int] = 1
    #: the task whose shipped denoiser this one uses (default: its own name)
    shipped_denoiser: ClassVar[str] = ""

    image_size: int = spec(32, "side of the square images, in pixels")
    noise_sigma: float = spec(0.01, "std of the additive Gaussian noise on the measurements")
    dataset: str = spec("", "dataset name (see `d2gp datasets`); empty = the task's embedded default")
    data_root: str | None = spec(None, "folder of the user's files for a real dataset")
    data_seed: int = spec(0, "seed of the data split and of the operators' noise generators")
    student_step_size: float | None = spec(None, "student step size γ; default 1/‖AᵀA‖ (power method)")
    teacher_step_size: float | None = spec(None, "teacher step size γ; default 1/‖AᵀA‖ (power method)")
    denoiser: str | None = spec(None, "path of a DnCNN weights file; default: the shipped one")
    denoiser_scale: float = denoiser_scale_spec(1.0)

    default_dataset: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise :class:`TaskError` on settings that cannot work."""
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise TaskError(f"image_size must be an integer ≥ 8, got {self.image_size!r}")
        if not 0 < self.denoiser_scale <= 1:
            raise TaskError(f"denoiser_scale must be in (0, 1], got {self.denoiser_scale!r}")
        if not self.noise_sigma >= 0 or not math.isfinite(self.noise_sigma):
            raise TaskError(f"noise_sigma must be a finite number ≥ 0, got {self.noise_sigma!r}")
        for name in ("student_step_size", "teacher_step_size"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise TaskError(f"{name} must be a finite number > 0, got {value!r}")
        from d2gp.data import DATASETS

        if self.dataset and self.dataset not in DATASETS:
            raise TaskError(f"unknown dataset {self.dataset!r}; known datasets: {', '.join(DATASETS)}")
        for f in dataclasses.fields(self):  # data_seed, and the subclasses' seeds (mask_seed, …)
            value = getattr(self, f.name)
            if f.name.endswith("_seed") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise TaskError(f"{f.name} must be an integer ≥ 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.name, **dataclasses.asdict(self)}

    # The operators: subclasses build them.
    def build_student(self) -> LinearPhysics:
        """The student operator A_s (the same one on every call)."""
        raise TaskError(f"{type(self).__name__} does not build a student operator: implement build_student()")

    def build_teacher(self) -> LinearPhysics:
        """The teacher operator A_t, on the same images (the same one on every call)."""
        raise TaskError(f"{type(self).__name__} does not build a teacher operator: implement build_teacher()")

    def describe(self) -> str:
        """A one-line summary of the student/teacher pair (by default :attr:`description`)."""
        return self.description or f"task {self.name!r}: student and teacher operators of {type(self).__name__}"


def power_norm(physics: LinearPhysics, shape: tuple[int, ...], iterations: int = 200) -> float:
    """‖AᵀA‖₂, the largest eigenvalue of AᵀA, by the power method (deterministic start).

    Not deepinv's ``compute_sqnorm``: that one passes an unbatched start to ``A``, which deepinv
    0.5.0's ``Downsampling`` rejects ("Input and filter must be 4D tensors"); this one works for
    every operator, accumulates in float64 and is seeded.

    :param physics: the linear operator A.
    :param shape: the image shape ``(C, H, W)``.
    :param iterations: maximum number of power iterations (stops at relative change < 1e-7).
    """
    generator = torch.Generator().manual_seed(0)
    from d2gp.device import module_device

    device = module_device(physics)
    x = torch.randn((1, *shape), generator=generator, dtype=torch.float64).to(device)
    x = x / x.norm()
    value = 0.0
    with torch.no_grad():
        for _ in range(iterations):
            y = physics.A_adjoint(physics.A(x.float())).double()
            new = float((x * y).sum())
            x = y / y.norm()
            if abs(new - value) <= 1e-7 * abs(new):
                value = new
                break
            value = new
    return value


def measure(physics: LinearPhysics, x: torch.Tensor, seed: int | None = None, offset: int = 0) -> torch.Tensor:
    """Noisy measurements ``physics.noise_model(physics.A(x))``.

    With ``seed``, image ``i`` of the batch gets the noise drawn from seed ``seed + offset + i``:
    the noise of an image does not depend on how the images were batched.
    The noise is drawn on the CPU (the same numbers as deepinv's ``GaussianNoise`` with a CPU
    generator) and moved to the device of ``x``, so a seed gives the same measurements on every device.
    """
    clean = physics.A(x)
    if seed is None:
        if clean.device.type != "cpu":
            raise ValueError("measure() on a GPU needs a seed: the noise generators live on the CPU")
        return physics.noise_model(clean)
    sigma = getattr(physics.noise_model, "sigma", None)
    if sigma is None:  # another noise model than Gaussian: its own generator, per image
        return torch.cat([physics.noise_model(clean[i:i + 1], seed=seed + offset + i) for i in range(len(clean))])
    sigma = float(sigma)
    if sigma == 0:
        return clean
    generator = torch.Generator()
    noise = torch.empty((len(clean), *clean.shape[1:]), dtype=clean.dtype)
    for i in range(len(clean)):
        generator.manual_seed(seed + offset + i)
        noise[i].normal_(generator=generator)
    return clean + noise.to(clean.device) * sigma


class Task:
    """A student/teacher pair of operators with everything needed to run them.

    Attributes:
        config: the :class:`TaskConfig` it was built from.
        student, teacher: the two ``deepinv.physics.LinearPhysics`` (noise model included).
        image_shape: ``(C, H, W)`` of the images.
        device: where the operators (and :meth:`denoiser`) live; :meth:`images` stay on the CPU
            (move batches with ``.to(task.device)``).
    """

    def __init__(self, config: TaskConfig, device: str | torch.device | None = "cpu"):
        from d2gp.device import resolve_device

        config.validate()
        self.config = config
        self.name = config.name
        self.image_shape = (config.channels, config.image_size, config.image_size)
        self.device = resolve_device(device)
        self.student = config.build_student()
        self.teacher = config.build_teacher()
        for physics in (self.student, self.teacher):
            physics.noise_model = GaussianNoise(
                sigma=self.noise_sigma_for(physics), rng=torch.Generator().manual_seed(config.data_seed)
            )
            physics.to(self.device)

    def noise_sigma_for(self, physics: LinearPhysics) -> float:
        """The noise std in the measurement units of ``physics`` (see :attr:`noise_scale`)."""
        return self.config.noise_sigma * getattr(physics, "noise_scale", 1.0)

    def __repr__(self) -> str:
        return f"Task({self.name}: {self.config.describe()})"

    # Step sizes ------------------------------------------------------------------------------
    @cached_property
    def student_norm(self) -> float:
        """‖A_sᵀA_s‖ by the power method."""
        return power_norm(self.student, self.image_shape)

    @cached_property
    def teacher_norm(self) -> float:
        """‖A_tᵀA_t‖ by the power method."""
        return power_norm(self.teacher, self.image_shape)

    @property
    def student_step_size(self) -> float:
        """γ_s: the configured one, else 1/‖A_sᵀA_s‖."""
        return self.config.student_step_size or 1.0 / self.student_norm

    @property
    def teacher_step_size(self) -> float:
        """γ_t: the configured one, else 1/‖A_tᵀA_t‖."""
        return self.config.teacher_step_size or 1.0 / self.teacher_norm

    # Data -------------------------------------------------------------------------------------
    @property
    def dataset(self) -> str:
        return self.config.dataset or self.config.default_dataset

    def images(self, split: str, limit: int | None = None) -> torch.Tensor:
        """The images of a split, ``(N, C, H, W)`` in [0, 1], checked against the task's shape.

        :param split: ``"train"``, ``"val"`` or ``"test"``.
        :param limit: only the first ``limit`` images (≥ 1; ``None``: all); the others are not
            decoded or resized.
        """
        from d2gp.data import load_images

        if not self.dataset:
            raise TaskError(
                f"task {self.name!r} has no dataset: set one (the dataset setting or the class's default_dataset, "
                f"a name of `d2gp datasets`; 'folder' with data_root for your own image files), or pass the images "
                f"yourself (train(..., train_images=, val_images=), evaluate_runs(..., images=, val_images=))")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise TaskError(f"the image limit must be an integer ≥ 1 (or None: all), got {limit!r}")
        images = load_images(
            self.dataset, split, image_size=self.config.image_size,
            root=self.config.data_root, seed=self.config.data_seed, max_images=limit,
        )
        images = self.match_channels(images)
        return self.check_images(images, what=f"dataset {self.dataset!r} ({split})")

    def match_channels(self, images: torch.Tensor) -> torch.Tensor:
        """Grey → RGB by replication, RGB → grey by luminance (ITU-R BT.601), else unchanged."""
        want, have = self.image_shape[0], images.shape[1]
        if want == 3 and have == 1:
            return images.expand(-1, 3, -1, -1).contiguous()
        if want == 1 and have == 3:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
            return (images * weights).sum(1, keepdim=True)
        return images

    def check_images(self, images: torch.Tensor, what: str = "images") -> torch.Tensor:
        """Return ``images`` as float32 ``(N, C, H, W)``, or raise :class:`TaskError`."""
        if not isinstance(images, torch.Tensor):
            raise TaskError(f"{what}: expected a torch.Tensor, got {type(images).__name__}")
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise TaskError(
                f"{what}: task {self.name!r} expects images of shape (N, {', '.join(map(str, self.image_shape))}), "
                f"got {tuple(images.shape)}"
            )
        return images.float()

    # Measurements -----------------------------------------------------------------------------
    def measure(self, x: torch.Tensor, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy student and teacher measurements ``(y_s, y_t)`` of the images ``x``.

        With ``seed`` the noise is reproducible (see :func:`measure`); without, each
        operator's noise generator (seeded by ``config.data_seed``) goes on from where it stands.
        """
        x = self.check_images(x)
        return measure(self.student, x, seed), measure(self.teacher, x, seed)

    # Denoiser ---------------------------------------------------------------------------------
    def denoiser(self) -> torch.nn.Module:
        """The PnP prior: the configured weights file (else the one shipped for this task), scaled
        by ``denoiser_scale`` when that is below 1 (see :class:`d2gp.denoisers.ScaledDenoiser`), on
        :attr:`device` in the channels-last layout."""
        from d2gp.denoisers import ScaledDenoiser, load_denoiser

        from d2gp.device import prepare

        source = self.config.denoiser or self.config.shipped_denoiser or self.name
        model = prepare(load_denoiser(source, channels=self.image_shape[0], task=self.name), self.device)
        return model if self.config.denoiser_scale == 1 else ScaledDenoiser(model, self.config.denoiser_scale)

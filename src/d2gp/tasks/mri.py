r"""Single-coil Cartesian MRI: :math:`A = M F` with 1D variable-density column masks.

:math:`F` is the orthonormal 2D DFT and :math:`M` keeps a set of k-space *columns* (phase
encodes). The images are real (magnitude) images: :math:`A` maps :math:`\mathbb{R}^n` to
:math:`\mathbb{C}^{H m}` and its adjoint for the real inner product is
:math:`A^\top y = \operatorname{Re}(F^{H} M^\top y)`. The complex numbers stay inside the
operator: the measurements are stored as real tensors ``(B, 2C, H, m)`` (real parts, then
imaginary parts), and users pass and get real images. (deepinv's :class:`deepinv.physics.MRI`
works on two-channel complex images instead.) With full sampling :math:`A^\top A = I`; with a
mask it is the projector :math:`\operatorname{Re} F^H M^\top M F`, so ``‖AᵀA‖ = 1``.

Masks are 1D Gaussian variable density, *nested*: one seeded priority order over the
columns — first the ``center_fraction`` of columns nearest the DC, then the others drawn
without replacement with probability :math:`\propto \exp(-d^2/(2 (\sigma W)^2))`, :math:`d`
their distance to the centre — and each acceleration :math:`R` keeps the first
:math:`\operatorname{round}(W/R)` of them. So the teacher (lower :math:`R`) sees every
column the student sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from deepinv.physics import LinearPhysics

from d2gp.tasks.base import TaskConfig, TaskError, denoiser_scale_spec, spec

__all__ = ["CartesianMRI", "gaussian_column_order", "MRIConfig"]


def gaussian_column_order(width: int, center_fraction: float = 0.08, sigma: float = 0.1, seed: int = 0) -> np.ndarray:
    """Priority order of the k-space columns (DC at ``width // 2`` before ``ifftshift``).

    :param width: number of columns ``W``.
    :param center_fraction: fraction of columns around the DC always taken first.
    :param sigma: std of the Gaussian density, as a fraction of ``W``.
    :param seed: seed of the random draw.
    :return: the ``W`` column indices (in *centred* k-space coordinates), most important first.
    """
    centre = width // 2
    distance = np.abs(np.arange(width) - centre)
    n_center = max(1, int(round(center_fraction * width)))
    by_distance = np.argsort(distance, kind="stable")
    first, rest = by_distance[:n_center], by_distance[n_center:]
    weights = np.exp(-0.5 * (distance[rest] / (sigma * width)) ** 2)
    rng = np.random.default_rng(seed)
    # Weighted sampling without replacement (Efraimidis–Spirakis): sort by u^(1/w).
    keys = rng.random(rest.size) ** (1.0 / weights)
    return np.concatenate([first, rest[np.argsort(-keys, kind="stable")]])


class CartesianMRI(LinearPhysics):
    r"""Single-coil MRI on real images, keeping the k-space columns ``columns``.

    :param int size: image side (``H = W``).
    :param columns: indices (in centred k-space coordinates, DC at ``size // 2``) of the kept columns.
    :param int channels: number of image channels (1 for magnitude MRI).
    """

    def __init__(self, size: int, columns, channels: int = 1, **kwargs):
        super().__init__(img_size=(channels, size, size), **kwargs)
        self.size, self.channels = size, channels
        columns = torch.as_tensor(np.sort(np.asarray(columns)), dtype=torch.long)
        # Store them in the unshifted FFT layout so that A needs no fftshift.
        self.register_buffer("columns", (columns - size // 2) % size)
        mask = torch.zeros(size)
        mask[columns] = 1
        self.register_buffer("mask", mask)  # centred layout, for plots

    @property
    def acceleration(self) -> float:
        return self.size / self.columns.numel()

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        k = torch.fft.fft2(x, norm="ortho")[..., self.columns]
        return torch.cat([k.real, k.imag], dim=1)

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        c = y.shape[1] // 2
        k = torch.complex(y[:, :c], y[:, c:])
        full = k.new_zeros((*k.shape[:-1], self.size))
        full[..., self.columns] = k
        return torch.fft.ifft2(full, norm="ortho").real


@dataclass
class MRIConfig(TaskConfig):
    """Single-coil MRI on 64×64 MNI152 slices: student acceleration 8, teacher 4."""

    name = "mri"
    description = "single-coil Cartesian MRI, 1D Gaussian column masks (student R=8, teacher R=4)"
    channels = 1
    default_dataset = "mni152"

    image_size: int = spec(64, "side of the square images, in pixels")
    student_acceleration: float = spec(8.0, "student acceleration R (keeps W/R columns), > 1")
    teacher_acceleration: float = spec(4.0, "teacher acceleration, in [1, student_acceleration)")
    center_fraction: float = spec(0.08, "fraction of central k-space columns always sampled")
    mask_sigma: float = spec(0.1, "std of the Gaussian column density, as a fraction of the width")
    mask_seed: int = spec(0, "seed of the column draw")
    denoiser_scale: float = denoiser_scale_spec(0.97)  # chosen with benchmarks/pnp_stability.py

    def validate(self) -> None:
        super().validate()
        if not self.student_acceleration > 1:
            raise TaskError(f"student_acceleration must be > 1, got {self.student_acceleration}")
        if not 1 <= self.teacher_acceleration:
            raise TaskError(f"teacher_acceleration must be ≥ 1, got {self.teacher_acceleration}")
        if self.teacher_acceleration >= self.student_acceleration:
            raise TaskError(
                f"the teacher must be less accelerated than the student: teacher_acceleration "
                f"{self.teacher_acceleration} ≥ student_acceleration {self.student_acceleration}"
            )
        if not 0 < self.center_fraction < 1:
            raise TaskError(f"center_fraction must be in (0, 1), got {self.center_fraction}")
        if not self.mask_sigma > 0:
            raise TaskError(f"mask_sigma must be > 0, got {self.mask_sigma}")
        if self.columns(self.teacher_acceleration) <= self.columns(self.student_acceleration):
            raise TaskError(
                f"at width {self.image_size} both accelerations keep {self.columns(self.student_acceleration)} columns"
            )

    def columns(self, acceleration: float) -> int:
        return max(1, round(self.image_size / acceleration))

    def _build(self, acceleration: float) -> CartesianMRI:
        order = gaussian_column_order(self.image_size, self.center_fraction, self.mask_sigma, self.mask_seed)
        return CartesianMRI(self.image_size, order[: self.columns(acceleration)], channels=self.channels)

    def build_student(self) -> CartesianMRI:
        return self._build(self.student_acceleration)

    def build_teacher(self) -> CartesianMRI:
        return self._build(self.teacher_acceleration)

    def describe(self) -> str:
        w = self.image_size
        return (
            f"{w}×{w} single-coil MRI, Gaussian columns: student R={self.student_acceleration:g} "
            f"({self.columns(self.student_acceleration)}/{w}), teacher R={self.teacher_acceleration:g} "
            f"({self.columns(self.teacher_acceleration)}/{w})"
        )

r"""Super-resolution: :math:`A = S B`, a Gaussian blur :math:`B` then decimation :math:`S` by ``d``.

Built on :class:`deepinv.physics.Downsampling` with circular padding, so that :math:`A^\top A`
is diagonalised by the FFT (the closed-form Newton preconditioner relies on it). The blur is a
Gaussian of std ``blur_sigma × d`` pixels (``blur_sigma = 1`` is deepinv's ``filter="gaussian"``):
each factor gets the anti-aliasing filter that matches it, so the teacher (smaller ``d``)
both blurs less and keeps more samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepinv.physics import Downsampling
from deepinv.physics.functional import gaussian_blur

from d2gp.tasks.base import TaskConfig, TaskError, denoiser_scale_spec, spec

__all__ = ["SRConfig", "make_downsampling"]


def make_downsampling(image_shape: tuple[int, int, int], factor: int, blur_sigma: float = 1.0,
                      padding: str = "circular") -> Downsampling:
    """Gaussian blur of std ``blur_sigma·factor`` then decimation by ``factor`` (circular padding by default)."""
    kernel = gaussian_blur(sigma=(blur_sigma * factor, blur_sigma * factor))
    return Downsampling(img_size=image_shape, filter=kernel, factor=factor, padding=padding)


@dataclass
class SRConfig(TaskConfig):
    """Super-resolution of 64×64 RGB images: student factor 4, teacher factor 2."""

    name = "sr"
    description = "super-resolution, Gaussian blur + decimation (student ×4, teacher ×2)"
    channels = 3
    default_dataset = "skimage"

    image_size: int = spec(64, "side of the square high-resolution images, in pixels")
    student_factor: int = spec(4, "student downsampling factor d_s (an integer ≥ 2 dividing image_size)")
    teacher_factor: int = spec(2, "teacher downsampling factor d_t, 1 ≤ d_t < d_s")
    blur_sigma: float = spec(1.0, "Gaussian blur std, in units of the factor (std = blur_sigma·d pixels)")
    denoiser_scale: float = denoiser_scale_spec(0.95)  # chosen with benchmarks/pnp_stability.py

    def validate(self) -> None:
        super().validate()
        for name in ("student_factor", "teacher_factor"):
            factor = getattr(self, name)
            if not isinstance(factor, int) or factor < 1:
                raise TaskError(f"{name} must be a positive integer, got {factor!r}")
            if self.image_size % factor:
                raise TaskError(f"{name} {factor} does not divide image_size {self.image_size}")
        if self.student_factor < 2:
            raise TaskError(f"student_factor must be ≥ 2, got {self.student_factor}")
        if self.teacher_factor >= self.student_factor:
            raise TaskError(
                f"the teacher must downsample less than the student: teacher_factor {self.teacher_factor} "
                f"≥ student_factor {self.student_factor}"
            )
        if not self.blur_sigma > 0:
            raise TaskError(f"blur_sigma must be > 0, got {self.blur_sigma}")

    def _shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def build_student(self) -> Downsampling:
        return make_downsampling(self._shape(), self.student_factor, self.blur_sigma)

    def build_teacher(self) -> Downsampling:
        return make_downsampling(self._shape(), self.teacher_factor, self.blur_sigma)

    def describe(self) -> str:
        s = self.image_size
        return (
            f"{s}×{s} RGB super-resolution, Gaussian blur std {self.blur_sigma:g}·d: "
            f"student ×{self.student_factor} ({s // self.student_factor}²), teacher ×{self.teacher_factor} "
            f"({s // self.teacher_factor}²)"
        )

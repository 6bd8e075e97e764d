r"""Single-pixel camera (SPC): rows of the 2D Hadamard basis.

The image :math:`x \in \mathbb{R}^{n}` (:math:`n = H W`, both powers of two) is measured with
:math:`m` patterns taken from the 2D Walsh–Hadamard basis :math:`H = H_{W} \otimes H_{H}`,
orthonormal (:math:`H^\top H = I`, symmetric).

* ``patterns="pm1"`` (default): the ±1 rows, normalised: :math:`A = S H` with :math:`S` the
  row selection. Then :math:`A A^\top = I` and :math:`A^\top A = H^\top S^\top S H` is an
  orthogonal projector, so :math:`\|A^\top A\| = 1` and every non-zero singular value is 1.
* ``patterns="binary"``: the {0, 1} patterns a digital micromirror device displays,
  :math:`p_i = (\mathbf{1} + h_i)/2` with :math:`h_i = \sqrt{n}\,H_i` the ±1 row. Then
  :math:`p_i^\top x = (\mathbf{1}^\top x + h_i^\top x)/2`: every pattern also measures the
  mean, and :math:`A^\top A` is badly conditioned (on its range, condition number
  :math:`\approx (m+4)^2/4`: about 3·10³ for 10 % of 32×32, 7·10⁴ for 50 %).

Both are applied in :math:`O(n \log n)` with the fast Walsh–Hadamard transform; no dense
matrix is formed (:meth:`HadamardSPC.matrix` builds one for tests on small sizes).

Which rows: the first :math:`m` in a 2D *ordering* of the sequency pairs
:math:`(s_u, s_v)`. deepinv's ``"sequency"`` order sorts the *flattened* index, so on 32×32 a
10 % mask keeps every horizontal sequency of the first rows and almost no vertical ones;
the 2D orders ``"zig_zag"`` (by :math:`s_u + s_v`), ``"cake_cutting"``, ``"xy"`` (deepinv's)
and ``"radial"`` (ours, by :math:`s_u^2 + s_v^2`) keep low sequencies in both directions.
``benchmarks/spc_ordering.py`` compares them by PSNR; the default is its winner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from deepinv.physics import LinearPhysics
from deepinv.physics import singlepixel as dsp

from d2gp.tasks.base import TaskConfig, TaskError, spec

__all__ = ["HadamardSPC", "hadamard_rows", "ORDERINGS", "SPCConfig", "SPCBinaryConfig"]

ORDERINGS = ("zig_zag", "radial", "cake_cutting", "xy", "sequency")
PATTERNS = ("pm1", "binary")


def fwht2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2D Walsh–Hadamard transform (natural order) of the last two dims; self-inverse."""
    return dsp.hadamard_2d(x)


def _radial_mask(size: int, m: int) -> torch.Tensor:
    """Sequency-domain mask of the m pairs (s_u, s_v) with the smallest s_u² + s_v²."""
    su, sv = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    keys = np.lexsort((sv.ravel(), su.ravel(), np.maximum(su, sv).ravel(), (su**2 + sv**2).ravel()))
    mask = np.zeros(size * size, dtype=np.float32)
    mask[keys[:m]] = 1.0
    return torch.from_numpy(mask.reshape(1, 1, size, size))


def hadamard_rows(size: int, m: int, ordering: str = "zig_zag") -> torch.Tensor:
    """Flat indices (natural Hadamard order, row-major) of the ``m`` rows kept by ``ordering``.

    :param size: image side ``H = W`` (a power of two).
    :param m: number of rows, ``1 ≤ m ≤ size²``.
    :param ordering: one of :data:`ORDERINGS`.
    """
    if ordering not in ORDERINGS:
        raise TaskError(f"unknown SPC ordering {ordering!r}; choose one of {', '.join(ORDERINGS)}")
    shape = (1, size, size)
    if ordering == "radial":
        mask = dsp.hadamard_2d_ishift(_radial_mask(size, m))
    else:
        mask = {
            "sequency": dsp.sequency_mask,
            "cake_cutting": dsp.cake_cutting_mask,
            "zig_zag": dsp.zig_zag_mask,
            "xy": dsp.xy_mask,
        }[ordering](shape, m)
    rows = torch.nonzero(mask.reshape(-1) > 0.5).reshape(-1)
    if rows.numel() != m:  # deepinv's xy order may tie at the threshold: keep exactly m
        raise TaskError(f"ordering {ordering!r} gave {rows.numel()} rows instead of {m} at size {size}")
    return rows


class HadamardSPC(LinearPhysics):
    r"""Single-pixel camera with ``m`` 2D Hadamard patterns, ±1 (orthonormal) or {0, 1}.

    Measurements have shape ``(B, C, m)``; each channel is measured with the same patterns.

    :param int size: image side (power of two).
    :param rows: flat indices of the kept Hadamard rows (see :func:`hadamard_rows`).
    :param int channels: number of image channels.
    :param str patterns: ``"pm1"`` (orthonormal ±1 rows) or ``"binary"`` ({0, 1} patterns).

    :Example:

    >>> import torch
    >>> A = HadamardSPC(8, hadamard_rows(8, 16), patterns="pm1")
    >>> x = torch.rand(1, 1, 8, 8)
    >>> float(A.adjointness_test(x)) < 1e-5
    True
    """

    def __init__(self, size: int, rows: torch.Tensor, channels: int = 1, patterns: str = "pm1", **kwargs):
        if size <= 0 or size & (size - 1):
            raise TaskError(f"the SPC needs an image side that is a power of two, got {size}")
        if patterns not in PATTERNS:
            raise TaskError(f"unknown SPC patterns {patterns!r}; choose 'pm1' or 'binary'")
        super().__init__(img_size=(channels, size, size), **kwargs)
        self.size, self.channels, self.patterns = size, channels, patterns
        self.register_buffer("rows", torch.as_tensor(rows, dtype=torch.long))
        # {0,1} patterns are √n/2 times larger than the orthonormal rows: the noise follows.
        self.noise_scale = math.sqrt(size * size) / 2 if patterns == "binary" else 1.0

    @property
    def m(self) -> int:
        return int(self.rows.numel())

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        coeffs = fwht2(x).flatten(-2)  # (B, C, n), orthonormal ±1 coefficients
        y = coeffs[..., self.rows]
        if self.patterns == "binary":  # p_i·x = (Σx + h_i·x)/2 = √n (H_0 x + H_i x)/2
            y = (y + coeffs[..., :1]) * (self.size / 2)
        return y

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.patterns == "binary":  # Σ y_i p_i = √n/2 (H_0ᵀ Σy_i + Σ y_i H_iᵀ)
            y = y * (self.size / 2)
        full = y.new_zeros((*y.shape[:-1], self.size * self.size))
        full[..., self.rows] = y
        if self.patterns == "binary":
            full[..., 0] = full[..., 0] + y.sum(-1)
        return fwht2(full.reshape(*y.shape[:-1], self.size, self.size))

    def matrix(self) -> torch.Tensor:
        """The dense ``(m, n)`` matrix of one channel (float64; for tests on small sizes)."""
        eye = torch.eye(self.size * self.size, dtype=torch.float64).reshape(-1, 1, self.size, self.size)
        return self.A(eye).reshape(-1, self.m).T


@dataclass
class SPCConfig(TaskConfig):
    """Single-pixel camera on 32×32 MNIST: the student keeps 10 % of the Hadamard rows, the teacher 50 %."""

    name = "spc"
    description = "single-pixel camera, Hadamard rows (student 10 %, teacher 50 %)"
    channels = 1
    default_dataset = "mnist-embedded"

    student_ratio: float = spec(0.10, "fraction of the n Hadamard rows the student measures, in (0, 1)")
    teacher_ratio: float = spec(0.50, "fraction of the rows the teacher measures, in (student_ratio, 1]")
    ordering: str = spec("zig_zag", f"2D order of the rows: {', '.join(ORDERINGS)}")
    patterns: str = spec("pm1", "student patterns: 'pm1' (orthonormal ±1) or 'binary' ({0,1}, DMD); the teacher is always ±1")

    def validate(self) -> None:
        super().validate()
        size = self.image_size
        if size & (size - 1):
            raise TaskError(f"spc needs an image_size that is a power of two, got {size}")
        if not 0 < self.student_ratio < 1:
            raise TaskError(f"student_ratio must be in (0, 1), got {self.student_ratio}")
        if not 0 < self.teacher_ratio <= 1:
            raise TaskError(f"teacher_ratio must be in (0, 1], got {self.teacher_ratio}")
        if self.teacher_ratio <= self.student_ratio:
            raise TaskError(
                f"the teacher must measure more rows than the student: teacher_ratio {self.teacher_ratio} "
                f"≤ student_ratio {self.student_ratio}"
            )
        if self.ordering not in ORDERINGS:
            raise TaskError(f"unknown SPC ordering {self.ordering!r}; choose one of {', '.join(ORDERINGS)}")
        if self.patterns not in PATTERNS:
            raise TaskError(f"unknown SPC patterns {self.patterns!r}; choose 'pm1' or 'binary'")
        if self.m(self.student_ratio) < 1:
            raise TaskError(f"student_ratio {self.student_ratio} keeps no row at {size}×{size}")

    def m(self, ratio: float) -> int:
        return max(1, round(ratio * self.image_size**2))

    def _build(self, ratio: float, patterns: str) -> HadamardSPC:
        rows = hadamard_rows(self.image_size, self.m(ratio), self.ordering)
        return HadamardSPC(self.image_size, rows, channels=self.channels, patterns=patterns)

    def build_student(self) -> HadamardSPC:
        return self._build(self.student_ratio, self.patterns)

    def build_teacher(self) -> HadamardSPC:
        return self._build(self.teacher_ratio, "pm1")

    def describe(self) -> str:
        n = self.image_size**2
        return (
            f"{self.image_size}×{self.image_size} SPC, {self.ordering} order: student {self.m(self.student_ratio)}/{n} "
            f"{self.patterns} rows, teacher {self.m(self.teacher_ratio)}/{n} pm1 rows"
        )


@dataclass
class SPCBinaryConfig(SPCConfig):
    """The ill-conditioned single-pixel camera: the student displays 10 % {0, 1} micromirror patterns, the
    teacher measures 50 % orthonormal ±1 rows. Every {0, 1} pattern also measures the image mean, so
    AᵀA has a condition number ≈ (m+4)²/4 on its range (2.8·10³ here): PnP-FISTA with P = I is far from
    converged after 20 iterations — the case a preconditioner is for. The same as ``spc`` with
    ``--patterns binary``, as a task of its own (a column of Table I); it uses ``spc``'s denoiser."""

    name = "spc-binary"
    description = "single-pixel camera, {0,1} DMD patterns (student 10 %) vs ±1 rows (teacher 50 %)"
    shipped_denoiser = "spc"

    patterns: str = spec("binary", "student patterns: 'binary' ({0,1}, DMD) or 'pm1'; the teacher is always ±1")

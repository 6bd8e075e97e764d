r"""Your own (student, teacher) pair: a task from two ``deepinv.physics.LinearPhysics`` objects.

:func:`own_task` checks the pair (:func:`check_pair`), registers it under a name (so that
``make_task``, :func:`d2gp.training.train`, :func:`d2gp.apps.evaluate_runs`, ``load_npo`` and the
``d2gp`` command find it by that name, as they find the built-in tasks) and returns the
:class:`~d2gp.tasks.Task`::

    from d2gp.tasks import own_task, gaussian_blur_operator, teacher_of

    student = gaussian_blur_operator((1, 32, 32), sigma=3.0)      # a deepinv BlurFFT
    task = own_task("blur", student, teacher_of(student, sigma=1.0), dataset="mnist-embedded",
                    denoiser="spc")

A run trained on it records the task's name, its settings and a fingerprint of the two operators
(:func:`operator_fingerprint`); evaluating the run later, in another process, needs the same
``own_task`` call first (the operators are Python objects: they are rebuilt by the code that made
them, not read from the run), and weights of other operators are refused.

:func:`teacher_of` derives a teacher from a student where the family allows it: a narrower
Gaussian blur (deepinv's ``Blur``/``BlurFFT``), a smaller super-resolution factor
(``Downsampling`` with a Gaussian filter), more Hadamard rows (:class:`~d2gp.tasks.HadamardSPC`),
a lower MRI acceleration (:class:`~d2gp.tasks.CartesianMRI`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from deepinv.physics import Blur, BlurFFT, Downsampling, LinearPhysics
from deepinv.physics.functional import gaussian_blur

from d2gp.tasks.base import Task, TaskConfig, TaskError, power_norm, spec
from d2gp.tasks.mri import CartesianMRI, gaussian_column_order
from d2gp.tasks.spc import ORDERINGS, HadamardSPC, hadamard_rows
from d2gp.tasks.sr import make_downsampling

__all__ = ["OwnTaskConfig", "own_task", "check_pair", "measured_fraction", "operator_fingerprint",
           "same_operators", "teacher_of", "gaussian_blur_operator", "PROBES"]

#: Random ±1 probes of :func:`measured_fraction` and :func:`operator_fingerprint` (seeded: every call
#: sees the same ones).
PROBES = 8

#: Relative tolerance of :func:`same_operators` (float32 operators on other devices or libraries).
FINGERPRINT_RTOL = 1e-4


# --- what a pair of operators is ------------------------------------------------------------------
def _probes(shape: tuple[int, ...], count: int = PROBES) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 2, (count, *shape), generator=generator).float() * 2 - 1


def _apply(physics: LinearPhysics, role: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A x`` and ``Aᵀ A x``, or a :class:`TaskError` saying that ``physics`` does not act on these images."""
    shape = tuple(x.shape[1:])
    try:
        with torch.no_grad():
            y = physics.A(x)
            back = physics.A_adjoint(y)
    except Exception as error:  # any failure of the user's operator on these images
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TaskError(f"the {role} operator ({type(physics).__name__}) cannot be applied to images of shape "
                        f"{shape}: {type(error).__name__}: {first[:200]}") from None
    if tuple(back.shape) != tuple(x.shape):
        raise TaskError(f"the {role} operator ({type(physics).__name__}) does not act on images of shape {shape}: "
                        f"its A_adjoint(A(x)) has shape {tuple(back.shape[1:])}; student and teacher must act on "
                        f"the same images")
    return y, back


def _energies(physics: LinearPhysics, shape: tuple[int, ...], role: str = "operator") -> torch.Tensor:
    """‖A p_i‖² for the seeded ±1 probes p_i (float64), checked on the way (see :func:`_apply`)."""
    probes = _probes(shape).to(_device_of(physics))
    y, _ = _apply(physics, role, probes)
    return y.double().flatten(1).pow(2).sum(1).cpu()


def _device_of(physics: LinearPhysics) -> torch.device:
    from d2gp.device import module_device

    return module_device(physics)


def measured_fraction(physics: LinearPhysics, shape: tuple[int, ...], norm: float | None = None) -> float:
    r"""How much of the image ``physics`` measures: :math:`\operatorname{tr}(A^\top A) / (n\,\|A^\top A\|)`.

    The mean eigenvalue of :math:`A^\top A` relative to its largest one, in (0, 1]: the number of
    directions A measures, each weighted by how well (relative to the best-measured one), over n.
    It is m/n for m orthonormal rows (±1 Hadamard rows, MRI columns), the mean of
    :math:`|\hat h(\omega)|^2` for a blur of unit gain, and tiny for {0, 1} patterns (one direction,
    the image mean, dominates). The trace is Hutchinson's estimate from :data:`PROBES` seeded ±1
    probes (:math:`E\|A p\|^2 = \operatorname{tr}(A^\top A)`), the norm the power method.

    :param physics: the operator A.
    :param shape: the image shape ``(C, H, W)``.
    :param norm: ‖AᵀA‖ when already known (else :func:`~d2gp.tasks.base.power_norm`).
    """
    energies = _energies(physics, shape)
    norm = power_norm(physics, shape) if norm is None else norm
    n = math.prod(shape)
    return float(energies.mean()) / (n * norm) if norm > 0 else 0.0


def check_pair(student: LinearPhysics, teacher: LinearPhysics, shape: tuple[int, ...]) -> dict:
    r"""Check that ``student`` and ``teacher`` can be a D2GP pair on images of ``shape``; return what was measured.

    Both must apply to a batch of images of ``shape``, map back to that shape with ``A_adjoint``,
    be adjoint pairs (⟨Ax, y⟩ = ⟨x, Aᵀy⟩ to 10⁻³), measure something, and the teacher must be the
    better-posed one: it must measure a larger part of the image, :func:`measured_fraction`
    (tr(AᵀA)/(n‖AᵀA‖), from 8 probes and the power method — a few dozen operator applications).
    This criterion, rather than the condition number of AᵀA on its range, is what separates the
    pairs of the built-in tasks: the ±1 SPC and MRI students and teachers all have κ ≈ 1 on their
    ranges (README, *Inside the shipped NPOs*) — the teacher's advantage is rank (5× the rows,
    2× the columns) — while a narrower blur raises every Fourier gain. The probes are the same
    for both operators, so a teacher that measures everything the student does (nested rows or
    columns, a narrower Gaussian) always passes.

    :param shape: the image shape ``(C, H, W)``.
    :return: ``{"student": {"norm", "measured_fraction"}, "teacher": {...}}``.
    :raises TaskError: naming what does not fit.
    """
    shape = tuple(int(s) for s in shape)
    found = {}
    for role, physics in (("student", student), ("teacher", teacher)):
        if not isinstance(physics, LinearPhysics):
            raise TaskError(f"the {role} must be a deepinv.physics.LinearPhysics, got {type(physics).__name__}")
        generator = torch.Generator().manual_seed(1)
        x = torch.randn((2, *shape), generator=generator).to(_device_of(physics))
        y, _ = _apply(physics, role, x)
        r = torch.randn(y.shape, generator=generator).to(y.device)
        with torch.no_grad():
            lhs, rhs = (y.double() * r.double()).sum(), (x.double() * physics.A_adjoint(r).double()).sum()
        if abs(float(lhs - rhs)) > 1e-3 * (abs(float(lhs)) + abs(float(rhs))):
            raise TaskError(f"the {role}'s A_adjoint is not the adjoint of its A: ⟨Ax, y⟩ = {float(lhs):.6g} but "
                            f"⟨x, Aᵀy⟩ = {float(rhs):.6g}")
        norm = power_norm(physics, shape)
        if not norm > 0:
            raise TaskError(f"the {role} operator measures nothing: ‖AᵀA‖ = {norm}")
        found[role] = {"norm": norm, "measured_fraction": measured_fraction(physics, shape, norm)}
    s, t = found["student"]["measured_fraction"], found["teacher"]["measured_fraction"]
    if not t > s * (1 + 1e-6):
        raise TaskError(
            f"the teacher is not better posed than the student: it measures {t:.2%} of the image, the student "
            f"{s:.2%} (tr(AᵀA)/(n‖AᵀA‖): the mean of AᵀA's spectrum over its largest eigenvalue); the teacher "
            f"needs more rows or measurements, a lower acceleration, a smaller blur or factor (were they swapped?)")
    return found


def operator_fingerprint(physics: LinearPhysics, shape: tuple[int, ...]) -> list[float]:
    """‖A p_i‖² for the seeded probes of :func:`measured_fraction` (6 significant digits): two operators
    with the same fingerprint act alike on those probes. Compare with :func:`same_operators`."""
    return [float(f"{e:.6g}") for e in _energies(physics, shape).tolist()]


def same_operators(a: Any, b: Any) -> bool:
    """Whether two recorded ``{"student": fingerprint, "teacher": fingerprint}`` agree (to
    :data:`FINGERPRINT_RTOL`)."""
    try:
        return all(len(a[r]) == len(b[r]) and all(math.isclose(u, v, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-12)
                                                  for u, v in zip(a[r], b[r])) for r in ("student", "teacher"))
    except (KeyError, TypeError):
        return False


# --- the task -------------------------------------------------------------------------------------
@dataclass
class OwnTaskConfig(TaskConfig):
    """The configuration of a task made by :func:`own_task`: its two operators are class attributes
    (copied for every :class:`~d2gp.tasks.Task`), its settings the fields of :class:`TaskConfig`
    (image size fixed by the operators)."""

    student_operator: ClassVar[LinearPhysics | None] = None
    teacher_operator: ClassVar[LinearPhysics | None] = None
    #: ``{"student": fingerprint, "teacher": fingerprint}`` (:func:`operator_fingerprint`), recorded in runs.
    operators: ClassVar[dict] = {}
    #: the side of the images the operators act on
    image_side: ClassVar[int] = 0

    def validate(self) -> None:
        super().validate()
        if self.image_size != self.image_side:
            raise TaskError(f"task {self.name!r} has operators for {self.image_side}×{self.image_side} images: its "
                            f"image_size cannot be changed (got {self.image_size})")

    def build_student(self) -> LinearPhysics:
        return copy.deepcopy(self.student_operator)

    def build_teacher(self) -> LinearPhysics:
        return copy.deepcopy(self.teacher_operator)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "operators": copy.deepcopy(self.operators)}


def _image_shape(student, teacher, image_shape) -> tuple[int, int, int]:
    if image_shape is None:
        for physics in (student, teacher):
            size = getattr(physics, "img_size", None) or getattr(physics, "imsize", None)
            if size is not None and len(size) == 3:
                image_shape = tuple(size)
                break
        else:
            raise TaskError("the image shape (C, H, W) cannot be read from the operators: pass image_shape=")
    try:
        shape = tuple(int(s) for s in image_shape)
    except (TypeError, ValueError):
        raise TaskError(f"image_shape must be (C, H, W), got {image_shape!r}") from None
    if len(shape) != 3 or shape[1] != shape[2] or min(shape) < 1:
        raise TaskError(f"image_shape must be (C, H, W) of square images (H = W), got {image_shape!r}")
    return shape


def _denoiser_source(denoiser, channels: int) -> tuple[str, str | None]:
    """``(shipped_denoiser, denoiser)`` of a task: a built-in task's name, or a weights file."""
    from d2gp.denoisers import shipped_denoiser_path

    if denoiser is None:
        return "", None
    if isinstance(denoiser, torch.nn.Module):
        raise TaskError("pass the denoiser as a weights file (save it with d2gp.denoisers.save_denoiser) or the name "
                        "of a task whose shipped one fits the images: a run must be able to load it again later")
    source = str(denoiser)
    if not Path(source).suffix and not Path(source).exists():
        if not shipped_denoiser_path(source).is_file():
            raise TaskError(f"no denoiser is shipped for {source!r}: pass a DnCNN weights file or a built-in task "
                            f"(spc, mri: grey images; sr: RGB)")
        return source, None
    path = Path(source).expanduser()
    if not path.is_file():
        raise TaskError(f"denoiser file {source} does not exist")
    return "", str(path.resolve())


def own_task(name: str, student: LinearPhysics, teacher: LinearPhysics, *,
             image_shape: tuple[int, int, int] | None = None, dataset: str = "", data_root: str | None = None,
             denoiser: str | None = None, denoiser_scale: float = 1.0, noise_sigma: float = 0.01,
             description: str = "", check: bool = True, replace: bool = False,
             device: str | torch.device | None = "cpu") -> Task:
    """Register the pair ``(student, teacher)`` as the task ``name`` and build it.

    After this call ``make_task(name)``, :func:`d2gp.training.train` with ``TrainConfig(task=name)``,
    :func:`d2gp.apps.evaluate_runs`, ``load_npo`` (and ``d2gp --import MODULE …`` for a module that
    makes this call) work on it as on the built-in tasks. Calling it again with the same operators
    and settings is harmless (e.g. in a later session, before evaluating a run).

    :param name: the task's name (lower-case letters, digits, ``-``, ``_``); not a built-in one.
    :param student, teacher: ``LinearPhysics`` on the same images; copied (the objects passed are not
        changed), with the task's Gaussian noise of std ``noise_sigma`` instead of their own.
    :param image_shape: ``(C, H, W)``, square; default: the operators' ``img_size``.
    :param dataset: the images, a name of ``d2gp datasets`` (converted to C channels, resized to H);
        empty: pass them to ``train``/``evaluate_runs`` yourself.
    :param data_root: the folder of a real dataset (``folder``: any PNG/JPEG images).
    :param denoiser: a DnCNN weights file, or a built-in task whose shipped denoiser fits the images
        (``"spc"``: grey 32×32 digits, ``"mri"``: grey brain slices, ``"sr"``: RGB photographs).
    :param denoiser_scale: the prior c·D(x), 0 < c ≤ 1 (below 1 when PnP-FISTA is unstable past K).
    :param check: run :func:`check_pair` (shapes, adjointness, the teacher better posed).
    :param replace: replace another pair registered under ``name`` (else that is an error).
    :param device: where the task's operators and denoiser live.
    :raises TaskError: a bad name, shape, pair, dataset or denoiser.
    """
    from d2gp.tasks import TASKS, register_task

    shape = _image_shape(student, teacher, image_shape)
    if check:
        check_pair(student, teacher, shape)
    student, teacher = (copy.deepcopy(p).cpu() for p in (student, teacher))
    shipped, denoiser_file = _denoiser_source(denoiser, shape[0])
    fields = {f.name: f for f in dataclasses.fields(TaskConfig)}
    defaults = {"image_size": shape[1], "noise_sigma": noise_sigma, "dataset": dataset, "data_root": data_root,
                "denoiser": denoiser_file, "denoiser_scale": denoiser_scale}
    body = {
        "__annotations__": {key: fields[key].type for key in defaults},
        **{key: spec(value, fields[key].metadata.get("help", "")) for key, value in defaults.items()},
        "name": name, "channels": shape[0], "shipped_denoiser": shipped, "image_side": shape[1],
        "description": description or f"your own pair: {type(student).__name__} student, "
                                      f"{type(teacher).__name__} teacher, {shape[1]}×{shape[2]}",
        "student_operator": student, "teacher_operator": teacher,
        "operators": {"student": operator_fingerprint(student, shape),
                      "teacher": operator_fingerprint(teacher, shape)},
        "__module__": __name__, "__qualname__": f"OwnTaskConfig[{name}]",
    }
    cls = dataclass(type(f"OwnTaskConfig[{name}]", (OwnTaskConfig,), body))
    cls().validate()
    existing = TASKS.get(name) if isinstance(name, str) else None
    same = (isinstance(existing, type) and issubclass(existing, OwnTaskConfig) and existing.channels == cls.channels
            and existing.shipped_denoiser == cls.shipped_denoiser and existing().to_dict() == cls().to_dict())
    register_task(cls, replace=replace or same, check=False)
    return Task(cls(), device=device)


# --- teachers derived from students ---------------------------------------------------------------
def _gaussian_kernel(sigma: float, side: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """deepinv's ``gaussian_blur`` of std ``sigma`` (1, 1, k, k), its size k (≈ 6.7σ) cut to fit an image
    of ``side`` pixels: a larger kernel would wrap around the image and lose its unit gain."""
    size = 2 * int(sigma / 0.3 + 1) + 1  # gaussian_blur's own choice
    size = min(size, side if side % 2 else side - 1)
    return gaussian_blur(psf_size=(size, size), sigma=(float(sigma), float(sigma)), dtype=dtype)


def gaussian_blur_operator(image_shape: tuple[int, int, int], sigma: float, fft: bool = True) -> LinearPhysics:
    """A Gaussian blur of std ``sigma`` pixels with circular boundaries: deepinv's ``BlurFFT``
    (``fft=True``) or ``Blur(padding="circular")`` with :func:`deepinv.physics.functional.gaussian_blur`."""
    if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
        raise TaskError(f"the blur's sigma must be a finite number > 0, got {sigma!r}")
    kernel = _gaussian_kernel(sigma, image_shape[-1])
    if fft:
        return BlurFFT(img_size=tuple(image_shape), filter=kernel)
    return Blur(filter=kernel, padding="circular")


def _gaussian_sigma(physics, what: str) -> float:
    """The std of the centred isotropic Gaussian kernel of ``physics`` (as deepinv's ``gaussian_blur``
    samples it), from the ratio of its two central samples, checked against the whole kernel."""
    kernel = getattr(physics, "filter", None)
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 4 or kernel.shape[-1] % 2 == 0 or kernel.shape[-1] < 3:
        raise TaskError(f"the {what}'s filter is not a 2D kernel of odd size: give the teacher yourself")
    k = kernel[0, 0].double().cpu()
    c = k.shape[-1] // 2
    ratio = float(k[k.shape[0] // 2, c + 1] / k[k.shape[0] // 2, c]) if float(k[k.shape[0] // 2, c]) > 0 else 0.0
    if not 0 < ratio < 1:
        raise TaskError(f"the {what}'s filter is not a centred Gaussian: give the teacher yourself")
    sigma = float(f"{math.sqrt(-1 / (2 * math.log(ratio))):.5g}")  # float32 samples: 5 digits are exact
    fit = gaussian_blur(psf_size=tuple(k.shape), sigma=(sigma, sigma), dtype=torch.float64)[0, 0]
    if not torch.allclose(fit / fit.max(), k / k.max(), atol=1e-4):
        raise TaskError(f"the {what}'s filter is not an isotropic Gaussian (deepinv.physics.functional.gaussian_blur): "
                        f"give the teacher yourself")
    return sigma


def teacher_of(student: LinearPhysics, *, sigma: float | None = None, factor: int | None = None,
               ratio: float | None = None, acceleration: float | None = None,
               ordering: str = "zig_zag", seed: int = 0) -> LinearPhysics:
    """A better-posed teacher of the same family as ``student``, on the same images.

    * deepinv ``BlurFFT`` / ``Blur`` with a Gaussian kernel: the same blur with std ``sigma``
      (default half the student's), which must be smaller than the student's;
    * deepinv ``Downsampling`` with a Gaussian filter (the ``sr`` task's operator): decimation by
      ``factor`` (default half the student's) with the blur scaled to it (std ∝ factor, as in ``sr``);
    * :class:`~d2gp.tasks.HadamardSPC`: ±1 rows, the student's and then those of ``ordering`` up to
      the fraction ``ratio`` of all rows (default 5× the student's, at most all);
    * :class:`~d2gp.tasks.CartesianMRI`: the student's columns and then those of the Gaussian
      priority order (``seed``) up to ``W / acceleration`` (default half the student's acceleration).

    :raises TaskError: another family (build the teacher yourself), a filter that is not Gaussian,
        or settings that would not give a better-posed teacher.
    """
    if isinstance(student, (BlurFFT, Blur)):
        width = _gaussian_sigma(student, "student")
        target = width / 2 if sigma is None else sigma
        if not (isinstance(target, (int, float)) and 0 < target < width):
            raise TaskError(f"the teacher's blur must be narrower than the student's (std {width:.4g}), got {target!r}")
        side = student.img_size[-1] if isinstance(student, BlurFFT) else 2 * student.filter.shape[-1] + 1
        kernel = _gaussian_kernel(float(target), side, student.filter.dtype)
        kernel = kernel.expand(-1, student.filter.shape[1], -1, -1).contiguous().to(student.filter.device)
        if isinstance(student, BlurFFT):
            return BlurFFT(img_size=student.img_size, filter=kernel, device=student.filter.device)
        return Blur(filter=kernel, padding=student.padding, use_fft=student.use_fft, device=student.filter.device)
    if isinstance(student, Downsampling):
        width, d = _gaussian_sigma(student, "student"), int(student.factor)
        target = max(1, d // 2) if factor is None else factor
        if not (isinstance(target, int) and 1 <= target < d):
            raise TaskError(f"the teacher's factor must be an integer in [1, {d}) (the student's is {d}), got {target!r}")
        size = tuple(student.imsize or student.img_size)
        if size[-1] % target:
            raise TaskError(f"the teacher's factor {target} does not divide the image side {size[-1]}")
        return make_downsampling(size, target, width / d, padding=student.padding).to(student.filter.device)
    if isinstance(student, HadamardSPC):
        n = student.size ** 2
        target = min(1.0, 5 * student.m / n) if ratio is None else ratio
        m = round(target * n) if isinstance(target, (int, float)) else 0
        if not m > student.m or target > 1:
            raise TaskError(f"the teacher must measure more rows than the student ({student.m}/{n}) and at most all: "
                            f"got ratio {target!r}")
        if ordering not in ORDERINGS:
            raise TaskError(f"unknown SPC ordering {ordering!r}; choose one of {', '.join(ORDERINGS)}")
        rows = student.rows.cpu().tolist()
        taken = set(rows)
        rows += [r for r in hadamard_rows(student.size, m, ordering).tolist() if r not in taken][: m - len(rows)]
        return HadamardSPC(student.size, torch.tensor(sorted(rows)), channels=student.channels, patterns="pm1")
    if isinstance(student, CartesianMRI):
        W = student.size
        target = student.acceleration / 2 if acceleration is None else acceleration
        columns = round(W / target) if isinstance(target, (int, float)) and target > 0 else 0
        if not (target >= 1 and columns > student.columns.numel()):
            raise TaskError(f"the teacher must be less accelerated than the student (R = {student.acceleration:g}) "
                            f"and R ≥ 1, got {target!r}")
        kept = ((student.columns.cpu() + W // 2) % W).tolist()  # back to centred coordinates
        taken = set(kept)
        order = [int(c) for c in gaussian_column_order(W, seed=seed) if int(c) not in taken]
        return CartesianMRI(W, kept + order[: columns - len(kept)], channels=student.channels)
    raise TaskError(f"no teacher can be derived from a {type(student).__name__}: build the teacher yourself "
                    f"(teacher_of knows Gaussian Blur/BlurFFT, Downsampling, HadamardSPC and CartesianMRI)")

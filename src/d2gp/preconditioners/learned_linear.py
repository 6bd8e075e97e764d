r"""Learned *linear* preconditioners P(g, k) (Ehrhardt, Fahy & Golbabaee 2024), baselines for the NPO.

Preconditioned PnP-FISTA (:func:`d2gp.solver.pnp_fista`) steps as
:math:`x_{k+1} = D(z_k − γ P(g_k, k))` with :math:`g_k = A^\top(A z_k − y)`. Ehrhardt et al.
replace the scalar step of gradient methods by a learned linear operator; the four
parametrisations here (on images of shape (C, H, W), :math:`n = CHW`, K learned iterations):

==================  ===============================================  ==================
``kind``            P(g, k)                                          parameters
==================  ===============================================  ==================
``"scalar"``        :math:`α_k\,g`                                   K
``"pointwise"``     :math:`d_k ⊙ g` (a diagonal per iteration)       K·C·H·W = K·n
``"convolutional"`` :math:`w_k ⋆ g`, one s×s kernel per iteration     K·C·s² (s = 5)
                    and channel (depthwise)
``"full"``          :math:`M\,\mathrm{vec}(g)`, one dense n×n matrix  n²
                    shared by all iterations
==================  ===============================================  ==================

Conventions common to all of them:

* **identity at initialisation** (α = 1, d = 1, w = δ, M = I): a fresh module returns g bit
  for bit, so the preconditioned solver reproduces plain PnP-FISTA exactly;
* **iterations beyond K** (evaluation runs to 2K): iteration k ≥ K uses the parameters of the
  last learned iteration K − 1 (the full matrix is the same at every k anyway);
* ``uses_iterate = False``; ``forward(grad, k=0, iterate=None)`` takes ``grad`` of shape
  (B, C, H, W) and an integer k ≥ 0 and returns a tensor of ``grad``'s shape. ``"pointwise"``
  and ``"full"`` need exactly the (H, W) they were built for; ``"scalar"`` and
  ``"convolutional"`` accept any H × W. A wrong shape is a ``ValueError`` naming the expected
  and the received shapes;
* the convolution is a depthwise cross-correlation (as :class:`torch.nn.Conv2d`) with **zero
  'same' padding** by default (``padding="circular"`` wraps around instead); it is evaluated
  as :math:`g + (w_k − δ) ⋆ g`, which is exactly g at initialisation on every backend (a
  TF32/Winograd/bfloat16 convolution cannot round the output of a zero kernel);
* the full matrix acts on the C-major flattening ``g.flatten(1)`` (a plain matmul on the
  batch, ``F.linear``). For 64×64 RGB, n = 12 288: 151 M parameters, 604 MB in float32
  (:meth:`FullLinear.memory_bytes`); above ``max_parameters`` (default 2·10⁸) the constructor
  refuses with a ``ValueError`` before allocating anything.

Training objective (:func:`objective_loss`): Ehrhardt et al. learn the preconditioner so that
every step decreases the objective, minimising the sum over the iterations of the objective
at the iterates. Plug-and-play has no explicit regulariser, so here the objective is the data
fidelity :math:`f(x) = \tfrac12\|Ax − y\|^2` (optionally plus the squared distance to the
ground truth), evaluated at every :math:`x_{k+1}` and normalised by its value at
:math:`x_0`.

References:
    Ehrhardt, Fahy & Golbabaee, "Learning preconditioners for inverse problems",
    arXiv:2406.00260, 2024.
    Gualdrón-Hurtado et al., "Deep distillation gradient preconditioning for inverse problems",
    arXiv:2508.04832, 2025 (Table I: the learned linear preconditioners vs the NPO).
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from d2gp.solver import Trace, fidelity

__all__ = [
    "LearnedLinear", "ScalarStep", "Pointwise", "Convolutional", "FullLinear",
    "LINEAR_PRECONDITIONERS", "build_linear", "objective_loss", "fidelity_decrease_loss",
    "DEFAULT_MAX_PARAMETERS",
]

ImageSize = Union[int, Sequence[int]]

#: Default ceiling on the n² entries of a :class:`FullLinear` matrix (2·10⁸: 800 MB in float32).
DEFAULT_MAX_PARAMETERS = 200_000_000


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
    return value


def _image_size(image_size: ImageSize) -> tuple[int, int]:
    """``image_size`` as (H, W): an int is a square side, a pair is (H, W)."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    else:
        try:
            size = tuple(image_size)
        except TypeError:
            size = ()
        if len(size) != 2:
            raise ValueError(f"image_size must be an int or a pair (H, W), got {image_size!r}")
    for value in size:
        _positive_int("image_size", value)
    return size  # type: ignore[return-value]


def _format_bytes(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{int(count)} B"


class LearnedLinear(nn.Module):
    """Base class of the learned linear preconditioners (see the module documentation).

    :param channels: image channels C.
    :param image_size: side of square images, or (H, W).
    :param iterations: number K of learned iterations (k ≥ K reuses iteration K − 1).
    """

    #: Short name of the parametrisation (the key in :data:`LINEAR_PRECONDITIONERS`).
    kind: str = ""
    uses_iterate = False
    #: Whether the gradient must have exactly the (H, W) the module was built for.
    fixed_size: bool = True

    def __init__(self, channels: int, image_size: ImageSize, iterations: int):
        super().__init__()
        self.channels = _positive_int("channels", channels)
        self.image_size = _image_size(image_size)
        self.iterations = _positive_int("iterations", iterations)
        self._config: dict[str, Any] = dict(channels=self.channels, image_size=self.image_size,
                                            iterations=self.iterations)

    # Description ---------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``build_linear(P.kind, **P.config)`` rebuilds the module."""
        return dict(self._config)

    @property
    def numel(self) -> int:
        """n = C·H·W, the size of one (flattened) gradient."""
        return self.channels * self.image_size[0] * self.image_size[1]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of (trainable) parameters; equals :meth:`parameter_count` of the configuration."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @classmethod
    def parameter_count(cls, channels: int, image_size: ImageSize, iterations: int, **options) -> int:
        """The number of parameters of ``cls(channels, image_size, iterations, **options)``, without building it."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config.items())

    # Checks ---------------------------------------------------------------------------------------
    def expected_shape(self) -> str:
        H, W = self.image_size
        return f"(B, {self.channels}, {H}, {W})" if self.fixed_size else f"(B, {self.channels}, H, W)"

    def _check(self, grad: torch.Tensor) -> None:
        ok = grad.dim() == 4 and grad.shape[1] == self.channels
        if ok and self.fixed_size:
            ok = tuple(grad.shape[2:]) == self.image_size
        if not ok:
            raise ValueError(f"{type(self).__name__}(channels={self.channels}, image_size={self.image_size}) expects "
                             f"grad of shape {self.expected_shape()}, got {tuple(grad.shape)}")

    def index(self, k: Union[int, torch.Tensor, None]) -> int:
        """The parameter index used at iteration k: ``min(k, K − 1)`` (``None`` is 0)."""
        if k is None:
            return 0
        if isinstance(k, torch.Tensor):
            if k.numel() != 1 or k.dtype.is_floating_point or k.dtype == torch.bool:
                raise ValueError(f"k must be one integer iteration index, got a tensor of shape "
                                 f"{tuple(k.shape)} and dtype {k.dtype}")
            k = int(k.item())
        try:
            index = operator.index(k) if not isinstance(k, bool) else -1  # ints, numpy integers
        except TypeError:
            index = -1
        if index < 0:
            raise ValueError(f"k must be an int ≥ 0, got {k!r}")
        return min(index, self.iterations - 1)

    # Application ----------------------------------------------------------------------------------
    def apply(self, grad: torch.Tensor, index: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, grad: torch.Tensor, k: Union[int, torch.Tensor, None] = 0,
                iterate: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check(grad)
        return self.apply(grad, self.index(k))

    @torch.no_grad()
    def as_matrix(self, k: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense n×n matrix of g ↦ P(g, k) on the C-major flattening (for tests: small n only).

        Computed by applying P to the n basis images in ``dtype`` (the parameters are cast to it).
        """
        n = self.numel
        device = next(self.parameters()).device
        basis = torch.eye(n, dtype=dtype, device=device).reshape(n, self.channels, *self.image_size)
        return self(basis, k).reshape(n, n).T.contiguous()


class ScalarStep(LearnedLinear):
    r"""A learned step per iteration, :math:`P(g, k) = α_k\,g` (K parameters, α = 1 at init).

    >>> P = ScalarStep(channels=1, image_size=8, iterations=4)
    >>> g = torch.randn(2, 1, 8, 8)
    >>> torch.equal(P(g, 0), g), P.num_parameters()
    (True, 4)
    """

    kind = "scalar"
    fixed_size = False

    def __init__(self, channels: int, image_size: ImageSize, iterations: int):
        super().__init__(channels, image_size, iterations)
        self.alpha = nn.Parameter(torch.ones(self.iterations))

    @classmethod
    def parameter_count(cls, channels, image_size, iterations, **options) -> int:
        return _positive_int("iterations", iterations)

    def apply(self, grad: torch.Tensor, index: int) -> torch.Tensor:
        return self.alpha[index].to(grad.dtype) * grad


class Pointwise(LearnedLinear):
    r"""A learned diagonal per iteration, :math:`P(g, k) = d_k ⊙ g` (K·C·H·W parameters, d = 1 at init).

    >>> P = Pointwise(channels=3, image_size=(8, 6), iterations=2)
    >>> P.diagonal.shape, P.num_parameters()
    (torch.Size([2, 3, 8, 6]), 288)
    """

    kind = "pointwise"

    def __init__(self, channels: int, image_size: ImageSize, iterations: int):
        super().__init__(channels, image_size, iterations)
        self.diagonal = nn.Parameter(torch.ones(self.iterations, self.channels, *self.image_size))

    @classmethod
    def parameter_count(cls, channels, image_size, iterations, **options) -> int:
        H, W = _image_size(image_size)
        return _positive_int("iterations", iterations) * _positive_int("channels", channels) * H * W

    def apply(self, grad: torch.Tensor, index: int) -> torch.Tensor:
        return self.diagonal[index].to(grad.dtype) * grad


class Convolutional(LearnedLinear):
    r"""A learned depthwise s×s kernel per iteration and channel, :math:`P(g, k) = w_k ⋆ g`.

    K·C·s² parameters (``weight`` of shape (K, C, 1, s, s)), the delta kernel δ at init.
    Evaluated as :math:`g + (w_k − δ) ⋆ g` (exactly g at init on any backend).

    :param kernel_size: s, odd (default 5).
    :param padding: ``"zeros"`` (default, 'same' zero padding as :class:`torch.nn.Conv2d`) or
        ``"circular"`` (periodic images).

    >>> P = Convolutional(channels=3, image_size=16, iterations=4)
    >>> g = torch.randn(2, 3, 16, 16)
    >>> torch.equal(P(g, 2), g), P.num_parameters()
    (True, 300)
    """

    kind = "convolutional"
    fixed_size = False
    PADDINGS = ("zeros", "circular")

    def __init__(self, channels: int, image_size: ImageSize, iterations: int, kernel_size: int = 5,
                 padding: str = "zeros"):
        super().__init__(channels, image_size, iterations)
        _positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (to keep the image size), got {kernel_size}")
        if padding not in self.PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(map(repr, self.PADDINGS))}, got {padding!r}")
        self.kernel_size, self.padding = kernel_size, padding
        self._config.update(kernel_size=kernel_size, padding=padding)
        delta = torch.zeros(self.channels, 1, kernel_size, kernel_size)
        delta[:, :, kernel_size // 2, kernel_size // 2] = 1.0
        self.register_buffer("delta", delta, persistent=False)
        self.weight = nn.Parameter(delta.expand(self.iterations, -1, -1, -1, -1).clone())

    @classmethod
    def parameter_count(cls, channels, image_size, iterations, kernel_size: int = 5, **options) -> int:
        return _positive_int("iterations", iterations) * _positive_int("channels", channels) * kernel_size**2

    def _check(self, grad: torch.Tensor) -> None:
        super()._check(grad)
        half = self.kernel_size // 2
        if self.padding == "circular" and min(grad.shape[2:]) < half:
            raise ValueError(f"circular padding of a {self.kernel_size}×{self.kernel_size} kernel needs images "
                             f"of at least {half}×{half}, got grad of shape {tuple(grad.shape)}")

    def apply(self, grad: torch.Tensor, index: int) -> torch.Tensor:
        residual = (self.weight[index] - self.delta).to(grad.dtype)  # w_k − δ: zero at init
        half = self.kernel_size // 2
        if self.padding == "circular":
            h = F.conv2d(F.pad(grad, (half, half, half, half), mode="circular"), residual, groups=self.channels)
        else:
            h = F.conv2d(grad, residual, padding=half, groups=self.channels)
        return grad + h.to(grad.dtype)


class FullLinear(LearnedLinear):
    r"""One dense n×n matrix shared by all iterations, :math:`P(g, k) = M\,\mathrm{vec}(g)`, n = C·H·W.

    n² parameters (``matrix``), the identity at init; ``vec`` is ``g.flatten(1)`` (C-major), and
    the batch is one matmul. The memory grows as n⁴ in the image side
    (:meth:`memory_bytes`): the constructor raises a ``ValueError`` when n² > ``max_parameters``.

    :param diagonal_only: constrain M to its diagonal: the off-diagonal entries are ignored
        (and get no gradient) and P(g) = diag(M) ⊙ g, i.e. a :class:`Pointwise` with one diagonal
        for all iterations (an ablation; M is still stored in full).
    :param max_parameters: refuse matrices with more entries than this (default 2·10⁸).

    >>> P = FullLinear(channels=1, image_size=8, iterations=3)
    >>> P.matrix.shape, P.num_parameters(), FullLinear.memory_bytes(3, 64)
    (torch.Size([64, 64]), 4096, 603979776)
    """

    kind = "full"

    def __init__(self, channels: int, image_size: ImageSize, iterations: int = 1, diagonal_only: bool = False,
                 max_parameters: Optional[float] = DEFAULT_MAX_PARAMETERS):
        super().__init__(channels, image_size, iterations)
        n = self.numel
        if max_parameters is not None and n * n > max_parameters:
            H, W = self.image_size
            raise ValueError(
                f"FullLinear on ({self.channels}, {H}, {W}) images needs an n×n matrix with n = {n}: {n * n:,} "
                f"parameters ({_format_bytes(self.memory_bytes(self.channels, self.image_size))} in float32), "
                f"above max_parameters={max_parameters:,.0f}; use a pointwise or convolutional preconditioner, "
                f"or raise max_parameters")
        self.diagonal_only = bool(diagonal_only)
        self._config.update(diagonal_only=self.diagonal_only, max_parameters=max_parameters)
        self.matrix = nn.Parameter(torch.eye(n))

    @classmethod
    def parameter_count(cls, channels, image_size, iterations=1, **options) -> int:
        H, W = _image_size(image_size)
        n = _positive_int("channels", channels) * H * W
        return n * n

    @staticmethod
    def memory_bytes(channels: int, image_size: ImageSize, dtype: torch.dtype = torch.float32,
                     copies: int = 1) -> int:
        """Bytes taken by the n×n matrix: n²·itemsize·``copies``.

        ``copies=4`` counts what Adam training holds (the matrix, its gradient, two moments).
        For 64×64 RGB in float32: 12 288² · 4 B = 604 MB (2.4 GB with Adam).
        """
        n = FullLinear.parameter_count(channels, image_size)
        return n * torch.empty((), dtype=dtype).element_size() * int(copies)

    @classmethod
    def from_diagonal(cls, diagonal: torch.Tensor, iterations: int = 1, **options) -> "FullLinear":
        """The full matrix diag(``diagonal``) for images of ``diagonal``'s shape (C, H, W)."""
        if diagonal.dim() != 3:
            raise ValueError(f"diagonal must have shape (C, H, W), got {tuple(diagonal.shape)}")
        C, H, W = diagonal.shape
        P = cls(C, (H, W), iterations, **options)
        with torch.no_grad():
            P.matrix.copy_(torch.diag(diagonal.reshape(-1).to(P.matrix.dtype)))
        return P

    def apply(self, grad: torch.Tensor, index: int) -> torch.Tensor:
        M = self.matrix.to(grad.dtype)
        if self.diagonal_only:
            return torch.diagonal(M).reshape(grad.shape[1:]) * grad
        return F.linear(grad.flatten(1), M).reshape(grad.shape)


#: The learned linear preconditioners by kind.
LINEAR_PRECONDITIONERS: dict[str, type[LearnedLinear]] = {
    cls.kind: cls for cls in (ScalarStep, Pointwise, Convolutional, FullLinear)
}


def build_linear(kind: str, channels: int, image_size: ImageSize, iterations: int, **options) -> LearnedLinear:
    """Build the learned linear preconditioner ``kind`` (a key of :data:`LINEAR_PRECONDITIONERS`).

    ``options`` are the kind's own arguments (``kernel_size``/``padding`` for
    ``"convolutional"``, ``diagonal_only``/``max_parameters`` for ``"full"``).

    >>> build_linear("convolutional", 1, 32, 10, kernel_size=3).num_parameters()
    90
    """
    if kind not in LINEAR_PRECONDITIONERS:
        raise ValueError(f"unknown linear preconditioner {kind!r}; choose one of {', '.join(LINEAR_PRECONDITIONERS)}")
    cls = LINEAR_PRECONDITIONERS[kind]
    accepted = [name for name in inspect.signature(cls.__init__).parameters
                if name not in ("self", "channels", "image_size", "iterations")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"linear preconditioner {kind!r} has no option {', '.join(unknown)}; "
                         f"its options are {', '.join(accepted) or 'none'}")
    return cls(channels, image_size, iterations, **options)


def objective_loss(physics, trace: Union[Trace, Sequence[torch.Tensor]], y: torch.Tensor,
                   weights: Optional[Sequence[float]] = None, *, x0: Optional[torch.Tensor] = None,
                   ground_truth: Optional[torch.Tensor] = None, distance_weight: float = 1.0,
                   eps: float = 1e-12) -> torch.Tensor:
    r"""Ehrhardt et al.'s objective-decrease loss: the objective summed over the iterates.

    .. math::

        L = \frac1B \sum_b \sum_{k=0}^{K-1} w_k \left[\frac{f(x^b_{k+1})}{f(x^b_0)}
            + λ\,\frac{\|x^b_{k+1} − x^b\|^2}{\|x^b_0 − x^b\|^2}\right],
        \qquad f(x) = \tfrac12\|A x − y\|^2,

    the second term only with ``ground_truth`` x (λ = ``distance_weight``).

    **Normalisation**: per image by the value at the starting point :math:`x_0` (detached,
    floored at ``eps``), and by default :math:`w_k = 1/K`: the loss is O(1) whatever the scale
    of A, y or K — 1 when the iterates do not move from :math:`x_0`, 0 when every iterate fits
    the data exactly, below 1 when the steps decrease the objective on average.

    :param physics: the operator (``A``); f is :func:`d2gp.solver.fidelity`.
    :param trace: the :class:`~d2gp.solver.Trace` of ``pnp_fista(..., trace=True)`` (its ``x`` are
        :math:`x_1 … x_K`, :math:`x_0 = z_0`), or the sequence of iterates :math:`x_1 … x_K`
        (then ``x0`` is required).
    :param y: the measurements the solver was run on.
    :param weights: K non-negative weights :math:`w_k`; default 1/K each.
    :param x0: the starting point (default: ``trace.z[0]``).
    :param ground_truth: optional x; adds the normalised squared distance of each iterate to it.
    :param distance_weight: λ.
    :return: a scalar tensor (float32), differentiable through the iterates.
    """
    if isinstance(trace, Trace):
        iterates = list(trace.x)
        if x0 is None and trace.z:
            x0 = trace.z[0]
    else:
        iterates = list(trace)
    K = len(iterates)
    if K == 0:
        raise ValueError("objective_loss needs at least one iterate (run the solver with iterations ≥ 1)")
    if x0 is None:
        raise ValueError("objective_loss: pass x0, the starting point, with a plain sequence of iterates")
    for k, x in enumerate(iterates):
        if x.shape != x0.shape:
            raise ValueError(f"iterate {k + 1} has shape {tuple(x.shape)}, x0 has shape {tuple(x0.shape)}")
    if weights is None:
        w = torch.full((K,), 1.0 / K)
    else:
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.numel() != K:
            raise ValueError(f"need one weight per iteration: {K} iterations, got {w.numel()} weights")
        if not bool((w >= 0).all()) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"weights must be finite and ≥ 0, got {w.tolist()}")
    if not (distance_weight >= 0 and math.isfinite(distance_weight)):
        raise ValueError(f"distance_weight must be a finite number ≥ 0, got {distance_weight!r}")
    if ground_truth is not None and ground_truth.shape != x0.shape:
        raise ValueError(f"ground_truth has shape {tuple(ground_truth.shape)}, the iterates {tuple(x0.shape)}")

    f0 = fidelity(physics, x0, y).detach().float().clamp_min(eps)
    if ground_truth is not None:
        d0 = (x0 - ground_truth).detach().flatten(1).float().pow(2).sum(1).clamp_min(eps)
    total = torch.zeros((), device=y.device)
    for k, x in enumerate(iterates):
        term = fidelity(physics, x, y).float() / f0
        if ground_truth is not None and distance_weight > 0:
            term = term + distance_weight * (x - ground_truth).flatten(1).float().pow(2).sum(1) / d0
        total = total + float(w[k]) * term.mean()
    return total


#: Alias of :func:`objective_loss` (the per-step fidelity decrease that Ehrhardt et al. train for).
fidelity_decrease_loss = objective_loss

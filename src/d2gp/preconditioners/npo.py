r"""NPO: a ConvNeXt nonlinear preconditioning operator P_θ(g, k).

Plug-and-play FISTA (:func:`d2gp.solver.pnp_fista`) takes the step
:math:`x_{k+1} = D(z_k − γ P_θ(g_k, k))` with :math:`g_k = A^\top(A z_k − y)`. The NPO is

.. math::

    s &= \max\!\Big(\sqrt{\tfrac{1}{CHW}\textstyle\sum_{c,h,w} g_{c,h,w}^2},\; ε\Big)
        \quad\text{(per image)}, \\
    u_0 &= \mathrm{Stem}\big([\,g/s \;(,\; z_k)\,]\big), \qquad
    u_{b+1} = u_b + \mathrm{Block}_b(u_b, e_b(k)), \quad b = 0 … B−1, \\
    P_θ(g, k) &= g + s \cdot \mathrm{Head}(u_B),

with ConvNeXt blocks (Liu et al. 2022), the iteration entering each block as a per-channel bias
:math:`e_b(k) ∈ \mathbb{R}^{\text{width}}` (one shared :class:`IterationEncoding`, InDI-style):

.. math::

    \mathrm{Block}_b(u, e) = γ_b ⊙ W_2\,σ\big(W_1\,\mathrm{LN}(\mathrm{DWConv}_{k×k}(u) + e)\big),

where LN is a LayerNorm over channels and :math:`W_1, W_2` are pointwise (1×1) layers
(width → expansion·width → width), applied in NHWC as in ConvNeXt; :math:`γ_b` is the layer
scale. Properties:

* **identity at initialisation**: the head conv is zero (weights and bias), so a fresh NPO
  returns g bit for bit and preconditioned FISTA starts as plain PnP-FISTA;
* **positive homogeneity**: :math:`P_θ(c\,g, k) = c\,P_θ(g, k)` for c > 0 (the network only
  sees g/s), so gradients of very different magnitudes (e.g. ~1e4 for a {0,1} single-pixel
  camera, ~1 for ±1 patterns) are treated alike; g = 0 gives 0;
* fully convolutional: any image size, parameter count independent of it; any k ≥ 0
  (sinusoids extrapolate beyond the K used in training);
* ``use_iterate=True`` also feeds the iterate z_k (unnormalised, ~[0, 1]) as extra channels;
  the solver then calls ``P(g, k, iterate=z_k)`` (it reads :attr:`NPO.uses_iterate`).

Global paths (issue 11: the default trunk sees about 15 pixels, while the ill-conditioning of a
{0,1} single-pixel camera lives in the image mean and Newton on MRI is a Fourier multiplier), each
zero at initialisation, so the NPO still starts as the identity:

* ``levels = L > 1``: a U-Net-shaped trunk — block b runs at resolution 2^{-ℓ_b} with
  ℓ_b = min(b, B−1−b, L−1) (average pooling down, nearest upsampling plus the skip up);
* ``global_path=True``: the spatial mean of the trunk's last features, through a linear layer,
  added to the head as a per-image constant (a global-pooling path);
* ``spectral_size = G``: a learned real Fourier multiplier per iteration,
  :math:`+\,\mathcal F^{-1}(M_{\min(k, K_s-1)} ⊙ \mathcal F g)` on the rfft grid, with
  :math:`M = \exp(\text{SPECTRAL\_RATE}\,θ) - 1` (a positive gain 1 + M per frequency), θ stored on a G×(G/2+1)
  grid of frequencies (exact at image side G, bilinearly resampled at other sizes); K_s =
  ``spectral_iterations``. This path is linear in g, so homogeneity holds.

References:
    Liu et al., "A ConvNet for the 2020s" (ConvNeXt), CVPR 2022.
    Delbracio & Milanfar, "Inversion by Direct Iteration (InDI)", TMLR 2023.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from d2gp.preconditioners.encoding import IterationEncoding, make_activation

__all__ = ["NPO", "ConvNeXtBlock"]

#: NPO architectures above this many parameters are refused before they are allocated (the
#: default NPO has 42 k; 2·10⁸ float32 parameters are 800 MB, as for the full linear preconditioner).
MAX_PARAMETERS = 200_000_000

#: The spectral path's gain is exp(SPECTRAL_RATE · θ) per frequency (θ = 0 at initialisation): Adam moves
#: θ by about lr per update, so at lr 1e-3 a gain moves by about 2.5 % per update — the factors of
#: 10–1000 between a problem's eigenvalues are reachable in a few hundred updates, not 10⁵.
SPECTRAL_RATE = 25.0

#: Initial value of the per-channel layer scale γ of each block.
LAYER_SCALE_INIT = 1e-2


def _check_arguments(channels, width, blocks, kernel_size, expansion, activation, max_iteration,
                     levels=1, spectral_size=None, spectral_iterations=20) -> None:
    """The checks of :class:`NPO`'s constructor arguments (``ValueError`` naming the first bad one)."""
    for name, value in (("channels", channels), ("width", width), ("blocks", blocks),
                        ("kernel_size", kernel_size), ("expansion", expansion), ("levels", levels),
                        ("spectral_iterations", spectral_iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (to keep the image size), got {kernel_size}")
    if max_iteration is not None and (isinstance(max_iteration, bool) or not isinstance(max_iteration, int)
                                      or max_iteration < 0):
        raise ValueError(f"max_iteration must be None or an int ≥ 0, got {max_iteration!r}")
    if activation not in ("relu", "gelu"):
        raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
    if spectral_size is not None and (isinstance(spectral_size, bool) or not isinstance(spectral_size, int)
                                      or spectral_size < 2):
        raise ValueError(f"spectral_size must be None or an int ≥ 2 (the side of the multiplier's grid), "
                         f"got {spectral_size!r}")
    estimate = blocks * width * (kernel_size**2 + 2 * expansion * width)  # the blocks' weights, roughly
    if spectral_size is not None:
        estimate += spectral_iterations * spectral_size * (spectral_size // 2 + 1) * channels
    if estimate > MAX_PARAMETERS:
        raise ValueError(f"an NPO of width {width}, {blocks} blocks, kernel {kernel_size} and expansion {expansion} "
                         f"would have about {estimate:.2g} parameters, above {MAX_PARAMETERS:.0e}")


class ConvNeXtBlock(nn.Module):
    r"""One ConvNeXt block with an additive per-channel iteration embedding.

    .. math::

        u ↦ u + γ ⊙ W_2\,σ\big(W_1\,\mathrm{LN}(\mathrm{DWConv}(u) + e)\big)

    :param width: number of channels.
    :param kernel_size: k of the depthwise k×k conv (padding k//2, odd k keeps the size).
    :param expansion: hidden width of the pointwise MLP is ``expansion · width``.
    :param activation: σ, ``"relu"`` or ``"gelu"``.
    """

    def __init__(self, width: int, kernel_size: int = 3, expansion: int = 2, activation: str = "relu",
                 layer_scale_init: float = LAYER_SCALE_INIT):
        super().__init__()
        self.dwconv = nn.Conv2d(width, width, kernel_size, padding=kernel_size // 2, groups=width)
        self.norm = nn.LayerNorm(width)
        self.pw1 = nn.Linear(width, expansion * width)
        self.act = make_activation(activation)
        self.pw2 = nn.Linear(expansion * width, width)
        self.gamma = nn.Parameter(torch.full((width,), float(layer_scale_init)))

    def forward(self, u: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``u``: (B, width, H, W); ``emb``: (B or 1, width).

        Evaluated with the LayerNorm's affine map folded into ``pw1`` and the layer scale γ into
        ``pw2`` (both then run as 1×1 convolutions, NHWC when ``u`` is channels-last): the same
        function as :meth:`reference_forward` up to float rounding, with two fewer passes over the
        (B, expansion·width, H, W) activations.
        """
        h = self.dwconv(u) + emb[:, :, None, None]
        h = F.layer_norm(h.permute(0, 2, 3, 1), self.norm.normalized_shape, None, None, self.norm.eps)
        w1 = self.pw1.weight * self.norm.weight
        b1 = torch.addmv(self.pw1.bias, self.pw1.weight, self.norm.bias)
        h = self.act(F.conv2d(h.permute(0, 3, 1, 2), w1[:, :, None, None], b1))
        w2 = self.gamma[:, None] * self.pw2.weight
        return u + F.conv2d(h, w2[:, :, None, None], self.gamma * self.pw2.bias)

    def reference_forward(self, u: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The block as written in the maths (LayerNorm, then the pointwise MLP, then γ): for tests."""
        h = self.dwconv(u) + emb[:, :, None, None]
        h = h.permute(0, 2, 3, 1)  # NHWC
        h = self.pw2(self.act(self.pw1(self.norm(h))))
        h = (self.gamma * h).permute(0, 3, 1, 2)
        return u + h


class NPO(nn.Module):
    r"""Nonlinear preconditioning operator :math:`P_θ(g, k) = g + s\,\mathrm{Head}(…)` (see module doc).

    :param channels: image channels C (input and output of P).
    :param width: channels of the ConvNeXt trunk.
    :param blocks: number of ConvNeXt blocks.
    :param kernel_size: depthwise kernel size (3, 5, 7, …).
    :param expansion: pointwise MLP expansion factor.
    :param activation: ``"relu"`` or ``"gelu"`` (blocks and the iteration MLP).
    :param time_features: number of sinusoids F of the :class:`IterationEncoding`.
    :param time_hidden: hidden width of the encoding's MLP (64 keeps the default NPO near the
        paper's 44 k parameters: 42 k).
    :param use_iterate: also take the iterate z_k as input (``forward(grad, k, iterate=z)``).
    :param channels_last: run the network in ``torch.channels_last`` memory format (its weights
        are stored channels-last: PyTorch picks a convolution's layout from its weights).
    :param max_iteration: if set, iterations past it use its encoding, ``P(g, k) = P(g, min(k,
        max_iteration))``: past the range it was trained on, the NPO repeats its last trained
        operator instead of extrapolating the sinusoids (set by training to the last trained k).
    :param levels: resolution levels of a U-Net-shaped trunk (1: all blocks at full resolution).
    :param global_path: add the global-pooling path (mean of the last features → linear → constant).
    :param spectral_size: side G of the grid of a learned per-iteration Fourier multiplier (None: none).
    :param spectral_iterations: number K_s of multipliers (iterations past K_s − 1 use the last one).

    ``forward(grad, k, iterate=None)``: ``grad`` is (B, C, H, W), ``k`` an int or a 1-D integer
    tensor of B per-image indices; returns a tensor of ``grad``'s shape and dtype.

    >>> P = NPO(channels=1)
    >>> g = torch.randn(2, 1, 16, 16)
    >>> torch.equal(P(g, 0), g)   # identity at initialisation
    True
    >>> NPO(**P.config).num_parameters() == P.num_parameters()
    True
    """

    def __init__(self, channels: int = 1, width: int = 32, blocks: int = 5, kernel_size: int = 3,
                 expansion: int = 2, activation: str = "relu", time_features: int = 128,
                 time_hidden: int = 64, use_iterate: bool = False, channels_last: bool = True,
                 max_iteration: int | None = None, levels: int = 1, global_path: bool = False,
                 spectral_size: int | None = None, spectral_iterations: int = 20):
        super().__init__()
        _check_arguments(channels, width, blocks, kernel_size, expansion, activation, max_iteration,
                         levels, spectral_size, spectral_iterations)
        self._config = dict(channels=channels, width=width, blocks=blocks, kernel_size=kernel_size,
                            expansion=expansion, activation=activation, time_features=time_features,
                            time_hidden=time_hidden, use_iterate=bool(use_iterate), channels_last=bool(channels_last),
                            max_iteration=max_iteration)
        # The global paths enter the config only when used: files of the plain NPO stay as they were.
        for name, value, default in (("levels", levels, 1), ("global_path", bool(global_path), False),
                                     ("spectral_size", spectral_size, None),
                                     ("spectral_iterations", spectral_iterations, 20)):
            if value != default:
                self._config[name] = value
        self.channels = channels
        self.width = width
        self.num_blocks = blocks
        self.uses_iterate = bool(use_iterate)
        self.channels_last = bool(channels_last)
        self.max_iteration = max_iteration

        in_channels = channels * (2 if use_iterate else 1)
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.encoding = IterationEncoding(blocks * width, features=time_features, hidden=time_hidden,
                                          activation=activation)
        self.blocks = nn.ModuleList(ConvNeXtBlock(width, kernel_size, expansion, activation) for _ in range(blocks))
        self.head = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.levels = [min(b, blocks - 1 - b, levels - 1) for b in range(blocks)]
        self.pooled = None
        if global_path:
            self.pooled = nn.Linear(width, channels)
            nn.init.zeros_(self.pooled.weight)
            nn.init.zeros_(self.pooled.bias)
        self.multiplier = None
        if spectral_size is not None:
            self.multiplier = nn.Parameter(torch.zeros(spectral_iterations, channels, spectral_size,
                                                       spectral_size // 2 + 1))
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        """Raise ``ValueError`` on constructor arguments ``NPO(**config)`` would refuse (unknown names
        included), without building the network (a huge ``width`` is refused before it is allocated)."""
        try:
            bound = inspect.signature(cls).bind(**config)
        except TypeError as error:
            raise ValueError(f"NPO settings {config}: {error}") from None
        bound.apply_defaults()
        arguments = bound.arguments
        _check_arguments(*(arguments[name] for name in ("channels", "width", "blocks", "kernel_size", "expansion",
                                                        "activation", "max_iteration", "levels", "spectral_size",
                                                        "spectral_iterations")))

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, a plain dict: ``NPO(**npo.config)`` rebuilds the architecture."""
        return dict(self._config)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of (trainable) parameters; independent of the image size."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @staticmethod
    def scale(grad: torch.Tensor) -> torch.Tensor:
        r"""Per-image RMS :math:`\sqrt{\frac{1}{CHW}\sum g^2}`, shape (B, 1, 1, 1), 0 for g = 0.

        Computed in float32 as :math:`m\,\sqrt{\mathrm{mean}((g/m)^2)}` with :math:`m = \max|g|`,
        so that it neither overflows nor underflows for very large or very small gradients.
        """
        g = grad.float()
        m = g.abs().amax(dim=(1, 2, 3), keepdim=True)
        tiny = torch.finfo(torch.float32).tiny
        r = (g / m.clamp_min(tiny)).pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        return m * r

    def forward(self, grad: torch.Tensor, k: Union[int, torch.Tensor],
                iterate: Optional[torch.Tensor] = None) -> torch.Tensor:
        if grad.dim() != 4 or grad.shape[1] != self.channels:
            raise ValueError(f"NPO(channels={self.channels}) expects grad of shape (B, {self.channels}, H, W), "
                             f"got {tuple(grad.shape)}")
        if self.uses_iterate:
            if iterate is None:
                raise ValueError("this NPO was built with use_iterate=True: call it as P(grad, k, iterate=z)")
            if iterate.shape != grad.shape:
                raise ValueError(f"iterate shape {tuple(iterate.shape)} differs from grad shape {tuple(grad.shape)}")
        batch = grad.shape[0]
        if isinstance(k, torch.Tensor) and k.dim() == 1 and k.numel() not in (1, batch):
            raise ValueError(f"k has {k.numel()} entries for a batch of {batch}")

        # Scale normalisation (float32): the network sees g/s; s = 0 only when g = 0.
        s = self.scale(grad)
        x = grad.float() / s.clamp_min(torch.finfo(torch.float32).tiny)
        if self.uses_iterate:
            x = torch.cat([x, iterate.float()], dim=1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        if self.max_iteration is not None:
            k = k.clamp(max=self.max_iteration) if isinstance(k, torch.Tensor) else min(k, self.max_iteration)
        emb = self.encoding(k).view(-1, self.num_blocks, self.width)  # (B or 1, blocks, width)
        u = self.stem(x)
        skips, level = [], 0
        for b, block in enumerate(self.blocks):
            while level < self.levels[b]:  # down: keep the skip, halve the resolution
                skips.append(u)
                u, level = F.avg_pool2d(u, 2, ceil_mode=True), level + 1
            while level > self.levels[b]:  # up: back to the skip's size, add it
                skip = skips.pop()
                u, level = F.interpolate(u, size=skip.shape[-2:], mode="nearest") + skip, level - 1
            u = block(u, emb[:, b])
        h = self.head(u)
        if self.pooled is not None:
            h = h + self.pooled(u.mean(dim=(2, 3)))[:, :, None, None]
        out = grad + (s * h.float()).to(grad.dtype)
        if self.multiplier is not None:
            out = out + self.spectral(grad, k).to(grad.dtype)
        return out.contiguous()

    def spectral_multiplier(self, k: Union[int, torch.Tensor], height: int, width: int) -> torch.Tensor:
        r"""The Fourier multiplier :math:`M_{\min(k, K_s-1)}` on the rfft grid of an image of ``height × width``:
        (B or 1, C, height, width // 2 + 1), resampled from the stored grid unless its size matches."""
        last = self.multiplier.shape[0] - 1
        theta = (self.multiplier[k.clamp(0, last).to(self.multiplier.device).reshape(-1)] if isinstance(k, torch.Tensor)
                 else self.multiplier[min(int(k), last)][None])  # an int k: no index tensor per call
        m = torch.expm1(SPECTRAL_RATE * theta)
        size = self.multiplier.shape[-2]
        if (height, width // 2 + 1) != (size, size // 2 + 1):
            # Resample on centred frequencies (DC in the middle of the vertical axis), then uncentre.
            m = torch.fft.fftshift(m, dim=-2)
            m = F.interpolate(m, size=(height, width // 2 + 1), mode="bilinear", align_corners=True)
            m = torch.fft.ifftshift(m, dim=-2)
        return m

    def spectral(self, grad: torch.Tensor, k: Union[int, torch.Tensor]) -> torch.Tensor:
        r"""The spectral path :math:`\mathcal F^{-1}(M_k ⊙ \mathcal F g)` (real, float32), zero at initialisation."""
        height, width = grad.shape[-2:]
        g = torch.fft.rfft2(grad.float(), norm="ortho")
        return torch.fft.irfft2(g * self.spectral_multiplier(k, height, width), s=(height, width), norm="ortho")

    def spectral_gain(self, k: Union[int, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """The spectral path's total gain per rfft frequency, 1 + M_k (B or 1, C, height, width // 2 + 1)."""
        return 1 + self.spectral_multiplier(k, height, width)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config.items())

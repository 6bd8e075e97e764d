r"""Sinusoidal encoding of the iteration index k, followed by a small MLP.

As for the time step of diffusion / InDI networks and the positions of transformers, the
integer k is mapped to ``features`` = F sinusoids (half sines, half cosines)

.. math::

    \mathrm{pe}(k) = \big[\sin(k\,\omega_0), …, \sin(k\,\omega_{F/2-1}),\;
                          \cos(k\,\omega_0), …, \cos(k\,\omega_{F/2-1})\big],
    \qquad \omega_i = 10000^{-2i/F},

and then through a two-layer MLP :math:`e(k) = W_2\,σ(W_1\,\mathrm{pe}(k) + b_1) + b_2`.
The sinusoids are defined for every real k, so an encoding trained on k = 0 … K−1 can be
evaluated beyond K (more iterations at test time than in training).

References:
    Vaswani et al., "Attention is all you need", NeurIPS 2017.
    Delbracio & Milanfar, "Inversion by Direct Iteration (InDI)", TMLR 2023.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

__all__ = ["IterationEncoding", "sinusoidal_features", "make_activation"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    """``"relu"``, ``"gelu"`` or ``"silu"`` as a module; any other name is a ``ValueError``."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(_ACTIVATIONS)}") from None


def _as_index(k: Union[int, torch.Tensor], device: torch.device) -> torch.Tensor:
    """k (int, 0-d or 1-d tensor) as a float32 column ``(B or 1, 1)``."""
    if isinstance(k, torch.Tensor):
        if k.dim() > 1:
            raise ValueError(f"k must be an int or a 1-D tensor, got shape {tuple(k.shape)}")
        if k.is_floating_point() or k.is_complex():
            raise ValueError(f"k must be an integer iteration index, got dtype {k.dtype}")
        return k.reshape(-1, 1).to(device=device, dtype=torch.float32)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int or a 1-D LongTensor, got {type(k).__name__}")
    return torch.full((1, 1), float(k), device=device)  # a fill: no host-to-device copy (CUDA graphs forbid one)


def sinusoidal_features(k: Union[int, torch.Tensor], features: int = 128,
                        device: torch.device | None = None) -> torch.Tensor:
    r"""The raw sinusoids :math:`\mathrm{pe}(k)`, float32 of shape ``(B or 1, features)``."""
    if features < 2 or features % 2:
        raise ValueError(f"features must be an even number ≥ 2, got {features}")
    if device is None:
        device = k.device if isinstance(k, torch.Tensor) else torch.device("cpu")
    kk = _as_index(k, device)
    half = features // 2
    omega = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) * (2.0 / features))
    angle = kk * omega
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


class IterationEncoding(nn.Module):
    r"""Learned embedding of the iteration index: sinusoids then an MLP.

    .. math::

        e(k) = W_2\,σ\!\big(W_1\,\mathrm{pe}(k) + b_1\big) + b_2 \in \mathbb{R}^{\text{out\_features}},
        \quad \mathrm{pe}(k)_i = \begin{cases} \sin(k\,\omega_i) & i < F/2 \\ \cos(k\,\omega_{i-F/2}) & i ≥ F/2\end{cases},
        \quad \omega_i = 10000^{-2i/F}.

    :param out_features: size of the embedding.
    :param features: F, the number of sinusoids (even).
    :param hidden: width of the MLP's hidden layer (default ``features``).
    :param activation: σ, ``"relu"``, ``"gelu"`` or ``"silu"``.

    ``forward(k)`` takes an ``int`` (→ shape ``(1, out_features)``, broadcasting over a batch)
    or a 1-D integer tensor of per-image indices (→ ``(B, out_features)``).

    >>> enc = IterationEncoding(16)
    >>> enc(3).shape, enc(torch.tensor([0, 1, 2])).shape
    (torch.Size([1, 16]), torch.Size([3, 16]))
    """

    def __init__(self, out_features: int, features: int = 128, hidden: int | None = None,
                 activation: str = "silu"):
        super().__init__()
        if features < 2 or features % 2:
            raise ValueError(f"features must be an even number ≥ 2, got {features}")
        if out_features < 1:
            raise ValueError(f"out_features must be ≥ 1, got {out_features}")
        self.features = features
        self.out_features = out_features
        hidden = features if hidden is None else hidden
        self.mlp = nn.Sequential(nn.Linear(features, hidden), make_activation(activation),
                                 nn.Linear(hidden, out_features))

    def forward(self, k: Union[int, torch.Tensor]) -> torch.Tensor:
        device = self.mlp[0].weight.device
        return self.mlp(sinusoidal_features(k, self.features, device=device))

    def extra_repr(self) -> str:
        return f"features={self.features}, out_features={self.out_features}"

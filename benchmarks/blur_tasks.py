"""Deblurring operator pairs for ``d2gp --import benchmarks.blur_tasks benchmark --tasks …`` (issue 11).

Three blurs of the digits (32×32 MNIST, the single-pixel camera's denoiser, noise σ = 0.001), each
with a narrower blur as its better-posed teacher, registered as own tasks on import:

* ``deblur-gaussian``: a Gaussian point-spread function of std 3 px (diffraction-limited or
  atmospheric blur), teacher std 1 px;
* ``deblur-defocus``: a uniform disk of radius 3 px (geometric out-of-focus blur), teacher radius 1 px;
* ``deblur-motion``: a horizontal line of 9 px (linear camera motion), teacher 3 px.

All have circular boundaries (deepinv ``BlurFFT``). They show where a blur's ill-conditioning goes:
the weakly measured directions are high frequencies, which the denoiser removes at every step, so
the tuned baseline settles early at a worse fixed point rather than converging slowly
(``benchmarks/results/deblur/``).

    d2gp --threads 1 --import benchmarks.blur_tasks benchmark --tasks deblur-gaussian deblur-defocus deblur-motion \\
        --methods baseline newton poly-chebyshev teacher --limit 50 --out benchmarks/results/deblur
"""

import torch
from deepinv.physics import BlurFFT

from d2gp.tasks import gaussian_blur_operator, own_task, teacher_of

SHAPE = (1, 32, 32)
NOISE = 0.001


def disk(radius: float) -> torch.Tensor:
    """A uniform disk of ``radius`` pixels, normalised to sum 1: (1, 1, k, k)."""
    r = int(radius) + 1
    i = torch.arange(-r, r + 1, dtype=torch.float32)
    kernel = ((i[:, None] ** 2 + i[None, :] ** 2) <= radius**2).float()
    return (kernel / kernel.sum())[None, None]


def motion(length: int) -> torch.Tensor:
    """A horizontal line of ``length`` (odd) pixels, normalised to sum 1: (1, 1, length, length)."""
    kernel = torch.zeros(length, length)
    kernel[length // 2, :] = 1.0
    return (kernel / kernel.sum())[None, None]


def register() -> dict:
    """Register the three pairs (idempotent); their tasks by name."""
    gaussian = gaussian_blur_operator(SHAPE, sigma=3.0)
    pairs = {
        "deblur-gaussian": (gaussian, teacher_of(gaussian, sigma=1.0)),
        "deblur-defocus": (BlurFFT(img_size=SHAPE, filter=disk(3.0)), BlurFFT(img_size=SHAPE, filter=disk(1.0))),
        "deblur-motion": (BlurFFT(img_size=SHAPE, filter=motion(9)), BlurFFT(img_size=SHAPE, filter=motion(3))),
    }
    return {name: own_task(name, student, teacher, dataset="mnist-embedded", denoiser="spc", noise_sigma=NOISE)
            for name, (student, teacher) in pairs.items()}


TASKS = register()

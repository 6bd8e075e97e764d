"""Metrics and the evaluation loop: run a solver on a split, measure PSNR/SSIM per iteration.

PSNR and SSIM are deepinv's (peak value 1, images in [0, 1]), computed on the raw solver
output (no clamping). Every summary is ``mean ± std`` over test images.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from deepinv.loss.metric import PSNR, SSIM
from tqdm.auto import tqdm

from d2gp.device import module_device
from d2gp.solver import check_algorithm, solve
from d2gp.tasks.base import measure

__all__ = ["psnr", "ssim", "mean_std", "format_mean_std", "SolverRun", "evaluate_solver", "spread_indices",
           "golden_section_max", "tune_step_size"]

_PSNR = PSNR(max_pixel=1.0)
_SSIM = SSIM(max_pixel=1.0)


def psnr(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (peak 1), shape ``(B,)``."""
    return _PSNR(x.float(), reference.float())


def ssim(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (peak 1, Gaussian window 11), shape ``(B,)``."""
    return _SSIM(x.float(), reference.float())


def mean_std(values: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation; ``nan`` on no values."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(unbiased=False))


def format_mean_std(values, digits: int = 2) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def spread_indices(n: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``range(n)`` (neighbouring slices look alike: show the range)."""
    count = min(count, n)
    return sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(count)}) if count > 0 else []


@dataclass
class SolverRun:
    """PSNR/SSIM of one solver on one split: ``psnr[k]`` holds per-image values after k iterations."""

    label: str
    iterations: int
    psnr: dict[int, torch.Tensor] = field(default_factory=dict)
    ssim: dict[int, torch.Tensor] = field(default_factory=dict)
    fidelity: list[float] = field(default_factory=list)  # mean f(z_k), k = 0 … K−1
    #: with a safeguard: the fraction of images still using the preconditioner after k iterations
    active: dict[int, float] = field(default_factory=dict)
    examples: Optional[torch.Tensor] = None  # reconstructions at ``examples_at`` of the images ``example_indices``
    examples_at: Optional[int] = None
    example_indices: list[int] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole evaluation

    def summary(self) -> dict:
        return {
            "label": self.label,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "psnr": {k: mean_std(v) for k, v in self.psnr.items()},
            "ssim": {k: mean_std(v) for k, v in self.ssim.items()},
            "psnr_per_iteration": [mean_std(self.psnr[k])[0] for k in sorted(self.psnr)],
            "fidelity_per_iteration": self.fidelity,
            **({"still_preconditioned": self.active} if self.active else {}),
        }


@torch.no_grad()
def evaluate_solver(
    label: str,
    physics,
    images: torch.Tensor,
    denoiser: Callable,
    step_size: float,
    iterations: int,
    *,
    preconditioner=None,
    ssim_at: Sequence[int] = (),
    noise_seed: int = 0,
    batch_size: int = 64,
    keep_examples: int = 0,
    examples_at: int | None = None,
    progress: bool = True,
    safeguard: float | None = None,
    restart: bool = False,
    algorithm: str = "fista",
) -> SolverRun:
    """Measure ``images`` with ``physics`` (noise seeded per image), run the PnP solver, score every iteration.

    PSNR is recorded after every iteration k = 0 (the initial estimate γAᵀy) … K; SSIM at the
    iterations listed in ``ssim_at``. ``keep_examples`` reconstructions are kept at iteration
    ``examples_at`` (default K). ``safeguard`` is the solver's ρ (:func:`~d2gp.solver.pnp_fista`);
    then ``run.active[k]`` is the fraction of images still preconditioned after k iterations.
    ``restart`` is the solver's adaptive momentum restart. ``algorithm`` is the host algorithm
    (:data:`~d2gp.solver.ALGORITHMS`, :func:`~d2gp.solver.solve`; default preconditioned PnP-FISTA).
    """
    check_algorithm(algorithm, restart)
    began = time.perf_counter()
    run = SolverRun(label, iterations)
    psnr_k: list[list[torch.Tensor]] = [[] for _ in range(iterations + 1)]
    ssim_k: dict[int, list[torch.Tensor]] = {k: [] for k in ssim_at if 0 <= k <= iterations}
    fidelity_sum = torch.zeros(iterations, dtype=torch.float64)
    active_sum = torch.zeros(iterations, dtype=torch.float64)
    run.example_indices = spread_indices(len(images), keep_examples)
    run.examples_at = iterations if examples_at is None else examples_at
    if not 0 <= run.examples_at <= iterations:
        raise ValueError(f"examples_at must be in [0, {iterations}], got {examples_at}")
    kept: list[torch.Tensor] = []
    batches = range(0, len(images), batch_size)
    device = module_device(physics)
    for start in tqdm(batches, desc=label, disable=not progress, leave=False):
        x_true = images[start:start + batch_size].to(device)
        y = measure(physics, x_true, seed=noise_seed, offset=start)
        x0 = step_size * physics.A_adjoint(y)
        _, trace = solve(algorithm, physics, y, denoiser, step_size, iterations, preconditioner, x0=x0, trace=True,
                         safeguard=safeguard, restart=restart)
        for k, active in enumerate(trace.active):
            active_sum[k] += float(active.sum())
        estimates = [x0, *trace.x]
        for k, estimate in enumerate(estimates):
            psnr_k[k].append(psnr(estimate, x_true).cpu())
            if k in ssim_k:
                ssim_k[k].append(ssim(estimate, x_true).cpu())
        for k, f in enumerate(trace.fidelity):
            fidelity_sum[k] += f.double().sum().cpu()
        kept += [estimates[run.examples_at][i - start].cpu() for i in run.example_indices
                 if start <= i < start + len(x_true)]
    run.psnr = {k: torch.cat(v) for k, v in enumerate(psnr_k)}
    run.ssim = {k: torch.cat(v) for k, v in ssim_k.items()}
    run.fidelity = (fidelity_sum / len(images)).tolist()
    if safeguard is not None and preconditioner is not None:
        run.active = {k + 1: float(v) / len(images) for k, v in enumerate(active_sum)}
    run.examples = torch.stack(kept) if kept else None
    run.seconds = time.perf_counter() - began
    return run


def golden_section_max(f: Callable[[float], float], low: float, high: float, evaluations: int) -> float:
    """The argmax of a unimodal ``f`` on ``[low, high]`` by golden-section search: ``evaluations`` calls of
    ``f`` at interior points (none, and ``low`` is returned, when fewer than 2 or ``high <= low``)."""
    ratio = (math.sqrt(5) - 1) / 2
    if evaluations < 2 or high <= low:
        return low
    c, d = high - ratio * (high - low), low + ratio * (high - low)
    fc, fd = f(c), f(d)
    for _ in range(evaluations - 2):
        if fc >= fd:  # the maximum is in [low, d]
            high, d, fd = d, c, fc
            c = high - ratio * (high - low)
            fc = f(c)
        else:  # in [c, high]
            low, c, fc = c, d, fd
            d = low + ratio * (high - low)
            fd = f(d)
    return c if fc >= fd else d


@torch.no_grad()
def tune_step_size(physics, images: torch.Tensor, denoiser, base_step: float, iterations: int,
                   factors: Sequence[float] = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0), noise_seed: int = 10_000,
                   preconditioner=None, refine: int = 6, tried: dict | None = None,
                   restart: bool = False, algorithm: str = "fista") -> tuple[float, dict]:
    """Pick γ = f·base_step with the best mean PSNR at K on ``images`` (a validation split).

    Every factor of the grid ``factors`` is tried, then ``refine`` more by golden-section search
    between the best factor's neighbours on the grid (PSNR is unimodal in γ below the step where
    the iteration diverges), so that the choice is not limited by the grid's spacing.

    :param tried: a record of an earlier call with the same problem (γ → PSNR): those γ are not run again.
    :param restart: tune the solver with adaptive momentum restart (:func:`~d2gp.solver.pnp_fista`).
    :param algorithm: the host algorithm tuned (:func:`~d2gp.solver.solve`).
    :return: the chosen γ and the PSNR of every tried γ (the tuning record).
    """
    record = dict(tried or {})

    def score(factor: float) -> float:
        key = f"{factor * base_step:.6g}"
        if key not in record:
            run = evaluate_solver("tune", physics, images, denoiser, factor * base_step, iterations,
                                  preconditioner=preconditioner, noise_seed=noise_seed, progress=False,
                                  restart=restart, algorithm=algorithm)
            value = float(run.psnr[iterations].mean())
            record[key] = value if math.isfinite(value) else float("-inf")
        return record[key]

    grid = sorted(factors)
    best = max(range(len(grid)), key=lambda i: score(grid[i]))
    if refine > 0 and len(grid) > 1:
        golden_section_max(score, grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)], refine)
    chosen = max(record, key=record.get)
    return float(chosen), record

r"""Tuning the non-learned preconditioners on the validation split (for Table I and for the base of a refined NPO).

A non-learned method (``baseline``, ``newton``, ``poly-l2``, ``poly-chebyshev``, ``poly-ifista``)
is a set of candidate preconditioners (:func:`classical_candidates`: Newton's δ, Chebyshev's
interval) each run with its own step size γ; :func:`tune_classical` picks the candidate and γ
with the best validation PSNR at K, and records every tried value.
"""

from __future__ import annotations

from typing import Callable

import torch

from d2gp.evaluation import tune_step_size
from d2gp.preconditioners.classical import Newton, Polynomial
from d2gp.tasks import Task

__all__ = ["CLASSICAL_METHODS", "NEWTON_DELTAS", "CHEBYSHEV_LOWER", "STEP_FACTORS", "classical_candidates",
           "classical_base_step", "tune_classical"]

#: The non-learned methods that :func:`tune_classical` tunes.
CLASSICAL_METHODS = ("baseline", "newton", "poly-l2", "poly-chebyshev", "poly-ifista")
NEWTON_DELTAS = (1e-3, 1e-2, 1e-1, 1.0)  # × ‖AᵀA‖
CHEBYSHEV_LOWER = (1e-3, 1e-2, 1e-1)
STEP_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def classical_candidates(name: str, task: Task) -> dict[str, Callable[[], torch.nn.Module | None]]:
    """The candidate preconditioners a non-learned method is tuned over, by the names its tuning record uses
    (``"identity"``, ``"delta=0.1·L"``, ``"lower=0.001"``, ``"l2"``…), each as a builder (``None``: P = I)."""
    if name not in CLASSICAL_METHODS:
        raise ValueError(f"unknown non-learned method {name!r}; choose one of {', '.join(CLASSICAL_METHODS)}")
    shape, L = task.image_shape, task.student_norm
    if name == "baseline":
        return {"identity": lambda: None}
    if name == "newton":
        return {f"delta={d:g}·L": (lambda d=d: Newton(task.student, d * L, shape)) for d in NEWTON_DELTAS}
    choice = name.split("-", 1)[1]
    if choice == "chebyshev":
        return {f"lower={lo:g}": (lambda lo=lo: Polynomial.from_choice(task.student, shape, "chebyshev", lower=lo, norm=L))
                for lo in CHEBYSHEV_LOWER}
    return {choice: lambda: Polynomial.from_choice(task.student, shape, choice, norm=L)}


def classical_base_step(name: str, task: Task) -> float:
    """The step the γ grid of method ``name`` is centred on: 1 for Newton (P AᵀA ≈ I on range(Aᵀ));
    p(AᵀA/L) ≈ L (AᵀA)⁻¹ and P = I take the task's γ = 1/L."""
    return 1.0 if name == "newton" else task.student_step_size


def tune_classical(name: str, task: Task, val: torch.Tensor, denoiser, K: int, restart: bool = False,
                   algorithm: str = "fista") -> tuple[torch.nn.Module | None, float, dict]:
    """The candidate preconditioner of method ``name`` and the step γ with the best validation PSNR at K.

    Every candidate is run on the grid γ = f·base (f in :data:`STEP_FACTORS`, base from
    :func:`classical_base_step`), then γ is refined (golden section) for the best one only.

    :param val: validation images, (N, C, H, W).
    :param restart: tune with the solver's adaptive momentum restart.
    :param algorithm: the host algorithm it is tuned in (:func:`~d2gp.solver.solve`).
    :return: the preconditioner (``None`` for the identity), γ, and the record
        ``{"chosen": candidate name, "step_size": γ, "val_psnr": …, "tried": {candidate: {γ: PSNR}}}``.
    """
    base_step = classical_base_step(name, task)
    best, record = None, {}
    for candidate, build in classical_candidates(name, task).items():
        P = build()
        gamma, tried = tune_step_size(task.student, val, denoiser, base_step, K, factors=STEP_FACTORS, preconditioner=P,
                                      refine=0, restart=restart, algorithm=algorithm)
        record[candidate] = tried
        if best is None or tried[f"{gamma:.6g}"] > best[0]:
            best = (tried[f"{gamma:.6g}"], candidate, P)
    _, candidate, P = best
    gamma, record[candidate] = tune_step_size(task.student, val, denoiser, base_step, K, factors=STEP_FACTORS,
                                              preconditioner=P, tried=record[candidate], restart=restart,
                                              algorithm=algorithm)
    return P, gamma, {"chosen": candidate, "step_size": gamma, "val_psnr": record[candidate][f"{gamma:.6g}"],
                      "tried": record}

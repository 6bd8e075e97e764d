r"""Every preconditioner in one preconditioned PnP-FISTA, on any task: the paper's Table I.

``algorithm`` hosts every row in PnP-PGD or PnP-HQS instead (:func:`d2gp.solver.solve`): the
non-learned methods are tuned in it, the learned ones trained in it, the teacher runs it.

``benchmark(tasks, methods)`` tunes the non-learned methods on the validation split, trains
the learned ones (each a resumable run directory, reused when finished), evaluates everything
on the test split to 5K iterations (the tuned baseline to ``converge``) and writes, per task and for all tasks together,
``table.md``, ``table.csv``, ``results.json``, example reconstructions and PSNR-vs-iteration
curves.

Methods (:data:`METHODS`):

* non-learned — ``baseline`` (P = I), ``newton`` (P = (AᵀA + δI)⁻¹, Fessler & Booth 1999),
  ``poly-l2`` / ``poly-chebyshev`` / ``poly-ifista`` (P = p(AᵀA/L) of degree 4, Iyer et al.
  2024). Their step size γ (and δ, and the Chebyshev interval's lower edge) are tuned on the
  validation split; every tried value and its validation PSNR are recorded.
* learned linear (Ehrhardt, Fahy & Golbabaee 2024) — ``scalar``, ``pointwise``,
  ``convolutional``, ``full``, each trained with their paper's objective-decrease loss
  (``-objective``) and with our supervised loss (``-supervised``);
* learned nonlinear — ``supervised`` (NPO, L_s only) and ``d2gp``; ``newton-supervised`` and
  ``newton-d2gp``, the same NPOs refining the tuned Newton preconditioner
  (:mod:`d2gp.preconditioners.refined`: they start at Newton's PSNR); and ``teacher``, the
  teacher operator's plain PnP-FISTA (the upper bound).

On a projector AᵀA (±1 SPC rows, an MRI mask symmetric in k-space) the Newton
preconditioner only rescales the step: the data-fidelity gradient lies in range(Aᵀ) where
(AᵀA + δI)⁻¹ = 1/(1 + δ). It differs from the baseline on real-image MRI (columns whose mirror
is not sampled have eigenvalue ½), on {0,1} SPC patterns and on blur + decimation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from d2gp.apps import HORIZONS, announce, check_host, ensure_trained
from d2gp.checkpoints import CheckpointError
from d2gp.device import module_device, precision, resolve_device, synchronize
from d2gp.evaluation import evaluate_solver, format_mean_std, mean_std
from d2gp.plots import examples_figure, psnr_curves
from d2gp.preconditioners.files import trained_algorithm, trained_step_size
from d2gp.reports import markdown_table, write_results
from d2gp.solver import ALGORITHM_NAMES, solve
from d2gp.tasks import TASKS, make_task
from d2gp.training import TrainConfig, load_npo
from d2gp.tuning import STEP_FACTORS, classical_candidates, tune_classical

__all__ = ["METHODS", "BENCHMARK_PROFILES", "benchmark", "Method", "classical_candidates", "STEP_FACTORS",
           "iterations_to_reach", "EARLY", "CONVERGE"]


@dataclass(frozen=True)
class Method:
    """One row of the table: how to get its preconditioner."""

    label: str
    learned: bool
    #: TrainConfig fields of a learned method (``preconditioner``, ``method``).
    train: dict | None = None


METHODS: dict[str, Method] = {
    "baseline": Method("Baseline (P = I, tuned γ)", False),
    "newton": Method("Hessian / Newton (Fessler & Booth 1999)", False),
    "poly-l2": Method("Polynomial, ℓ2 (Iyer et al. 2024)", False),
    "poly-chebyshev": Method("Polynomial, ℓ∞ / Chebyshev (Iyer et al. 2024)", False),
    "poly-ifista": Method("Polynomial, iFISTA (Bhotto et al. 2015)", False),
    **{f"{kind}-{loss}": Method(f"{name} ({'objective decrease' if loss == 'objective' else 'supervised loss'})", True,
                                {"preconditioner": kind, "method": loss})
       for kind, name in (("scalar", "Scalar step"), ("pointwise", "Pointwise"), ("convolutional", "Convolutional"),
                          ("full", "Full-linear"))
       for loss in ("objective", "supervised")},
    "supervised": Method("Supervised (NPO, L_s only)", True, {"preconditioner": "npo", "method": "supervised"}),
    "d2gp": Method("D2GP", True, {"preconditioner": "npo", "method": "d2gp"}),
    "newton-supervised": Method("Supervised NPO on Newton", True,
                                {"preconditioner": "npo", "method": "supervised", "base": "newton"}),
    "newton-d2gp": Method("D2GP on Newton", True, {"preconditioner": "npo", "method": "d2gp", "base": "newton"}),
    "teacher": Method("Teacher (upper bound)", False),
}

#: Learning rates that differ, per task, from the preconditioner's default
#: (:data:`d2gp.training.DEFAULT_LR`), chosen on the validation split by ``benchmarks/linear_lr.py``:
#: the dense matrix takes 1e-3 on 32×32 SPC, where its default 1e-5 barely moves it.
TASK_LR = {"spc": {"full": 1e-3}}

#: Per profile: the training settings of every learned method, per task (one budget for all,
#: for a fair comparison), the validation images for tuning and the test images scored.
#: ``quick`` is sized for the whole table on three tasks in under an hour on 2 CPU cores;
#: ``paper`` is for a GPU.
BENCHMARK_PROFILES = {
    "quick": {
        "train": {"spc": dict(train_images=256, epochs=2, batch_size=16, val_images=32),
                  "mri": dict(train_images=64, epochs=2, batch_size=8, val_images=16),
                  "sr": dict(train_images=64, epochs=2, batch_size=8, val_images=16)},
        "tune_images": 32, "test_images": {"spc": 200, "spc-binary": 100, "mri": None, "sr": None},
    },
    "paper": {
        "train": {task: dict(train_images=None, epochs=30, batch_size=32, val_images=200) for task in ("spc", "mri", "sr")},
        "tune_images": 200, "test_images": {"spc": None, "mri": None, "sr": None},
    },
}

#: Iterations k < K whose PSNR Table I reports beside K.
EARLY = (5, 10)
#: The baseline's horizon for its converged PSNR (the "iterations to the baseline's best" column).
CONVERGE = 500
#: A method has reached the baseline's best once its mean PSNR is within this of it.
CONVERGED_TOLERANCE_DB = 0.1


def iterations_to_reach(psnr_per_iteration: Sequence[float], target: float) -> int | None:
    """The first iteration k ≥ 1 at which the mean PSNR is at least ``target`` (``None``: never in the list).

    >>> iterations_to_reach([5.0, 20.0, 27.9, 28.0], 27.95)
    3
    """
    return next((k for k, value in enumerate(psnr_per_iteration) if k >= 1 and value >= target), None)


@torch.no_grad()
def _seconds_per_image(physics, images, denoiser, step, K, P, algorithm: str = "fista") -> float:
    device = module_device(physics)
    y = physics.A(images.to(device))
    synchronize(device)
    began = time.perf_counter()
    solve(algorithm, physics, y, denoiser, step, K, P)
    synchronize(device)
    return (time.perf_counter() - began) / len(images)


def _parameters(P) -> int:
    return sum(p.numel() for p in P.parameters()) if isinstance(P, torch.nn.Module) else 0


def _check_request(tasks: Sequence[str], methods: Sequence[str], seeds: Sequence[int], iterations: int) -> None:
    """Refuse what would give a wrong or empty table: unknown or repeated tasks and methods, repeated or
    negative seeds (a repeated seed would count one training twice in the seed spread), K < 1."""
    for what, names, known in (("task", tasks, TASKS), ("method", methods, METHODS)):
        unknown = [str(n) for n in names if n not in known]
        if unknown or not names:
            raise CheckpointError(f"unknown {what}(s) {', '.join(unknown) or '(none given)'}; "
                                  f"choose from {', '.join(known)}")
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        if repeated:
            raise CheckpointError(f"{what}(s) {', '.join(repeated)} given more than once")
    bad_seed = any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
    if not seeds or bad_seed or len(set(seeds)) < len(seeds):
        raise CheckpointError(f"seeds must be distinct integers ≥ 0, got {list(seeds)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise CheckpointError(f"iterations must be an integer ≥ 1, got {iterations!r}")


def benchmark(tasks: Sequence[str] = ("spc", "mri", "sr"), methods: Sequence[str] = tuple(METHODS), *,
              profile: str = "quick", seeds: Sequence[int] = (0,), out: str | os.PathLike = "results/benchmark",
              runs: str | os.PathLike = "runs/benchmark", iterations: int = 20, examples: int = 4,
              progress: bool = True, task_settings: dict | None = None, limit: int | None = None,
              tune_images: int | None = None, device: str | None = "auto", restart: bool = False,
              early: Sequence[int] = EARLY, converge: int = CONVERGE, algorithm: str = "fista",
              **train_overrides) -> dict:
    """Run ``methods`` on ``tasks`` (see the module documentation); returns the tables and results.

    :param seeds: training seeds of the learned methods (non-learned ones do not depend on it).
    :param runs: where the training runs live: ``runs/TASK/METHOD-seedS`` (reused when finished).
    :param task_settings: task overrides (for all tasks), e.g. ``{"image_size": 16}`` in tests.
    :param limit, tune_images: cap the test images / set the validation images for tuning (default: the profile's).
    :param device: where to train and evaluate (``"auto"``: a CUDA GPU when there is one).
    :param restart: tune and evaluate every method with the solver's adaptive momentum restart
        (:func:`~d2gp.solver.pnp_fista`); off by default: the paper's plain PnP-FISTA.
    :param algorithm: the host algorithm of every row (:data:`~d2gp.solver.ALGORITHMS`): the learned
        methods are trained in it (``TrainConfig.algorithm``), the others tuned in it.
    :param early: iterations k < K whose PSNR is also reported (the speed a user buys; default 5 and 10).
    :param converge: the baseline runs to this many iterations (when it is among ``methods``): the
        column "iterations to the baseline's best" counts, per method, the first k at which its mean
        test PSNR comes within :data:`CONVERGED_TOLERANCE_DB` of the best mean PSNR the tuned
        baseline reaches in ``converge`` iterations ("—" past its own horizon, 5K).
    :param train_overrides: :class:`~d2gp.training.TrainConfig` fields on top of the profile's.
    """
    _check_request(tasks, methods, seeds, iterations)
    check_host(algorithm, restart)
    early = sorted({int(k) for k in early if 1 <= int(k) < iterations})
    if isinstance(converge, bool) or not isinstance(converge, int) or converge < 1:
        raise CheckpointError(f"converge must be an integer ≥ 1, got {converge!r}")
    if profile not in BENCHMARK_PROFILES:
        raise CheckpointError(f"unknown profile {profile!r}; choose one of {', '.join(BENCHMARK_PROFILES)}")
    settings = BENCHMARK_PROFILES[profile]
    out, runs = Path(out), Path(runs)
    horizons = [h * iterations for h in HORIZONS]
    header = ["method", "learned", *(f"PSNR K={k} (dB)" for k in early), f"PSNR K={iterations} (dB)",
              f"SSIM K={iterations}", *(f"PSNR {h}K={h * iterations} (dB)" for h in HORIZONS[1:]),
              f"iterations to the baseline's best (≤ {max(converge, horizons[-1])})",
              "seed spread (dB)", "parameters", "ratio to D2GP", "training (min)", "inference (ms/image)"]
    device = resolve_device(device)
    all_rows, results = [], {}
    for task_name in tasks:
        announce(f"benchmark {task_name}: loading the task, its denoiser and data", progress)
        task = make_task(task_name, device=device, **(task_settings or {}))
        precision("evaluation", device)
        denoiser = task.denoiser()
        train_settings = {**settings["train"].get(task_name, settings["train"]["spc"]), **train_overrides}
        val = task.images("val", limit=tune_images or settings["tune_images"])
        test = task.images("test", limit=limit or settings["test_images"].get(task_name))
        timing_batch = test[: min(16, len(test))]
        entries = []
        for name in tqdm(methods, desc=f"benchmark {task_name}", disable=not progress):
            method = METHODS[name]
            doing = ("training (or reusing) its runs" if method.learned else
                     "no tuning" if name == "teacher" else f"tuning on {len(val)} validation images")
            announce(f"{task_name}, {name}: {doing}, then evaluating on {len(test)} test images", progress)
            evaluations, trained_seconds, record, params = [], [], {}, 0
            if method.learned:
                lr = TASK_LR.get(task_name, {}).get(method.train["preconditioner"])
                for seed in seeds:
                    config = TrainConfig(task=task_name, task_settings=task_settings or {}, seed=seed, iterations=iterations,
                                         algorithm=algorithm, **{**({"lr": lr} if lr else {}), **train_settings,
                                                                 **method.train})
                    run_dir = ensure_trained(config, runs / task_name / f"{name}-seed{seed}", progress=progress,
                                             device=device)
                    precision("evaluation", device)
                    P, meta = load_npo(run_dir / "best.pt", task)
                    summary = json.loads((run_dir / "summary.json").read_text())
                    trained_seconds.append(summary["training_seconds"])
                    evaluations.append((P, task.student, trained_step_size(meta, task), trained_algorithm(meta)))
                    record[f"seed{seed}"] = str(run_dir)
            elif name == "teacher":
                evaluations.append((None, task.teacher, task.teacher_step_size, algorithm))
            else:
                P, gamma, record = tune_classical(name, task, val, denoiser, iterations, restart, algorithm)
                evaluations.append((P, task.student, gamma, algorithm))
            runs_of_method, seconds = [], []
            horizon = max(horizons[-1], converge) if name == "baseline" else horizons[-1]
            for P, physics, step, host in evaluations:
                params = _parameters(P)
                runs_of_method.append(evaluate_solver(method.label, physics, test, denoiser, step, horizon,
                                                      preconditioner=P, ssim_at=(iterations,), keep_examples=examples,
                                                      examples_at=iterations,
                                                      progress=False, restart=restart, algorithm=host))
                seconds.append(_seconds_per_image(physics, timing_batch, denoiser, step, iterations, P, host))
            entries.append((name, method, runs_of_method, params, trained_seconds, record, evaluations[0][2],
                            1000 * sum(seconds) / len(seconds)))
        d2gp_params = next((e[3] for e in entries if e[0] == "d2gp"), None)
        per_iteration = {name: [float(torch.stack([r.psnr[k].mean() for r in runs_of_method]).mean())
                                for k in range(runs_of_method[0].iterations + 1)]
                         for name, _, runs_of_method, *_ in entries}
        target = (max(per_iteration["baseline"][1:]) - CONVERGED_TOLERANCE_DB) if "baseline" in per_iteration else None
        rows, task_results = [], []
        for name, method, runs_of_method, params, trained_seconds, record, step, ms in entries:
            K = iterations
            reached = iterations_to_reach(per_iteration[name], target) if target is not None else None
            pooled = {k: torch.cat([r.psnr[k] for r in runs_of_method]) for k in [*early, *horizons]}
            ssim_pooled = torch.cat([r.ssim[K] for r in runs_of_method])
            seed_means = [float(r.psnr[K].mean()) for r in runs_of_method]
            spread = f"{mean_std(seed_means)[1]:.2f}" if len(seed_means) > 1 else "—"
            ratio = f"{params / d2gp_params:.3g}" if (d2gp_params and method.learned) else "—"
            minutes = f"{sum(trained_seconds) / len(trained_seconds) / 60:.1f}" if trained_seconds else "—"
            rows.append([method.label, "yes" if method.learned else "no", *(format_mean_std(pooled[k]) for k in early),
                         format_mean_std(pooled[K]), format_mean_std(ssim_pooled, 3),
                         *(format_mean_std(pooled[k]) for k in horizons[1:]),
                         "—" if target is None else str(reached) if reached is not None else f"> {len(per_iteration[name]) - 1}",
                         spread,
                         params if method.learned else "—", ratio, minutes, f"{ms:.1f}"])
            task_results.append({"method": name, "label": method.label, "learned": method.learned, "parameters": params,
                                 "seeds": len(runs_of_method), "psnr_seed_means": seed_means,
                                 "psnr": {k: mean_std(v) for k, v in pooled.items()}, "ssim": mean_std(ssim_pooled),
                                 "psnr_per_iteration": per_iteration[name][:horizons[-1] + 1],
                                 "iterations_to_baseline_best": reached,
                                 "training_seconds": trained_seconds, "inference_ms_per_image": ms,
                                 "parameter_megabytes": 4 * params / 1e6,  # float32; Adam training holds 4×
                                 "step_size": step, "tuning_or_runs": record})
        task_out = out / task_name
        task_config = {"algorithm": algorithm, "restart": restart, "profile": profile, "early": early, "converge": converge,
                       "baseline_best_minus_tolerance": target, "tolerance_db": CONVERGED_TOLERANCE_DB, "train": train_settings, "seeds": list(seeds), "iterations": iterations,
                       "task": task.config.to_dict(), "test_images": len(test), "tune_images": len(val)}
        write_results(task_out, header, rows, {"config": task_config, "methods": task_results}, device=device)
        first_runs = [e[2][0] for e in entries]
        examples_figure(test, first_runs, iterations, task_out / "examples.png",
                        f"{task.name}: {ALGORITHM_NAMES[algorithm]}, K = {iterations}")
        psnr_curves({r["label"]: r["psnr_per_iteration"] for r in task_results}, task_out / "psnr_curves.png",
                    title=f"{task.name}: PSNR over iterations", train_iterations=iterations)
        results[task_name] = {"config": task_config, "methods": task_results, "table": markdown_table(header, rows)}
        all_rows += [[task_name, *row] for row in rows]
        if progress:
            tqdm.write(f"\n{task_name}:\n" + markdown_table(header, rows))
    write_results(out, ["task", *header], all_rows, {"tasks": {t: {k: v for k, v in r.items() if k != "table"}
                                                              for t, r in results.items()}}, device=device)
    return {"table": markdown_table(["task", *header], all_rows), "results": results, "out": str(out)}

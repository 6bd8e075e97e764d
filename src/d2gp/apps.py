"""Runnable applications that put the layers together: evaluate trained runs, the demo.

They write their results (tables, JSON with the configuration and environment, figures) into
an output folder and return the same data; :mod:`d2gp.cli` only parses arguments and calls them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from d2gp.checkpoints import CheckpointError, read_json, require_entries
from d2gp.device import precision, resolve_device
from d2gp.data.cache import cache_dir
from d2gp.evaluation import evaluate_solver, format_mean_std, tune_step_size
from d2gp.plots import examples_figure, psnr_curves
from d2gp.reports import markdown_table, write_results
from d2gp.tasks import make_task
from d2gp.preconditioners.files import trained_algorithm, trained_step_size
from d2gp.solver import ALGORITHM_NAMES, check_algorithm
from d2gp.training import TrainConfig, load_npo, resolve_autocast, saved_train_config, train

__all__ = ["add_budget_arguments", "evaluate_runs", "evaluation_dir", "check_host", "demo", "ensure_trained", "announce",
           "announce_training", "profile_settings", "PROFILES", "TASK_PROFILES", "HORIZONS", "horizon_label",
           "DEMO_TEST_IMAGES"]

#: Training profiles: the budget (and its schedule) a preset gives a learned preconditioner.
#:
#: * ``quick``: the demo — D2GP and Supervised on SPC, trained and evaluated in the time and memory
#:   that ``benchmarks/main_job.py`` measures (``benchmarks/results/demo-spc/time.json``);
#: * ``cpu``: the longest budget a laptop affords — D2GP and Supervised on the three tasks on 2
#:   cores (SPC 1 500 updates of 8 images, MRI and SR 500 of 4; six 1-thread runs on two workers,
#:   ``benchmarks/cpu_profile.sh``, ``benchmarks/results/cpu_profile``), with truncated
#:   backpropagation through the last 3 iterations (1.9× faster than the full unroll, no PSNR
#:   lost beyond seed noise at 512 SPC updates: ``benchmarks/results/truncated_unroll``); validated
#:   after 64 and 128 updates and every 250 (one validation costs 5–12 s on one thread, about 20
#:   updates' worth);
#: * ``paper``: every training image, 30 epochs of 32 — for a GPU (``benchmarks/paper_profile.sh``: the six
#:   trainings at once with ``--cuda-graph``; on one H200 about 16–17 min predicted from 4.5 min of it,
#:   ``benchmarks/results/paper_profile``).
#:
#: All of them keep :class:`~d2gp.training.TrainConfig`'s defaults for what keeps a learned
#: preconditioner stable past K (``benchmarks/results/stability``): the loss over the last 10
#: iterates (``tail``; ``cpu``: the 3 its truncated unroll backpropagates through), cosine decay
#: after the warm-up, gradient clipping.
PROFILES = {
    "quick": dict(train_images=2000, val_images=32, batch_size=8, updates=120, val_every=40, warmup=10),
    "cpu": dict(train_images=None, val_images=64, batch_size=8, updates=1500, val_every=250, warmup=30,
                unroll="truncated", truncate=3, val_points=[64, 128]),
    "paper": dict(train_images=None, val_images=200, batch_size=32, epochs=30, warmup=100),
}

#: Test images the demo evaluates on (to 5K = 100 iterations, four methods): the first 200 of the split.
DEMO_TEST_IMAGES = 200

#: Per-task changes to a profile: one update on a 64×64 image costs about 4× one on a 32×32 digit,
#: so MRI and SR take fewer images per update (and the quick demo on them fewer updates).
TASK_PROFILES = {
    ("quick", "mri"): dict(batch_size=4, updates=80, val_every=20, val_images=16),
    ("quick", "sr"): dict(batch_size=4, updates=80, val_every=20, val_images=16),
    ("cpu", "mri"): dict(batch_size=4, updates=500, val_images=32),
    # SR keeps the last 5: with the last 3, D2GP lost 0.2-0.3 dB on the test split against both seeds of the
    # last-5 run, whose seeds differ by 0.05 dB (benchmarks/results/cpu_profile, README)
    ("cpu", "sr"): dict(batch_size=4, updates=500, val_images=32, truncate=5),
}


def add_budget_arguments(parser, profile: str = "quick") -> None:
    """The training-budget flags of the ablation scripts (``benchmarks/*_ablation.py``), one
    :class:`~d2gp.training.TrainConfig` per variant, with ``profile``'s values as defaults."""
    import json

    budget = PROFILES[profile]
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--iterations", type=int, default=20)
    for name in ("updates", "batch_size", "train_images", "val_images", "val_every", "warmup"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=budget[name])
    parser.add_argument("--npo", type=json.loads, default={}, help="NPO settings, JSON (tests: a tiny one)")
    parser.add_argument("--task-settings", type=json.loads, default={}, help="task settings, JSON")


def profile_settings(profile: str, task: str) -> dict:
    """The :class:`~d2gp.training.TrainConfig` fields that ``profile`` sets for ``task``."""
    if profile not in PROFILES:
        raise CheckpointError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return {**PROFILES[profile], **TASK_PROFILES.get((profile, task), {})}


def announce(message: str, progress: bool = True) -> None:
    """Say what is happening now, one line on stderr (written between progress bars); nothing when
    ``progress`` is off, so that a ``progress=False`` API call stays silent."""
    if progress:
        tqdm.write(message, file=sys.stderr)


def announce_training(config: TrainConfig, run_dir: str | os.PathLike, resuming: bool, progress: bool = True) -> None:
    """:func:`announce` the training run about to start (or resume): what, on how much data, and
    that the data are loaded first (slow only the first time: then they are cached)."""
    images = "all" if config.train_images is None else config.train_images
    budget = f"{config.updates} updates" if config.updates else f"{config.epochs} epochs"
    every = f"every {config.val_every} updates" if config.val_every else "after each epoch"
    base = f" on top of the tuned {config.base}" if config.base else ""
    announce(f"{run_dir}: {'resuming' if resuming else 'training'} {config.method} ({config.preconditioner}{base}) on "
             f"{config.task}: {images} images, {budget} of batch {config.batch_size}; validation PSNR {every}", progress)
    announce(f"loading the data and the denoiser (a dataset's first load also caches it in {cache_dir()})", progress)


def ensure_trained(config: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = True,
                   progress: bool = True, device: str | None = "auto") -> Path:
    """Train ``config`` into ``run_dir`` unless a finished run of exactly that configuration is there.

    An interrupted run of the same configuration is resumed (``resume``); a run of another
    configuration is never overwritten (:class:`~d2gp.training.TrainingError` names what differs).
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    config = resolve_autocast(config, resolve_device(device), run_dir, resume=True)  # unset: the run's own
    finished = (run_dir / "summary.json").is_file() and config_path.is_file() and \
        saved_train_config(run_dir) == config.to_json_dict()
    if finished:
        announce(f"{run_dir}: a finished run of this configuration, reused (delete the folder to train again)", progress)
    else:
        resuming = resume and (run_dir / "checkpoint.pt").exists()
        announce_training(config, run_dir, resuming, progress)
        train(config, run_dir, resume=resuming, progress=progress, device=device)
    return run_dir


METHOD_LABELS = {"d2gp": "D2GP", "supervised": "Supervised"}


def check_host(algorithm: str, restart: bool) -> str:
    """:func:`~d2gp.solver.check_algorithm`, its refusal a :class:`~d2gp.checkpoints.CheckpointError`
    (one line from the command line), before any compute."""
    try:
        return check_algorithm(algorithm, restart)
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a training run directory (no config.json)")
    config = read_json(path, "run configuration")
    require_entries(config, {"train": dict, "task": dict}, path, "run configuration")
    return config


#: Multiples of K at which every evaluation reports PSNR: does a method hold past the K it was trained for?
HORIZONS = (1, 2, 5)


def horizon_label(multiple: int) -> str:
    """A horizon's name in tables: ``1`` → ``"K"``, ``5`` → ``"5K"``."""
    return "K" if multiple == 1 else f"{multiple}K"


def evaluation_dir(run_dirs: Sequence[str | os.PathLike]) -> Path:
    """Where an evaluation of ``run_dirs`` is written unless told otherwise: ``evaluation/`` in the
    deepest folder that contains all of them — ``RUN/evaluation`` for one run, ``runs/evaluation``
    for ``runs/spc-d2gp`` and ``runs/spc-sup``, ``runs/demo/evaluation`` for the demo's
    ``runs/demo/d2gp`` and ``runs/demo/supervised``.

    :raises CheckpointError: no runs, or runs that share no folder but the filesystem root.
    """
    paths = [os.path.normpath(os.fspath(d)) for d in run_dirs]
    if not paths:
        raise CheckpointError("no run directories to evaluate")
    try:
        common = Path(os.path.commonpath(paths))
    except ValueError:  # absolute and relative paths mixed
        common = Path(os.path.commonpath([os.path.abspath(p) for p in paths]))
    if common.is_absolute() and common == Path(common.anchor):
        raise CheckpointError(f"the runs {', '.join(paths)} share no folder to hold their evaluation: "
                              f"choose one with --out")
    return common / "evaluation"


def evaluate_runs(run_dirs: Sequence[str | os.PathLike], *, split: str = "test", limit: int | None = None,
                  iterations: int | None = None, out: str | os.PathLike | None = None, batch_size: int = 64,
                  examples: int = 4, progress: bool = True, device: str | None = "auto",
                  safeguard: float | None = None, horizons: Sequence[int] = HORIZONS, restart: bool | None = None,
                  images: torch.Tensor | None = None, val_images: torch.Tensor | None = None,
                  algorithm: str | None = None) -> dict:
    """Compare trained NPOs with the student baseline (step tuned on validation) and the teacher.

    Every method runs to 5K iterations (K = the runs' training K unless ``iterations``; other
    multiples of K with ``horizons``), so the table shows PSNR at K and whether it holds at 2K and
    5K. All runs must be of the same task settings. With ``safeguard`` (ρ), each trained
    preconditioner is also run with the solver's safeguard (:func:`~d2gp.solver.pnp_fista`), as an
    extra row. With ``restart`` (the default with FISTA), every method — the baseline, whose γ is
    tuned so, included — runs with the solver's adaptive momentum restart, which keeps both the
    tuned baseline and the learned preconditioners stable past K (``benchmarks/results/stability``).
    Every method runs in the host ``algorithm`` (:func:`~d2gp.solver.solve`), by default the one
    the runs were trained in (``TrainConfig.algorithm``; runs trained in different ones need it).
    The results go to ``out``, by default :func:`evaluation_dir` of the runs.

    The task is rebuilt from the runs' ``config.json`` by name: a task of your own must be
    registered first (:func:`d2gp.tasks.own_task`, :func:`d2gp.tasks.register_task`). Each learned
    preconditioner runs with the student step it was trained with
    (:func:`~d2gp.preconditioners.files.trained_step_size`).

    :param images, val_images: the test and validation images, instead of the task's dataset's
        ``split`` and validation split (for a task without a dataset).
    :param restart: ``None``: on with ``fista``, off with ``pgd`` and ``hqs`` (no momentum to restart).
    :param algorithm: ``None``: the runs' own.
    """
    run_dirs = [Path(d) for d in run_dirs]
    configs = [_run_config(d) for d in run_dirs]
    first = configs[0]
    for d, c in zip(run_dirs[1:], configs[1:]):
        if c["task"] != first["task"]:
            raise CheckpointError(f"{d} was trained on other task settings than {run_dirs[0]}: cannot compare them")
    train_config = TrainConfig.from_dict(first["train"])
    trained_in = [TrainConfig.from_dict(c["train"]).algorithm for c in configs]
    if algorithm is None:
        if len(set(trained_in)) > 1:
            raise CheckpointError(f"the runs were trained in different algorithms ({', '.join(sorted(set(trained_in)))}): "
                                  f"choose the one to evaluate them all in (--algorithm)")
        algorithm = trained_in[0]
    restart = algorithm == "fista" if restart is None else restart
    check_host(algorithm, restart)
    task = make_task(train_config.task, device=resolve_device(device), **train_config.task_settings)
    precision("evaluation", task.device)
    K = train_config.iterations if iterations is None else iterations
    if K < 1:
        raise CheckpointError(f"iterations must be ≥ 1, got {K}")
    multiples = sorted(set(horizons) | {1})
    horizons = [h * K for h in multiples]
    horizon = horizons[-1]
    out = Path(out) if out is not None else evaluation_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    announce(f"evaluating on {task.name}: loading the {split} and validation images and the denoiser", progress)
    denoiser = task.denoiser()
    images = task.images(split, limit=limit) if images is None else task.check_images(images, f"{split} images")[:limit]
    val = task.images("val", limit=train_config.val_images) if val_images is None else \
        task.check_images(val_images, "validation images")[:train_config.val_images]

    announce(f"tuning the student baseline's step size γ on {len(val)} validation images at K = {K} in "
             f"{ALGORITHM_NAMES[algorithm]} (a grid, then golden-section search){', with adaptive restart' if restart else ''}",
             progress)
    tuned, tuning = tune_step_size(task.student, val, denoiser, task.student_step_size, K, restart=restart,
                                   algorithm=algorithm)
    announce(f"baseline step γ = {tuned:.4g} ({tuned / task.student_step_size:.2f} × the task's γ)", progress)
    methods = [("student baseline", task.student, tuned, None, None)]
    per_method = [c["train"]["method"] for c in configs]
    for run_dir in run_dirs:
        npo, meta = load_npo(run_dir / "best.pt", task)
        label = METHOD_LABELS.get(meta["method"], meta["method"])
        if per_method.count(meta["method"]) > 1:  # several runs of one method: name them
            label = f"{label} ({run_dir.name})"
        own_host = trained_algorithm(meta)
        if own_host != algorithm:
            label = f"{label}, trained in {own_host}"
        step = trained_step_size(meta, task)
        methods.append((label, task.student, step, npo, None))
        if safeguard is not None:
            methods.append((f"{label}, safeguard ρ={safeguard:g}", task.student, step, npo, safeguard))
    methods.append(("teacher (upper bound)", task.teacher, task.teacher_step_size, None, None))

    announce(f"running {len(methods)} methods to {multiples[-1]}K = {horizon} iterations on {len(images)} {split} images", progress)
    runs = []
    for label, physics, step, preconditioner, rho in methods:
        runs.append(evaluate_solver(label, physics, images, denoiser, step, horizon, preconditioner=preconditioner,
                                    ssim_at=(K,), batch_size=batch_size, keep_examples=examples, examples_at=K,
                                    progress=progress, safeguard=rho, restart=restart, algorithm=algorithm))
    header = ["method", f"PSNR K={K} (dB)", f"SSIM K={K}", *(f"PSNR {h}K={h * K} (dB)" for h in multiples[1:]),
              "step size γ", "seconds"]
    rows = [[run.label, format_mean_std(run.psnr[K]), format_mean_std(run.ssim[K], 3),
             *(format_mean_std(run.psnr[k]) for k in horizons[1:]), f"{step:.4g}", f"{run.seconds:.1f}"]
            for run, (_, _, step, _, _) in zip(runs, methods)]
    results = {
        "task": task.name, "split": split, "images": len(images), "iterations": K, "horizons": horizons,
        "runs": [str(d) for d in run_dirs], "algorithm": algorithm, "restart": restart, "baseline_step_tuning": {"chosen": tuned, "val_psnr_by_step": tuning},
        "methods": [{**run.summary(), "step_size": step, "safeguard": rho}
                    for run, (_, _, step, _, rho) in zip(runs, methods)],
    }
    announce(f"writing the table and figures to {out}", progress)
    write_results(out, header, rows, results, device=task.device)
    examples_figure(images, runs, K, out / "examples.png", f"{task.name}: {ALGORITHM_NAMES[algorithm]}, K = {K}")
    psnr_curves({run.label: run.summary()["psnr_per_iteration"] for run in runs}, out / "psnr_curves.png",
                title=f"{task.name}: PSNR over iterations (trained for K = {K}"
                      f"{'; adaptive restart' if restart else ''})", train_iterations=K)
    return {"table": markdown_table(header, rows), "results": results, "out": str(out)}


def demo(out: str | os.PathLike = "runs/demo", task: str = "spc", profile: str = "quick", seed: int = 0,
         resume: bool = True, progress: bool = True, limit: int | None = DEMO_TEST_IMAGES,
         device: str | None = "auto", restart: bool | None = None,
         **overrides) -> dict:
    """The main job: train D2GP and Supervised NPOs with ``profile``, then evaluate them on the test split.

    The runs go to ``out/d2gp`` and ``out/supervised``, the evaluation to ``out/evaluation``
    (:func:`evaluation_dir`, the rule of ``d2gp evaluate``). Finished runs in ``out`` are reused
    (``resume``), so an interrupted demo continues where it stopped.
    ``overrides`` are :class:`~d2gp.training.TrainConfig` fields (``algorithm="pgd"``: both NPOs
    trained, and then evaluated, in PnP-PGD; ``restart`` follows it); ``limit`` caps the test images
    (default :data:`DEMO_TEST_IMAGES`; ``None``: all).
    """
    out = Path(out)
    base = TrainConfig(task=task, seed=seed, **{**profile_settings(profile, task), **overrides})
    announce(f"d2gp demo: train D2GP and Supervised NPOs on {task} ({profile} profile), then compare them with "
             f"the student baseline and the teacher on the test split", progress)
    run_dirs = [ensure_trained(replace(base, method=method), out / method, resume=resume, progress=progress,
                               device=device) for method in ("d2gp", "supervised")]
    return evaluate_runs(run_dirs, limit=limit, progress=progress, device=device, restart=restart)

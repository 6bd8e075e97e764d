"""The ``d2gp`` command: parses arguments, then calls the library. No logic of its own.

Subcommands: ``demo``, ``train``, ``evaluate``, ``reconstruct``, ``benchmark``, ``analyze``,
``train-denoiser``, ``tasks``, ``datasets``. Every task setting
is a flag (``--student-ratio 0.05``, ``--image-size 128``…), generated from the task
configuration dataclasses, so the CLI and the Python API cannot drift apart.

Bad input never ends in a traceback: a wrong flag value or an error of the library is one line
``d2gp COMMAND: error: …`` on stderr and exit code 2, checked before any compute (output paths
included); a warning is one line ``d2gp COMMAND: warning: …``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import math
import os
import sys
import typing
import warnings

import torch

from d2gp.checkpoints import CheckpointError, check_output_path, lock_path, write_json
from d2gp.device import precision
from d2gp.reports import environment
from d2gp.tasks import TASKS, TaskError, make_task

__all__ = ["main", "build_parser"]


# --- shared pieces ------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is in ``--help``), exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    """An argparse ``type`` for integers ≥ ``low`` (counts, K, seeds)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _rho(text: str) -> float:
    """An argparse ``type`` for the safeguard's ρ: a finite number ≥ 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 1 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 1, got {text}")
    return value


def _task_fields() -> dict[str, dataclasses.Field]:
    """Every task setting of every task, by name (a setting shared by tasks appears once)."""
    fields: dict[str, dataclasses.Field] = {}
    for cls in TASKS.values():
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, f)
    return fields


def _field_type(f: dataclasses.Field):
    text = str(f.type)
    return float if "float" in text else int if "int" in text else str


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=list(TASKS),
                        help="which task (see `d2gp tasks`; tasks of your own: `d2gp --import MODULE ...`)")
    group = parser.add_argument_group("task settings (default: the task's own; see `d2gp tasks`)")
    for name, f in _task_fields().items():
        owners = [t for t, cls in TASKS.items() if name in {g.name for g in dataclasses.fields(cls)}]
        scope = "" if len(owners) == len(TASKS) else f" [{', '.join(owners)}]"
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"task_{name}", type=_field_type(f), default=None,
                           metavar=_field_type(f).__name__.upper(), help=f.metadata.get("help", "") + scope)


def _task_overrides(args: argparse.Namespace) -> dict:
    return {k[len("task_"):]: v for k, v in vars(args).items() if k.startswith("task_") and v is not None}


def _task_from_args(args: argparse.Namespace):
    return make_task(args.task, device=getattr(args, "device", "cpu"), **_task_overrides(args))


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    from d2gp.device import DEVICES

    parser.add_argument("--device", default="auto", metavar="|".join(DEVICES),
                        help="where to compute: auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or "
                             "cuda:N (default auto)")


def _add_restart_argument(parser: argparse.ArgumentParser, restart: bool | None) -> None:
    """``--restart``; ``restart=None``: on with FISTA, off with the hosts that have no momentum."""
    default = "on with --algorithm fista, off with pgd and hqs (no momentum)" if restart is None else \
        "on" if restart else "off"
    parser.add_argument("--restart", action=argparse.BooleanOptionalAction, default=restart,
                        help="adaptive momentum restart in every method's solver: FISTA's momentum is reset for an "
                             "image whose step ‖x_{k+1} − x_k‖ grew; keeps the tuned baseline and the learned "
                             f"preconditioners stable past K (default {default}; off is the paper's plain PnP-FISTA; "
                             "fista only)")


def _add_algorithm_argument(parser: argparse.ArgumentParser, default: str | None, shown: str) -> None:
    from d2gp.solver import ALGORITHMS, HQS_INNER_STEPS

    parser.add_argument("--algorithm", choices=list(ALGORITHMS), default=default,
                        help="the host algorithm of every method: fista (PnP-FISTA), pgd (PnP-PGD: no momentum) or hqs "
                             f"(PnP-HQS, its data step {HQS_INNER_STEPS} preconditioned gradient steps on the proximal "
                             f"sub-problem) (default {shown})")


def _add_safeguard_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--safeguard", type=_rho, default=None, metavar="RHO",
                        help="also run each learned preconditioner with the solver's safeguard: a step whose residual "
                             "‖x_{k+1} − x_k‖ exceeds RHO × the smallest so far is rejected and that image continues "
                             "as plain PnP-FISTA (e.g. 2)")


# Training settings that get a flag of their own (the others are set by the profile or the API).
_TRAIN_FLAGS = {
    "method": "d2gp (distillation), supervised (L_s only) or objective (fidelity decrease, Ehrhardt et al.)",
    "preconditioner": "what is trained: npo, or a learned linear one: scalar, pointwise, convolutional, full",
    "iterations": "unrolled iterations K",
    "epochs": "training epochs",
    "batch_size": "images per step",
    "train_images": "training images used (default: the profile's; 0 = all)",
    "val_images": "validation images scored after each epoch",
    "optimizer": "adam or adamw",
    "lr": "learning rate",
    "weight_decay": "weight decay (AdamW)",
    "lambda_gradient": "λ_g, weight of the gradient (cosine) loss",
    "lambda_imitation": "λ_i, weight of the imitation loss (student vs teacher output)",
    "lambda_supervised": "λ_s, weight of the supervised loss (output vs ground truth)",
    "teacher_gradient": "where the teacher gradient is taken: student (its iterates) or teacher (its trajectory)",
    "unroll": "full (backpropagate all K), checkpoint (same gradients, less memory) or truncated",
    "truncate": "iterations backpropagated in --unroll truncated",
    "autocast": "bfloat16 autocast for the denoiser and the NPO (the operators and the losses stay float32)",
    "seed": "random seed",
    "tensorboard": "also log to TensorBoard (needs the tensorboard package)",
    "updates": "total optimizer updates (default: the profile's epochs × updates per epoch)",
    "val_every": "validate (and checkpoint) every N updates (default once per epoch)",
    "schedule": "learning-rate schedule: cosine (warm-up, then cosine decay), plateau or constant",
    "warmup": "updates of linear learning-rate warm-up (cosine and constant schedules)",
    "final_lr_ratio": "the cosine schedule ends at this fraction of the learning rate",
    "grad_clip": "clip the gradient norm to this value",
    "tail": "the imitation and supervised losses average over the last TAIL iterates x_{K-TAIL+1} … x_K; "
             "1 is the paper's loss on x_K alone (None: min(10, K))",
    "teacher_cache": "compute the teacher's targets once per training image instead of every update",
    "base": "train the preconditioner on top of a classical one, tuned first on the validation split: newton, "
            "poly-l2, poly-chebyshev, poly-ifista, or baseline (the tuned step); it starts as that method",
    "step_size": "the student's step γ the preconditioner is trained and evaluated with (the task itself, and the "
                 "baseline's tuning, keep --student-step-size)",
    "tune_step": "tune γ on the validation split before training (as the baseline's), instead of starting at 1/L",
    "algorithm": "the host algorithm the student and the teacher run in training and in every evaluation of the run: "
                 "fista, pgd (no momentum) or hqs (preconditioned inexact data step)",
}
_NPO_FLAGS = {
    "width": (int, "NPO channels per block"),
    "blocks": (int, "NPO ConvNeXt blocks"),
    "kernel_size": (int, "NPO depthwise kernel size"),
    "expansion": (int, "NPO MLP expansion factor"),
    "activation": (str, "NPO activation: relu or gelu"),
    "use_iterate": (bool, "feed the iterate z_k to the NPO too: P(g, z, k)"),
    "levels": (int, "resolution levels of a U-Net-shaped NPO trunk (1: none)"),
    "global_path": (bool, "add the NPO's global-pooling path"),
    "spectral_size": (int, "add a learned per-iteration Fourier multiplier on a grid of this side (the image's)"),
}


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from d2gp.apps import PROFILES, TASK_PROFILES
    from d2gp.training import DEFAULT_LR, TrainConfig

    defaults, hints = TrainConfig(), typing.get_type_hints(TrainConfig)
    defaults_shown = {"lr": "per preconditioner: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()),
                      "step_size": "the task's student step, 1/L",
                      "autocast": "on for CPUs with AMX bf16, off elsewhere; a resumed run keeps its own"}
    group = parser.add_argument_group("training settings")
    presets = [f"{k}: {v}" for k, v in PROFILES.items()] + [f"{p} on {t}: also {v}" for (p, t), v in TASK_PROFILES.items()]
    group.add_argument("--profile", choices=list(PROFILES), default="quick",
                       help="preset of data size and epochs: " + "; ".join(presets))
    for name, help_text in _TRAIN_FLAGS.items():
        default = getattr(defaults, name)
        flag = f"--{name.replace('_', '-')}"
        if isinstance(default, bool) or hints[name] == bool | None:
            group.add_argument(flag, dest=f"train_{name}", action=argparse.BooleanOptionalAction, default=None,
                               help=f"{help_text} (default {defaults_shown.get(name, default)})")
        else:
            kind = next(t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None))
            shown = defaults_shown.get(name, default)
            group.add_argument(flag, dest=f"train_{name}", type=kind, default=None, metavar=kind.__name__.upper(),
                               help=f"{help_text} (default {shown})")
    group = parser.add_argument_group("NPO architecture")
    for name, (kind, help_text) in _NPO_FLAGS.items():
        flag = f"--{name.replace('_', '-')}"
        if kind is bool:
            group.add_argument(flag, dest=f"npo_{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f"npo_{name}", type=kind, default=None, metavar=kind.__name__.upper(),
                               help=help_text)


def _train_config_from_args(args: argparse.Namespace):
    from d2gp.apps import profile_settings
    from d2gp.training import DEFAULT_NPO, TrainConfig

    settings = profile_settings(args.profile, args.task)
    settings.update({k[len("train_"):]: v for k, v in vars(args).items() if k.startswith("train_") and v is not None})
    if settings.get("train_images") == 0:  # the flag's "0 = all"
        settings["train_images"] = None
    npo = {**DEFAULT_NPO, **{k[len("npo_"):]: v for k, v in vars(args).items() if k.startswith("npo_") and v is not None}}
    return TrainConfig(task=args.task, task_settings=_task_overrides(args), npo=npo, **settings)


def _iteration_list(text: str | None, iterations: int) -> list[int]:
    if text is None:  # the default: the usual checkpoints that fit in K
        return sorted({k for k in (1, 2, 5, 10, 20) if k <= iterations} | {iterations})
    try:
        ks = sorted({int(v) for v in text.split(",") if v.strip()} | {iterations})
    except ValueError:
        raise TaskError(f"--report must be a comma-separated list of integers, got {text!r}") from None
    bad = [k for k in ks if not 0 <= k <= iterations]
    if bad:
        raise TaskError(f"--report values must lie in [0, {iterations}], got {bad}")
    return ks


# --- subcommands --------------------------------------------------------------------------------
def cmd_tasks(args: argparse.Namespace) -> None:
    for name, cls in TASKS.items():
        config = cls()
        print(f"{name}: {cls.description}\n  {config.describe()}\n  dataset: {config.default_dataset}")
        for f in dataclasses.fields(cls):
            print(f"    --{f.name.replace('_', '-'):<22} {getattr(config, f.name)!s:<16} {f.metadata.get('help', '')}")
        print()


def cmd_datasets(args: argparse.Namespace) -> None:
    from d2gp.data import list_datasets

    for name, description in list_datasets().items():
        print(f"{name:<16} {description}")


def cmd_reconstruct(args: argparse.Namespace) -> None:
    from d2gp.evaluation import evaluate_solver, format_mean_std
    from d2gp.plots import examples_figure, psnr_curves
    from d2gp.reports import markdown_table, write_results

    task = _task_from_args(args)
    ks = _iteration_list(args.report, args.iterations)
    out = check_output_path(args.out or f"results/reconstruct-{task.name}", folder=True)
    if (out / "checkpoint.pt").exists():  # its config.json would be replaced by this command's
        raise CheckpointError(f"--out {out} is a training run directory; write the reconstructions elsewhere")
    from d2gp.apps import check_host
    from d2gp.solver import ALGORITHM_NAMES

    methods = [("student", task.student, task.student_step_size, None, None)]
    algorithm = args.algorithm or "fista"
    if args.preconditioner != "identity":  # files first, then data and compute
        from d2gp.training import load_npo

        from d2gp.preconditioners.files import trained_algorithm, trained_step_size

        npo, meta = load_npo(args.preconditioner, task)
        algorithm = args.algorithm or trained_algorithm(meta)
        label, step = f"student + {meta['method']} NPO", trained_step_size(meta, task)
        if trained_algorithm(meta) != algorithm:
            label = f"{label} (trained in {trained_algorithm(meta)})"
        methods.append((label, task.student, step, npo, None))
        if args.safeguard is not None:
            methods.append((f"{label}, safeguard ρ={args.safeguard:g}", task.student, step, npo, args.safeguard))
        if meta.get("task_config") != task.config.to_dict():
            print(f"note: the NPO was trained with other task settings ({meta.get('task_config')})")
    check_host(algorithm, args.restart)
    denoiser = task.denoiser()
    images = task.images(args.split, limit=args.limit)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{task!r}\n{len(images)} {args.split} images from {task.dataset!r}, {ALGORITHM_NAMES[algorithm]}, K = {args.iterations}, "
          f"γ_student = {task.student_step_size:.4g}, γ_teacher = {task.teacher_step_size:.4g}")
    methods.append(("teacher", task.teacher, task.teacher_step_size, None, None))
    precision("evaluation", task.device)
    runs = [evaluate_solver(label, physics, images, denoiser, step, args.iterations, preconditioner=preconditioner,
                            ssim_at=ks, noise_seed=args.noise_seed, batch_size=args.batch_size,
                            keep_examples=args.examples, safeguard=rho, restart=args.restart, algorithm=algorithm)
            for label, physics, step, preconditioner, rho in methods]

    rows = [[run.label, k, format_mean_std(run.psnr[k]), format_mean_std(run.ssim[k], 3)] for run in runs for k in ks]
    header = ["method", "k", "PSNR (dB)", "SSIM"]
    print(markdown_table(header, rows))
    write_json({"config": task.config.to_dict(), "cli": {k: v for k, v in vars(args).items() if k != "func"},
                "environment": environment(task.device)}, out / "config.json")
    write_results(out, header, rows, {
        "task": task.name, "dataset": task.dataset, "split": args.split, "images": len(images), "algorithm": algorithm,
        "step_size": {"student": task.student_step_size, "teacher": task.teacher_step_size},
        "seconds": {run.label: run.seconds for run in runs}, "runs": [run.summary() for run in runs]}, device=task.device)
    examples_figure(images, runs, args.iterations, out / "examples.png",
                    f"{task.name}: {ALGORITHM_NAMES[algorithm]}, K = {args.iterations}")
    psnr_curves({run.label: run.summary()["psnr_per_iteration"] for run in runs}, out / "psnr_curves.png",
                title=f"{task.name}: PSNR over iterations")
    print(f"wrote {out}/ (table.md, table.csv, results.json, config.json, examples.png, psnr_curves.png)")


def cmd_train(args: argparse.Namespace) -> None:
    from d2gp import distributed
    from d2gp.apps import announce_training
    from d2gp.device import resolve_device
    from d2gp.training import train

    config = _train_config_from_args(args)
    config.validate()
    out = check_output_path(args.out or f"runs/{config.task}-{config.method}-seed{config.seed}", folder=True)
    device = resolve_device(args.device)  # under torchrun: this process's GPU, cuda:LOCAL_RANK
    with distributed.process_group(device):  # torchrun's processes (nothing in a single process)
        lead = distributed.rank() == 0
        if lead:
            announce_training(config, out, resuming=args.resume and (out / "checkpoint.pt").exists())
        summary = train(config, out, resume=args.resume, device=device, progress=lead, compile=args.compile,
                        cuda_graph=args.cuda_graph)
    if lead:
        print(f"best validation PSNR {summary['best_val_psnr']:.2f} dB; wrote {out}/ (best.pt, last.pt, log.csv, "
              f"config.json)")
        print(f"evaluate it with: d2gp evaluate {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from d2gp.apps import evaluate_runs, evaluation_dir

    check_output_path(args.out or evaluation_dir(args.runs), folder=True)
    result = evaluate_runs(args.runs, split=args.split, limit=args.limit, iterations=args.iterations, out=args.out,
                           batch_size=args.batch_size, device=args.device, safeguard=args.safeguard,
                           restart=args.restart, algorithm=args.algorithm)
    print(result["table"])
    print(f"wrote {result['out']}/ (table.md, table.csv, results.json, examples.png, psnr_curves.png)")


def cmd_demo(args: argparse.Namespace) -> None:
    from d2gp.apps import demo

    check_output_path(args.out, folder=True)
    result = demo(args.out, task=args.task, profile=args.profile, seed=args.seed, device=args.device,
                  limit=args.limit or None, restart=args.restart, algorithm=args.algorithm)
    print(result["table"])
    print(f"wrote {result['out']}/ (table.md, table.csv, results.json, examples.png, psnr_curves.png)")


def cmd_benchmark(args: argparse.Namespace) -> None:
    from d2gp.benchmark import benchmark

    check_output_path(args.out, folder=True)
    check_output_path(args.runs, folder=True, what="--runs")
    result = benchmark(args.tasks, args.methods, profile=args.profile, seeds=args.seeds, out=args.out, runs=args.runs,
                       iterations=args.iterations, device=args.device, restart=args.restart, early=args.early,
                       converge=args.converge, algorithm=args.algorithm, limit=args.limit)
    print(result["table"])
    print(f"wrote {result['out']}/ (table.md, table.csv, results.json; per task: examples.png, psnr_curves.png)")


def cmd_analyze(args: argparse.Namespace) -> None:
    from d2gp.analysis import analyze

    task = _task_from_args(args)
    out = check_output_path(args.out or f"results/analyze-{task.name}", folder=True)
    result = analyze(args.sources, task, out, at=args.at, images=args.images, split=args.split,
                     benchmark=args.benchmark, runs=args.runs, linear=args.linear, max_dense=args.max_dense,
                     jacobian_mode=args.jacobian, spectrum_mode=args.spectrum, sample=args.sample,
                     lanczos_steps=args.lanczos_steps, krylov_steps=args.krylov_steps, fd_probes=args.fd_probes,
                     convergence_images=args.convergence_images or None, horizon=args.horizon)
    if "table" in result:
        print("condition numbers on range(A_sᵀ) (teacher: on its own range):")
        print(result["table"])
    if "convergence" in result:
        print(result["convergence"]["table"])
        for skipped in result["convergence"]["skipped"]:
            print(f"skipped {skipped['label']}: {skipped['reason']}")
    print(f"wrote {out}/")


#: Files that train-denoiser writes beside its weights file OUT: they are never a valid --out.
_DENOISER_SIDE_FILES = {".json": "the metadata file", ".training": "the training checkpoint", ".lock": "the lock file"}


def cmd_train_denoiser(args: argparse.Namespace) -> None:
    from d2gp.denoisers import check_training_settings, save_denoiser, train_denoiser

    settings = dict(depth=args.depth, features=args.features, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    check_training_settings(**settings)
    task = _task_from_args(args)
    out = check_output_path(args.out, folder=False)
    if out.suffix in _DENOISER_SIDE_FILES:
        raise CheckpointError(f"--out {out}: a weights file cannot end in {out.suffix}, the suffix of "
                              f"{_DENOISER_SIDE_FILES[out.suffix]} written beside it; use e.g. {out.with_suffix('.pt')}")
    sidecar, checkpoint = out.with_suffix(".json"), out.with_name(out.name + ".training")
    with lock_path(out.with_name(out.name + ".lock"), f"--out {out}"):
        if checkpoint.exists() and not args.resume:
            raise CheckpointError(f"{checkpoint} exists from an earlier run: pass --resume to continue it, or delete it")
        if not checkpoint.exists():  # a new run: never overwrite a trained denoiser or another one's metadata
            for path, what in ((out, "a trained denoiser"), (sidecar, "the metadata of another weights file")):
                if path.exists():
                    raise CheckpointError(f"{path} exists ({what}): choose another --out, or delete it first")
        train, val = task.images("train"), task.images("val")
        print(f"training a DnCNN ({args.depth} layers, {args.features} features) for {task.name} on "
              f"{len(train)} images of {task.dataset!r}, σ ∈ [{args.sigma_min}, {args.sigma_max}], {args.epochs} epochs")
        model, history = train_denoiser(train, val, **settings, seed=args.seed, checkpoint_path=checkpoint,
                                        device=args.device)
        training = {"task": task.config.to_dict(), "cli": {k: v for k, v in vars(args).items() if k != "func"},
                    "environment": environment(), "history": history}
        save_denoiser(model, out, training)
        write_json(training, sidecar)
        checkpoint.unlink(missing_ok=True)
    print("validation PSNR per σ: " + ", ".join(f"σ={s}: {v:.2f} dB" for s, v in history["val_psnr"].items()))
    print(f"wrote {out} and {sidecar}")


# --- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from d2gp.apps import DEMO_TEST_IMAGES, PROFILES

    parser = _Parser(prog="d2gp", description=(
        "D2GP: learned nonlinear preconditioners for plug-and-play FISTA (single-pixel camera, MRI, "
        "super-resolution)."))
    parser.add_argument("--threads", type=_positive, default=None, help="PyTorch CPU threads (default: PyTorch's choice)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (from the current folder too; repeatable): a module that registers "
                             "tasks of your own (d2gp.tasks.own_task / register_task), so that every command knows them")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job: train D2GP and Supervised NPOs, evaluate, print the table")
    p.add_argument("--task", choices=list(TASKS), default="spc", help="task (default spc)")
    p.add_argument("--profile", choices=list(PROFILES), default="quick",
                   help="quick: the README's main job (7.9 min on 2 CPU cores, benchmarks/results/demo-spc/time.json); cpu: about an hour per "
                        "method on 2 cores; paper: for a GPU")
    p.add_argument("--seed", type=_non_negative, default=0)
    p.add_argument("--out", default="runs/demo",
                   help="output folder (default runs/demo): the runs in OUT/d2gp and OUT/supervised (finished ones "
                        "are reused), the evaluation in OUT/evaluation, as `d2gp evaluate` would write it")
    p.add_argument("--limit", type=_non_negative, default=DEMO_TEST_IMAGES,
                   help=f"test images to evaluate on (default {DEMO_TEST_IMAGES}; 0 = the whole test split)")
    _add_algorithm_argument(p, "fista", "fista: the paper's; both NPOs are trained in it and evaluated in it")
    _add_restart_argument(p, restart=None)
    _add_device_argument(p)
    p.set_defaults(func=cmd_demo)

    from d2gp.benchmark import BENCHMARK_PROFILES, CONVERGE, EARLY, METHODS

    p = sub.add_parser("benchmark", help="every preconditioner on every task: the paper's Table I, tuned on validation")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), metavar="TASK",
                   help=f"tasks (default all: {' '.join(TASKS)})")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                   help=f"methods (default all: {' '.join(METHODS)})")
    p.add_argument("--profile", choices=list(BENCHMARK_PROFILES), default="quick",
                   help="quick: the whole table on 3 tasks in about 40 minutes on 2 CPU cores; paper: larger, for a GPU")
    p.add_argument("--seeds", nargs="+", type=_non_negative, default=[0], help="training seeds of the learned methods")
    p.add_argument("--iterations", "-K", type=_positive, default=20, help="PnP-FISTA iterations K (evaluated to 5K)")
    p.add_argument("--early", nargs="*", type=_positive, default=list(EARLY), metavar="k",
                   help=f"iterations k < K whose PSNR is reported too (default {' '.join(map(str, EARLY))})")
    p.add_argument("--converge", type=_positive, default=CONVERGE,
                   help=f"the baseline runs this many iterations for the 'iterations to the baseline's best' column "
                        f"(default {CONVERGE})")
    p.add_argument("--limit", type=_positive, default=None,
                   help="test images per task (default: the profile's, e.g. 100 digits for spc-binary in quick)")
    p.add_argument("--out", default="results/benchmark", help="output folder")
    p.add_argument("--runs", default="runs/benchmark", help="training runs (RUNS/TASK/METHOD-seedS), reused when finished")
    _add_device_argument(p)
    _add_restart_argument(p, restart=False)
    _add_algorithm_argument(p, "fista", "fista: the paper's; the learned methods are trained in it, the others tuned in it")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("train", help="train an NPO preconditioner (D2GP or Supervised)")
    _add_task_arguments(p)
    _add_train_arguments(p)
    p.add_argument("--out", default=None, help="run directory (default runs/TASK-METHOD-seedSEED)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (same settings), or extend a finished one trained "
                        "with --schedule constant to more --updates")
    p.add_argument("--compile", action="store_true",
                   help="run the unrolled loss through torch.compile: on a GPU with CUDA graphs "
                        "(mode reduce-overhead), where an eager update is launch-bound; the first updates pay the "
                        "compilation (minutes), and each new batch shape (an epoch's last, smaller batch) compiles again; "
                        "on a CPU it measured slower than eager (d2gp train warns)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on a GPU, record the unrolled loss and its backward pass once as a CUDA graph and replay it: "
                        "the eager update without its launch overhead, and no compilation (one process; an epoch's "
                        "last, smaller batch runs eagerly)")
    _add_device_argument(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="compare trained NPOs with the baseline and the teacher on the test split")
    p.add_argument("runs", nargs="+", help="run directories of `d2gp train` (same task settings)")
    p.add_argument("--iterations", "-K", type=_positive, default=None, help="K (default: the runs' training K); runs to 2K")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--limit", type=_positive, default=None, help="use only the first N images")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--out", default=None,
                   help="output folder (default: evaluation/ in the deepest folder holding all the RUNs: "
                        "RUN/evaluation for one run, runs/evaluation for runs/a runs/b)")
    _add_device_argument(p)
    _add_safeguard_argument(p)
    _add_restart_argument(p, restart=None)
    _add_algorithm_argument(p, None, "the one the runs were trained in")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("tasks", help="list the tasks, their operators and default settings")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("datasets", help="list the datasets (embedded offline ones and loaders for your files)")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("reconstruct", help="PnP-FISTA with the student and the teacher operators on a split")
    _add_task_arguments(p)
    p.add_argument("--iterations", "-K", type=_positive, default=20, help="number of iterations K (default 20)")
    p.add_argument("--preconditioner", default="identity",
                   help="student preconditioner: identity (default), d2gp or supervised (the NPOs shipped for the "
                        "default tasks), a weights file or a `d2gp train` run directory")
    p.add_argument("--report", default=None,
                   help="comma-separated iterations at which to report PSNR/SSIM (default 1,2,5,10,20 up to K, and K)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="data split (default test)")
    p.add_argument("--limit", type=_positive, default=None, help="use only the first N images")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the measurement noise")
    p.add_argument("--examples", type=_positive, default=4, help="images in the PNG grid (default 4)")
    p.add_argument("--out", default=None, help="output folder (default results/reconstruct-TASK)")
    _add_device_argument(p)
    _add_safeguard_argument(p)
    _add_restart_argument(p, restart=False)
    _add_algorithm_argument(p, None, "the one --preconditioner was trained in; fista for identity")
    p.set_defaults(func=cmd_reconstruct)

    from d2gp.analysis import LINEAR_CHOICES

    p = sub.add_parser("analyze", help="exact Jacobians, conditioning and nonlinearity of preconditioners; "
                                       "convergence of a benchmark's methods")
    p.add_argument("sources", nargs="*", metavar="RUN|FILE|d2gp|supervised",
                   help="preconditioners to analyse: `d2gp train` run directories, weights files, or the shipped "
                        "d2gp / supervised NPOs")
    _add_task_arguments(p)
    p.add_argument("--at", default=None, help="comma-separated iterations k at which J_k is analysed "
                                              "(default 0, K/2, K−1 of the first preconditioner's training K)")
    p.add_argument("--images", type=int, default=1, help="test images whose trajectories give the gradients (default 1)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--benchmark", default=None, help="a `d2gp benchmark` --out folder: its tuned linear preconditioners, "
                                                     "and the convergence of all its methods (rerun, not retrained)")
    p.add_argument("--runs", default=None, help="the benchmark's training runs (RUNS/TASK/METHOD-seedS), if moved")
    p.add_argument("--linear", default="best", choices=list(LINEAR_CHOICES),
                   help="linear preconditioner to compare with (default best: the benchmark's best linear method)")
    p.add_argument("--max-dense", type=_non_negative, default=1024,
                   help="dense Jacobian when n ≤ this; dense spectrum when rank(A) ≤ this or AᵀA is badly conditioned")
    p.add_argument("--jacobian", default="auto", choices=["auto", "dense", "sampled"],
                   help="dense J (n passes, exact) or sampled exact rows/columns + Lanczos")
    p.add_argument("--spectrum", default="auto", choices=["auto", "dense", "krylov"],
                   help="dense S (rank(A) passes, exact) or Lanczos on SᵀS (a lower bound on κ)")
    p.add_argument("--sample", type=_positive, default=64, help="rows and columns sampled (--jacobian sampled)")
    p.add_argument("--lanczos-steps", type=_positive, default=30, help="Lanczos steps for J's extreme singular values")
    p.add_argument("--krylov-steps", type=_positive, default=40, help="Lanczos steps on SᵀS (--spectrum krylov)")
    p.add_argument("--fd-probes", type=_positive, default=4, help="random directions of the finite-difference check")
    p.add_argument("--convergence-images", type=_non_negative, default=8,
                   help="test images of the convergence curves (0: all the benchmark scored)")
    p.add_argument("--horizon", type=int, default=5, help="convergence to HORIZON·K iterations (default 5)")
    p.add_argument("--out", default=None, help="output folder (default results/analyze-TASK)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("train-denoiser", help="train the task's DnCNN denoiser (the PnP prior)")
    _add_task_arguments(p)
    p.add_argument("--depth", type=int, default=7, help="DnCNN layers (default 7)")
    p.add_argument("--features", type=int, default=32, help="DnCNN features per layer (default 32)")
    p.add_argument("--sigma-min", type=float, default=0.01, help="lowest training noise std (default 0.01)")
    p.add_argument("--sigma-max", type=float, default=0.2, help="highest training noise std (default 0.2)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="weights file to write, never overwritten (then load it with "
                                                "--denoiser PATH); its metadata goes to OUT with the suffix .json")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same --out")
    _add_device_argument(p)
    p.set_defaults(func=cmd_train_denoiser)
    return parser


def _import_modules(argv: list[str]) -> str | None:
    """Import the modules of every ``--import MODULE`` in ``argv`` (they register tasks of their own,
    :func:`d2gp.tasks.register_task`), before the parser lists the tasks; the error, if one fails."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    modules = pre.parse_known_args(argv)[0].imports
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `import MODULE` as from the current folder
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # the user's module: whatever it raised, one line
            first = (str(error).strip().splitlines() or [""])[0]
            return f"--import {module}: {type(error).__name__}: {first}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    failed = _import_modules(argv)
    if failed is not None:
        print(f"d2gp: error: {failed}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from d2gp.data import DataError
    from d2gp.denoisers import DenoiserError
    from d2gp.device import DeviceError
    from d2gp.training import TrainingError

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"d2gp {args.command}: warning: {message}", file=sys.stderr)

    try:
        if getattr(args, "device", None) is not None:  # an unknown or absent device: refused before any work
            from d2gp.device import resolve_device

            resolve_device(args.device)
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            args.func(args)
    except (TaskError, DataError, CheckpointError, TrainingError, DenoiserError, DeviceError) as error:
        print(f"d2gp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`d2gp tasks | head`): stop quietly, like any Unix tool
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:  # the file system: a full disk, a folder that vanished, permissions
        print(f"d2gp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"d2gp {args.command}: interrupted (training runs continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""What a training budget buys: validation PSNR at K against the number of updates.

For each task and method (D2GP, Supervised), one run of the task's ``--profile`` settings with
``--updates`` updates at a **constant** learning rate after a short warm-up (a cosine schedule
would tie every point of the curve to the run's total), validated at every power of two from 16
on (``TrainConfig.val_points``). The tuned student baseline (its step size tuned on the same
validation images, grid + golden-section search, by the plain-FISTA evaluation below) and the
teacher are horizontal lines; the update counts of the training profiles are marked on the axis,
so the figure says where each profile sits. Writes ``table.md/csv``, ``results.json`` and ``learning_curves.png``.

Then each run's best-on-validation NPO (``best.pt``) is scored on the test split at K, 2K and 5K
against the tuned baseline and the teacher (:func:`d2gp.apps.evaluate_runs`), in plain PnP-FISTA
(as Table I) and with adaptive restart (``d2gp evaluate``'s default): ``TASK/test-plain/`` and
``TASK/test-restart/``, summarised in ``test.md`` as gains over the tuned baseline.

    python benchmarks/learning_curves.py --tasks spc mri --updates 4096 --out benchmarks/results/learning_curves

Finished runs in ``--runs`` are reused; called again with more ``--updates``, the script extends
them (``d2gp train --resume``: a constant-rate run continued is the longer run, bit for bit), so a
curve grows without retraining its first updates.
"""

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from d2gp.apps import (HORIZONS, METHOD_LABELS, PROFILES, ensure_trained, evaluate_runs,  # noqa: E402
                       horizon_label, profile_settings)
from d2gp.evaluation import evaluate_solver  # noqa: E402
from d2gp.reports import gain_rows, markdown_table, write_results  # noqa: E402
from d2gp.tasks import make_task  # noqa: E402
from d2gp.training import TrainConfig  # noqa: E402

METHODS = METHOD_LABELS  # the methods with an NPO to train, and their names in tables


def profile_updates(profile: str, task: str) -> int:
    """How many updates ``profile`` gives the NPO of ``task`` (the full training split counted)."""
    config = TrainConfig(task=task, **profile_settings(profile, task))
    if config.updates:
        return config.updates
    images = config.train_images or len(make_task(task).images("train"))
    return config.epochs * math.ceil(images / config.batch_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["spc", "mri"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--profile", default="cpu", choices=list(PROFILES),
                        help="the training settings (batch, images, learning rate) the curve extends")
    parser.add_argument("--updates", nargs="+", default=["4096"],
                        help="updates of every run: N for all tasks, or TASK=N per task (spc=4096 mri=2048)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--val-images", nargs="+", default=None,
                        help="validation images: N or TASK=N per task (default: the profile's)")
    parser.add_argument("--test-images", type=int, default=200, help="test images of the K/2K/5K evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", default="runs/learning_curves")
    parser.add_argument("--out", default="benchmarks/results/learning_curves")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    updates_by_task = per_task(args.updates, args.tasks, "--updates")
    val_images_by_task = per_task(args.val_images or [], args.tasks, "--val-images")
    missing = [task for task, updates in updates_by_task.items() if updates is None]
    if missing:  # before any training, not after the first task's
        parser.error(f"--updates gives no value for {', '.join(missing)}")
    rows, results, test_rows = [], {}, []
    out = Path(args.out)
    fig, axes = plt.subplots(1, len(args.tasks), figsize=(5.2 * len(args.tasks), 3.8), squeeze=False)
    for ax, task_name in zip(axes[0], args.tasks):
        updates = updates_by_task[task_name]
        points = [2 ** i for i in range(4, int(math.log2(updates)) + 1)]
        settings = {**profile_settings(args.profile, task_name), "updates": updates, "schedule": "constant",
                    "warmup": args.warmup, "val_points": points, "val_every": updates,
                    **({"val_images": val_images_by_task[task_name]} if val_images_by_task[task_name] else {})}
        curves, run_dirs = {}, []
        for method in args.methods:
            config = TrainConfig(task=task_name, seed=args.seed, method=method, **settings)
            run_dir = ensure_trained(config, Path(args.runs) / task_name / f"{method}-seed{args.seed}", device=args.device)
            run_dirs.append(run_dir)
            log = _read_log(run_dir / "log.csv")
            curves[method] = {int(row["update"]): float(row["val_psnr"]) for row in log}
            summary = json.loads((run_dir / "summary.json").read_text())
            results.setdefault(task_name, {})[method] = {"run": str(run_dir), "val_psnr": curves[method],
                                                          "training_seconds": summary["training_seconds"],
                                                          "seconds_per_update": summary.get("seconds_per_update"),
                                                          # how it was trained (command, machine, date, threads)
                                                          "run_config": json.loads((run_dir / "config.json").read_text())}
        task = make_task(task_name, device=args.device)
        config = TrainConfig(task=task_name, **settings)
        val = task.images("val", limit=config.val_images)
        denoiser = task.denoiser()
        K = config.iterations
        for host, restart in (("plain", False), ("restart", True)):
            evaluation = evaluate_runs(run_dirs, limit=args.test_images, restart=restart, device=args.device,
                                       out=out / task_name / f"test-{host}", progress=False)
            results[task_name][f"test_{host}"] = evaluation["results"]
            test_rows += gain_rows(evaluation["results"], task_name, host)
        # The curve's baseline line: the plain evaluation tuned γ on these validation images at K.
        tuning_record = results[task_name]["test_plain"]["baseline_step_tuning"]
        tuned, tuning = tuning_record["chosen"], tuning_record["val_psnr_by_step"]
        baseline = tuning[f"{tuned:.6g}"]
        teacher = float(evaluate_solver("teacher", task.teacher, val, denoiser, task.teacher_step_size, K,
                                        progress=False).psnr[K].mean())
        results[task_name]["baseline"] = {"step_size": tuned, "val_psnr": baseline, "tuning": tuning}
        results[task_name]["teacher"] = {"val_psnr": teacher}
        results[task_name]["profiles"] = {p: profile_updates(p, task_name) for p in PROFILES}
        for update in sorted(set().union(*(c.keys() for c in curves.values()))):
            rows.append([task_name, update, *(f"{curves[m].get(update, math.nan):.2f}" for m in args.methods),
                         f"{baseline:.2f}", f"{teacher:.2f}"])
        for method, curve in curves.items():
            ax.plot(list(curve), list(curve.values()), marker="o", ms=3, label=METHODS[method])
        ax.axhline(baseline, color="k", ls="--", lw=1, label=f"baseline, tuned γ ({baseline:.2f})")
        ax.axhline(teacher, color="g", ls=":", lw=1, label=f"teacher ({teacher:.2f})")
        for profile, at in results[task_name]["profiles"].items():
            if at <= updates:
                ax.axvline(at, color="grey", lw=0.8, alpha=0.6)
                ax.annotate(profile, (at, ax.get_ylim()[0]), rotation=90, fontsize=7, va="bottom", ha="right")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("Adam updates")
        ax.set_ylabel(f"validation PSNR at K = {K} (dB)")
        ax.set_title(f"{task_name} ({args.profile} profile settings, constant lr)")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    header = ["task", "updates", *(f"{METHODS[m]} val PSNR (dB)" for m in args.methods), "baseline (tuned γ)", "teacher"]
    print(markdown_table(header, rows))
    write_results(out, header, rows, {"args": vars(args), "tasks": results})
    fig.savefig(out / "learning_curves.png", dpi=130)
    horizons = [horizon_label(h) for h in HORIZONS]
    test_header = ["task", "host", "method", *(f"PSNR {h} (dB)" for h in horizons), *(f"gain {h} (dB)" for h in horizons)]
    test_table = markdown_table(test_header, test_rows)
    print(test_table)
    (out / "test.md").write_text(f"Test split, best-on-validation NPOs against the tuned baseline "
                                 f"(gain = method − baseline, mean over images):\n\n{test_table}\n")


def per_task(values: list[str], tasks: list[str], option: str) -> dict[str, int | None]:
    """``["N"]`` (every task) or ``["TASK=N", ...]`` → ``{task: N or None}``; unknown tasks are an error."""
    if len(values) == 1 and "=" not in values[0]:
        return {task: _positive(values[0], option) for task in tasks}
    given = {}
    for item in values:
        task, sep, value = item.partition("=")
        if not sep or task not in tasks:
            raise SystemExit(f"{option}: {item!r} is not TASK=N for one of the tasks {', '.join(tasks)}")
        given[task] = _positive(value, option)
    return {task: given.get(task) for task in tasks}


def _positive(value: str, option: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"{option}: {value!r} is not a positive whole number (give N, or TASK=N per task)")
    return int(value)


def _read_log(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


if __name__ == "__main__":
    main()

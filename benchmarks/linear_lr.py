"""Learning rates of the learned linear preconditioners, chosen on the validation split.

Adam moves every parameter by about ``lr`` per step, so the learning rate that suits an NPO
(1e-3) barely moves a scalar step or a diagonal of ones in a short budget, and is far too large
for a dense n×n matrix, whose operator norm can change by about n·lr per step (n = 4096 on
64×64 MRI). This script trains each kind with each learning rate on the ``d2gp benchmark``
quick-profile budget of each task (seed 0) and tables the best validation PSNR at K, which is
how the defaults of :data:`d2gp.training.DEFAULT_LR` and the benchmark's per-task exceptions
(``d2gp.benchmark.TASK_LR``) were chosen. A later call adds its runs to the table in ``--out``.

    python benchmarks/linear_lr.py --tasks spc mri --out benchmarks/results/linear_lr
    python benchmarks/linear_lr.py --tasks sr --kinds full --lrs 1e-6 1e-5

The committed table was made with the quick budget of its day (SPC 128 images × 2 epochs, batch
16; MRI and SR 48 × 1, batch 8: ``train`` in its results.json), smaller than today's quick profile.
"""

import argparse
import json
import math
from pathlib import Path

import torch

from d2gp.apps import ensure_trained
from d2gp.benchmark import BENCHMARK_PROFILES
from d2gp.reports import environment, markdown_table, write_results
from d2gp.training import TrainConfig

GRID = {"scalar": (1e-3, 1e-2, 3e-2, 1e-1), "pointwise": (1e-3, 1e-2, 3e-2, 1e-1),
        "convolutional": (1e-3, 1e-2, 3e-2, 1e-1), "full": (1e-5, 1e-4, 1e-3)}


HEADER = ["task", "kind", "lr", "best val PSNR K (dB)", "final val PSNR K (dB)", "training (min)"]


def _row(run: dict) -> list:
    best = run["best_val_psnr"]
    return [run["task"], run["kind"], f"{run['lr']:g}", f"{best:.2f}" if math.isfinite(best) else "nan",
            f"{run['final_val_psnr']:.2f}", f"{run['training_seconds'] / 60:.1f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["spc", "mri"])
    parser.add_argument("--kinds", nargs="+", default=list(GRID), choices=list(GRID))
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="learning rates (default: GRID's)")
    parser.add_argument("--method", default="objective", choices=["objective", "supervised"])
    parser.add_argument("--profile", default="quick", choices=list(BENCHMARK_PROFILES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="runs/linear_lr")
    parser.add_argument("--out", default="benchmarks/results/linear_lr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for task in args.tasks:
        settings = BENCHMARK_PROFILES[args.profile]["train"][task]
        for kind in args.kinds:
            for lr in args.lrs or GRID[kind]:
                config = TrainConfig(task=task, seed=0, method=args.method, preconditioner=kind, lr=lr, **settings)
                run_dir = ensure_trained(config, Path(args.runs) / task / f"{kind}-{args.method}-lr{lr:g}")
                summary = json.loads((run_dir / "summary.json").read_text())
                log = (run_dir / "log.csv").read_text().splitlines()
                results.append({"task": task, "kind": kind, "lr": lr, **summary, "log": log})
                print(markdown_table(HEADER, [_row(results[-1])]))
    if Path(args.out, "results.json").is_file():  # add to the earlier runs' table (another task, other rates)
        fresh = {(r["task"], r["kind"], r["lr"]) for r in results}
        earlier = json.loads(Path(args.out, "results.json").read_text())
        results = [r for r in earlier["runs"] if (r["task"], r["kind"], r["lr"]) not in fresh] + results
        commands = earlier.get("commands", [earlier["environment"]]) + [environment()]
    else:
        commands = [environment()]
    rows = [_row(r) for r in results]
    write_results(args.out, HEADER, rows, {"method": args.method, "profile": args.profile, "commands": commands,
                                           "train": BENCHMARK_PROFILES[args.profile]["train"], "runs": results})
    print(markdown_table(HEADER, rows))


if __name__ == "__main__":
    main()

"""Stable past K? Every trained preconditioner of a task run to 10K, with and without the safeguard.

For each task, all the finished training runs found under ``--runs/TASK/`` (or given with
``--run-dirs``) are evaluated together with :func:`d2gp.apps.evaluate_runs` on the test split
at K, 2K, 5K and 10K iterations — each once as trained and once with the solver's safeguard
(ρ = ``--safeguard``: a step whose residual exceeds ρ × the best so far is rejected and that
image continues as plain PnP-FISTA). The tuned student baseline and the teacher are in the same
table. The summary checks the aim of issue 10 for every learned method:

* **holds**: PSNR at 2K and at 5K within 0.5 dB of its PSNR at K;
* **never far below**: PSNR at 10K at most 0.5 dB below the tuned baseline's PSNR at 10K.

Writes, per task, the full evaluation (``TASK/``: table, results.json, curves to 10K) and the
summary ``table.md/csv`` + ``results.json`` for all tasks.

    python benchmarks/stability.py --runs runs/cpu --tasks spc mri --out benchmarks/results/stability
"""

import argparse
import json
from pathlib import Path

import torch

from d2gp.apps import evaluate_runs
from d2gp.reports import markdown_table, write_results

TOLERANCE = 0.5  # dB, the aim of issue 10


def finished_runs(root: Path) -> list[Path]:
    """Run directories under ``root`` (one level) that finished training (they hold summary.json)."""
    return sorted(p for p in root.iterdir() if (p / "summary.json").is_file() and (p / "best.pt").is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["spc", "mri"])
    parser.add_argument("--runs", default="runs/cpu", help="a folder with one sub-folder of runs per task")
    parser.add_argument("--run-dirs", nargs="*", default=None, help="evaluate these runs instead (one task)")
    parser.add_argument("--safeguard", type=float, default=2.0)
    parser.add_argument("--horizons", nargs="+", type=int, default=[1, 2, 5, 10])
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results/stability")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, results = [], {}
    groups = {"given": [Path(d) for d in args.run_dirs]} if args.run_dirs else \
        {task: finished_runs(Path(args.runs) / task) for task in args.tasks}
    for name, run_dirs in groups.items():
        if not run_dirs:
            print(f"{name}: no finished runs, skipped")
            continue
        evaluation = evaluate_runs(run_dirs, limit=args.limit, out=Path(args.out) / name, device=args.device,
                                   safeguard=args.safeguard, horizons=args.horizons)
        res = evaluation["results"]
        K, horizons = res["iterations"], res["horizons"]
        methods = res["methods"]
        baseline = methods[0]["psnr"]
        results[name] = {"table": evaluation["table"], "methods": []}
        for m in methods[1:-1]:
            psnr = {k: m["psnr"][k][0] for k in horizons}
            holds = all(abs(psnr[k] - psnr[K]) <= TOLERANCE for k in horizons if K < k <= 5 * K)
            last = horizons[-1]
            floor = psnr[last] >= baseline[last][0] - TOLERANCE
            entry = {"label": m["label"], "psnr": psnr, "holds_to_5K": holds, "not_below_baseline_at_end": floor,
                     "gain_at_K": psnr[K] - baseline[K][0]}
            if m.get("still_preconditioned"):
                entry["still_preconditioned_at_end"] = m["still_preconditioned"][last]
            results[name]["methods"].append(entry)
            rows.append([res["task"], m["label"], *(f"{psnr[k]:.2f}" for k in horizons), f"{entry['gain_at_K']:+.2f}",
                         "yes" if holds else "no", "yes" if floor else "no",
                         f"{entry.get('still_preconditioned_at_end', 1.0):.0%}" if m.get("safeguard") else "—"])
        rows.append([res["task"], methods[0]["label"], *(f"{baseline[k][0]:.2f}" for k in horizons), "", "", "", ""])
        rows.append([res["task"], methods[-1]["label"], *(f"{methods[-1]['psnr'][k][0]:.2f}" for k in horizons),
                     "", "", "", ""])
    horizons_header = [f"PSNR k={k}" for k in horizons]
    header = ["task", "method", *horizons_header, "gain over baseline at K", f"within {TOLERANCE} dB to 5K",
              f"≥ baseline − {TOLERANCE} at {horizons[-1]}", "images still preconditioned at the end"]
    print(markdown_table(header, rows))
    write_results(Path(args.out), header, rows, {"args": vars(args), "tasks": results})


if __name__ == "__main__":
    main()

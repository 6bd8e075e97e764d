"""Stable past K? Every trained preconditioner of a task run to 10K: plain, safeguarded, restarted.

For each task, all the finished training runs found under ``--runs/TASK/`` (or given with
``--run-dirs``) are evaluated together with :func:`d2gp.apps.evaluate_runs` on the test split
at K, 2K, 5K and 10K iterations, twice:

* **plain** PnP-FISTA (the paper's solver), each learned preconditioner once as trained and once
  with the solver's safeguard (ρ = ``--safeguard``: a step whose residual exceeds ρ × the best
  so far is rejected and that image continues as plain PnP-FISTA);
* with **adaptive restart** (the default of ``d2gp evaluate``): FISTA's momentum is reset for an
  image whose step grew; the preconditioner stays on.

The tuned student baseline (γ tuned at K for each solver) and the teacher are in each table.
The summary checks the aim of issue 10 for every learned method:

* **holds**: PSNR at 2K and at 5K within 0.5 dB of its PSNR at K;
* **never far below**: PSNR at 10K at most 0.5 dB below the tuned baseline's PSNR at 10K.

Writes, per task, the full evaluation (``TASK/``: table, results.json, curves to 10K) and the
summary ``table.md/csv`` + ``results.json`` for all tasks.

    python benchmarks/stability.py --runs runs/cpu --tasks spc mri --out benchmarks/results/stability
"""

import argparse
from pathlib import Path

import torch

from d2gp.apps import evaluate_runs, horizon_label
from d2gp.reports import markdown_table, write_results
from d2gp.training import saved_train_config

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
    groups = {saved_train_config(args.run_dirs[0])["task"]: [Path(d) for d in args.run_dirs]} if args.run_dirs else \
        {task: finished_runs(Path(args.runs) / task) for task in args.tasks}
    for name, run_dirs in groups.items():
        if not run_dirs:
            print(f"{name}: no finished runs, skipped")
            continue
        for solver, restart in (("plain", False), ("restart", True)):
            evaluation = evaluate_runs(run_dirs, limit=args.limit, out=Path(args.out) / name / solver,
                                       device=args.device, safeguard=None if restart else args.safeguard,
                                       horizons=args.horizons, restart=restart)
            rows += summarize(evaluation["results"], solver, results.setdefault(name, {}))
    horizons = sorted(set(args.horizons) | {1})
    header = ["task", "solver", "method", *(f"PSNR {horizon_label(h)}" for h in horizons), "gain over baseline at K",
              f"within {TOLERANCE} dB to 5K", f"≥ baseline − {TOLERANCE} at {horizons[-1]}K",
              "images still preconditioned at the end"]
    print(markdown_table(header, rows))
    write_results(Path(args.out), header, rows, {"args": vars(args), "tasks": results})
    stability_figure(results, Path(args.out) / "stability.png")


def summarize(res: dict, solver: str, record: dict) -> list[list[str]]:
    """Rows of the summary table for one evaluation, and its record (aim checks) in ``record[solver]``."""
    K, horizons = res["iterations"], res["horizons"]
    methods = res["methods"]
    baseline = methods[0]["psnr"]
    record[solver] = {"K": K, "methods": []}
    rows = []
    for m in methods[1:-1]:
        psnr = {k: m["psnr"][k][0] for k in horizons}
        holds = all(abs(psnr[k] - psnr[K]) <= TOLERANCE for k in horizons if K < k <= 5 * K)
        last = horizons[-1]
        floor = psnr[last] >= baseline[last][0] - TOLERANCE
        entry = {"label": m["label"], "psnr": psnr, "holds_to_5K": holds, "not_below_baseline_at_end": floor,
                 "gain_at_K": psnr[K] - baseline[K][0]}
        if m.get("still_preconditioned"):
            entry["still_preconditioned_at_end"] = m["still_preconditioned"][last]
        record[solver]["methods"].append(entry)
        rows.append([res["task"], solver, m["label"], *(f"{psnr[k]:.2f}" for k in horizons),
                     f"{entry['gain_at_K']:+.2f}", "yes" if holds else "no", "yes" if floor else "no",
                     f"{entry.get('still_preconditioned_at_end', 1.0):.0%}" if m.get("safeguard") else "—"])
    for m in (methods[0], methods[-1]):
        record[solver][m["label"]] = {k: m["psnr"][k][0] for k in horizons}
        rows.append([res["task"], solver, m["label"], *(f"{m['psnr'][k][0]:.2f}" for k in horizons), "", "", "", ""])
    return rows


def stability_figure(results: dict, path: Path) -> None:
    """PSNR against k/K (log axis) per task and solver: every learned method and the tuned baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, solver) for task, by_solver in results.items() for solver in by_solver]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (task, solver) in zip(axes[0], panels):
        rec = results[task][solver]
        K = rec["K"]
        for m in rec["methods"]:
            ks = sorted(int(k) for k in m["psnr"])
            ax.plot([k / K for k in ks], [m["psnr"][k] for k in ks], marker="o", label=m["label"])
        if "student baseline" in rec:  # (the teacher, far above, is in the table)
            ks = sorted(int(k) for k in rec["student baseline"])
            ax.plot([k / K for k in ks], [rec["student baseline"][k] for k in ks], "k--", label="student baseline")
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 5, 10], ["K", "2K", "5K", "10K"])
        ax.set_ylim(bottom=max(ax.get_ylim()[0], min(rec.get("student baseline", {1: 10}).values()) - 6))
        ax.set_title(f"{task}, {'adaptive restart' if solver == 'restart' else 'plain PnP-FISTA'}")
        ax.set_ylabel("PSNR (dB), clipped below")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

if __name__ == "__main__":
    main()

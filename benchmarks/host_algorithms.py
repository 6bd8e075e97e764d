"""Which preconditioner helps which host algorithm (issue 15, item 2), on SPC and MRI.

For every task and every host (:data:`d2gp.solver.ALGORITHMS`: PnP-FISTA, PnP-PGD, PnP-HQS with
its data step made of ``HQS_INNER_STEPS`` preconditioned gradient steps), on the first ``--limit``
test images:

* the tuned baseline (P = I), the tuned Newton preconditioner and the tuned Chebyshev polynomial,
  each tuned *in that host* on ``--tune-images`` validation images at K
  (:func:`d2gp.tuning.tune_classical`: candidate and step γ);
* the shipped NPOs (``load_npo("d2gp", task)``, ``"supervised"``), **trained in PnP-FISTA**, run
  unchanged inside each host at the step they were trained with (the task's γ = 1/L);
* the teacher operator's plain run of the host (the upper bound).

Reported: PSNR at K, 2K and 5K (mean ± std over images), the gain over the host's tuned
baseline at K, the step γ; ``helps.md`` is the same gain as a method × host grid. Writes
``table.md``, ``table.csv``, ``results.json`` (with the command, machine and date, and every tuning
record) and ``helps.md`` per task folder and for all tasks in ``--out``.

    python benchmarks/host_algorithms.py --tasks spc mri --out benchmarks/results/host_algorithms

Cost: the tuning (about 100 runs of K iterations on the validation images per host, whatever
``--limit``) dominates. ``--tasks spc mri --limit 100 --threads 1`` took 71 min on one thread of a
2-core AMD EPYC shared with other runs (``benchmarks/results/host_algorithms/time.txt``). PnP-HQS
costs up to 3× per iteration (its inner steps apply the preconditioner and the operator 3 times).
"""

import argparse
import time
from pathlib import Path

import torch

from d2gp.apps import HORIZONS
from d2gp.benchmark import BENCHMARK_PROFILES, METHODS
from d2gp.evaluation import evaluate_solver, format_mean_std, mean_std
from d2gp.preconditioners.files import trained_algorithm, trained_step_size
from d2gp.reports import environment, markdown_table, write_results, write_table
from d2gp.solver import ALGORITHM_NAMES, ALGORITHMS, HQS_INNER_STEPS
from d2gp.tasks import make_task
from d2gp.training import load_npo
from d2gp.tuning import tune_classical

CLASSICAL = ("baseline", "newton", "poly-chebyshev")
SHIPPED = ("d2gp", "supervised")
LABELS = {**{name: METHODS[name].label for name in CLASSICAL},
          "d2gp": "D2GP NPO (shipped, trained in PnP-FISTA)", "supervised": "Supervised NPO (shipped, trained in PnP-FISTA)",
          "teacher": "Teacher (upper bound)"}


def host_rows(task, host: str, methods, val, test, denoiser, K: int, horizons, progress: bool) -> list[dict]:
    """Every method of ``methods`` run in ``host``: tuned (classical), as shipped (NPOs) or the teacher."""
    entries = []
    for name in methods:
        began = time.perf_counter()
        physics, trained_in, record = task.student, None, {}
        if name in CLASSICAL:
            P, step, record = tune_classical(name, task, val, denoiser, K, algorithm=host)
        elif name == "teacher":
            P, physics, step = None, task.teacher, task.teacher_step_size
        else:
            P, meta = load_npo(name, task)
            step, trained_in = trained_step_size(meta, task), trained_algorithm(meta)
        run = evaluate_solver(LABELS[name], physics, test, denoiser, step, horizons[-1], preconditioner=P,
                              progress=False, algorithm=host)
        entries.append({"method": name, "label": LABELS[name], "host": host, "step_size": step, "trained_in": trained_in,
                        "psnr": {k: mean_std(run.psnr[k]) for k in horizons},
                        "psnr_text": {k: format_mean_std(run.psnr[k]) for k in horizons},
                        "psnr_per_iteration": run.summary()["psnr_per_iteration"], "tuning": record,
                        "seconds": time.perf_counter() - began})
        if progress:
            print(f"  {task.name} {host} {name}: PSNR K={K} {entries[-1]['psnr_text'][K]} dB, γ = {step:.4g} "
                  f"({entries[-1]['seconds']:.0f} s)", flush=True)
    return entries


def tables(entries: list[dict], K: int, horizons, hosts, methods, with_task: bool):
    """The long table (one row per host and method) and the method × host grid of gains over the host's baseline."""
    baseline = {(e["task"], e["host"]): e["psnr"][K][0] for e in entries if e["method"] == "baseline"}
    header = [*(["task"] if with_task else []), "host", "method", *(f"PSNR {h}K={h * K} (dB)" if h > 1 else
                                                                      f"PSNR K={K} (dB)" for h in HORIZONS),
              "gain over the host's tuned baseline at K (dB)", "step γ"]
    rows, gains = [], {}
    for e in entries:
        gain = e["psnr"][K][0] - baseline[(e["task"], e["host"])] if (e["task"], e["host"]) in baseline else None
        gains[(e["task"], e["method"], e["host"])] = gain
        rows.append([*([e["task"]] if with_task else []), ALGORITHM_NAMES[e["host"]], e["label"],
                     *(e["psnr_text"][k] for k in horizons), "—" if gain is None else f"{gain:+.2f}",
                     f"{e['step_size']:.4g}"])
    tasks = list(dict.fromkeys(e["task"] for e in entries))
    grid_header = [*(["task"] if with_task else []), "method", *(ALGORITHM_NAMES[h] for h in hosts)]
    grid = [[*([t] if with_task else []), LABELS[m],
             *(f"{gains[(t, m, h)]:+.2f}" if gains.get((t, m, h)) is not None else "—" for h in hosts)]
            for t in tasks for m in methods if m != "baseline"]
    return header, rows, grid_header, grid


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["spc", "mri"], choices=["spc", "mri"])
    parser.add_argument("--hosts", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--methods", nargs="+", default=[*CLASSICAL, *SHIPPED, "teacher"],
                        choices=[*CLASSICAL, *SHIPPED, "teacher"])
    parser.add_argument("--iterations", "-K", type=int, default=20, help="K (the shipped NPOs were trained for 20)")
    parser.add_argument("--limit", type=int, default=None,
                        help="test images (default: the quick benchmark's, 200 on spc, all 60 on mri)")
    parser.add_argument("--tune-images", type=int, default=BENCHMARK_PROFILES["quick"]["tune_images"],
                        help="validation images the classical methods are tuned on (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/host_algorithms")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "baseline" not in args.methods:
        parser.error("the table's gains are over each host's tuned baseline: keep 'baseline' in --methods")
    K, out = args.iterations, Path(args.out)
    print(" | ".join(f"{k}: {v}" for k, v in environment().items()), flush=True)  # command, date, machine, versions
    horizons = [h * K for h in HORIZONS]
    everything = []
    for task_name in args.tasks:
        task = make_task(task_name, device="cpu")
        denoiser = task.denoiser()
        val = task.images("val", limit=args.tune_images)
        test = task.images("test", limit=args.limit or BENCHMARK_PROFILES["quick"]["test_images"].get(task_name))
        print(f"{task_name}: {len(test)} test images, tuning on {len(val)} validation images, K = {K}, "
              f"hosts {', '.join(args.hosts)} (hqs: {HQS_INNER_STEPS} inner steps)", flush=True)
        entries = [{**e, "task": task_name} for host in args.hosts
                   for e in host_rows(task, host, args.methods, val, test, denoiser, K, horizons, progress=True)]
        everything += entries
        header, rows, grid_header, grid = tables(entries, K, horizons, args.hosts, args.methods, with_task=False)
        config = {"task": task.config.to_dict(), "iterations": K, "horizons": horizons, "test_images": len(test),
                  "tune_images": len(val), "hosts": args.hosts, "hqs_inner_steps": HQS_INNER_STEPS}
        write_results(out / task_name, header, rows, {"config": config, "methods": entries}, device=task.device)
        write_table(grid_header, grid, out / task_name / "helps")
        print(f"\n{task_name}:\n{markdown_table(header, rows)}\n\ngain over each host's tuned baseline at K = {K} (dB):\n"
              f"{markdown_table(grid_header, grid)}\n", flush=True)
    header, rows, grid_header, grid = tables(everything, K, horizons, args.hosts, args.methods, with_task=True)
    write_results(out, header, rows, {"args": vars(args), "hqs_inner_steps": HQS_INNER_STEPS, "methods": everything})
    write_table(grid_header, grid, out / "helps")
    print(f"wrote {out}/ (table.md, table.csv, results.json, helps.md; per task the same)")


if __name__ == "__main__":
    main()

"""Iterations to a target PSNR, from a `d2gp benchmark` output: the speed-up a user buys.

Table I's own column counts the iterations to the tuned baseline's best. Where the baseline never
gets anywhere (the {0,1} single-pixel camera: its best is its first iterate), every method reaches
it at k = 1 and the column says nothing. This script reads a benchmark's ``TASK/results.json``
and counts, per method, the first iteration k ≥ 1 (within the 5K iterations every row ran) at which
its mean test PSNR comes within 0.1 dB of

* the tuned baseline's best (Table I's column), and
* the best non-learned preconditioner's best (the highest plateau among Newton and the
  polynomials within 5K): how fast each method gets where the best classical method gets.

Writes ``iterations.md``, ``iterations.csv`` and ``iterations.json`` beside the task's results.

    python benchmarks/iterations_to_reach.py benchmarks/results/benchmark_ill --task spc-binary
"""

import argparse
import json
from pathlib import Path

from d2gp.benchmark import CONVERGED_TOLERANCE_DB, iterations_to_reach
from d2gp.reports import write_table

CLASSICAL = ("newton", "poly-l2", "poly-chebyshev", "poly-ifista")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", help="a `d2gp benchmark` --out folder")
    parser.add_argument("--task", required=True)
    args = parser.parse_args()
    folder = Path(args.benchmark) / args.task
    record = json.loads((folder / "results.json").read_text())
    methods = {m["method"]: m for m in record["methods"]}
    K = record["config"]["iterations"]
    baseline_target = record["config"]["baseline_best_minus_tolerance"]
    classical = {name: max(methods[name]["psnr_per_iteration"][1:]) for name in CLASSICAL if name in methods}
    best_name = max(classical, key=classical.get)
    classical_target = classical[best_name] - CONVERGED_TOLERANCE_DB
    horizon = len(next(iter(methods.values()))["psnr_per_iteration"]) - 1

    def count(curve, target):
        reached = iterations_to_reach(curve, target)
        return str(reached) if reached is not None else f"> {horizon}"

    header = ["method", f"PSNR K={K} (dB)", f"iterations to the baseline's best − 0.1 dB ({baseline_target:.2f} dB)",
              f"iterations to {best_name}'s best − 0.1 dB ({classical_target:.2f} dB)"]
    rows, out = [], []
    for name, method in methods.items():
        curve = method["psnr_per_iteration"]
        rows.append([method["label"], f"{curve[K]:.2f}", count(curve, baseline_target), count(curve, classical_target)])
        out.append({"method": name, "to_baseline": iterations_to_reach(curve, baseline_target),
                    "to_best_classical": iterations_to_reach(curve, classical_target)})
    write_table(header, rows, folder / "iterations")
    (folder / "iterations.json").write_text(json.dumps(
        {"source": str(folder / "results.json"), "baseline_target": baseline_target, "best_classical": best_name,
         "best_classical_target": classical_target, "horizon": horizon, "methods": out}, indent=2))
    print((folder / "iterations.md").read_text())


if __name__ == "__main__":
    main()

"""Which 2D order of the Hadamard rows should the SPC task use? Chosen on the *validation* split.

For each ordering, the student (10 %) and teacher (50 %) PnP-FISTA baselines with the shipped
denoiser, K = 20, and the linear estimate Aᵀy (k = 0), mean ± std over the validation images.

    python benchmarks/spc_ordering.py --out benchmarks/results/spc_ordering
"""

import argparse
import torch

from d2gp.evaluation import evaluate_solver, format_mean_std, mean_std
from d2gp.reports import markdown_table, write_results
from d2gp.tasks import make_task
from d2gp.tasks.spc import ORDERINGS


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--limit", type=int, default=None, help="validation images (default all)")
    parser.add_argument("--out", default="benchmarks/results/spc_ordering")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, results = [], []
    for ordering in ORDERINGS:
        task = make_task("spc", ordering=ordering)
        images = task.images("val", limit=args.limit)
        denoiser = task.denoiser()
        entry = {"ordering": ordering}
        for role in ("student", "teacher"):
            run = evaluate_solver(role, getattr(task, role), images, denoiser, getattr(task, f"{role}_step_size"),
                                  args.iterations, progress=False)
            entry[role] = {"A^T y": mean_std(run.psnr[0]), f"K={args.iterations}": mean_std(run.psnr[args.iterations])}
            entry[f"{role}_cells"] = (format_mean_std(run.psnr[0]), format_mean_std(run.psnr[args.iterations]))
        rows.append([ordering, *entry.pop("student_cells"), *entry.pop("teacher_cells")])
        results.append(entry)
        print(rows[-1], flush=True)
    header = ["ordering", "student Aᵀy", f"student K={args.iterations}", "teacher Aᵀy", f"teacher K={args.iterations}"]
    print(markdown_table(header, rows))
    best = max(results, key=lambda r: r["student"][f"K={args.iterations}"][0])["ordering"]
    print(f"best student ordering on validation: {best}")
    write_results(args.out, header, rows, {"args": vars(args), "split": "val", "best": best, "results": results})


if __name__ == "__main__":
    main()

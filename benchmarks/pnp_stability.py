"""Is PnP-FISTA stable past K = 20 with the shipped denoisers? PSNR to K = 100 on the validation split.

For each task and each denoiser scale c (the PnP prior c·D(x), ``denoiser_scale``), the
student and teacher baselines (identity preconditioner, γ = 1/‖AᵀA‖): mean PSNR at
k = 0, 10, 20, 50, 100. The task defaults are chosen from this table (validation data only).

    python benchmarks/pnp_stability.py --tasks spc mri sr --out benchmarks/results/pnp_stability
    python benchmarks/pnp_stability.py --tasks mri --set mask_sigma=0.2 --out /tmp/mri-wide-mask
"""

import argparse
import json

import torch

from d2gp.evaluation import evaluate_solver
from d2gp.reports import markdown_table, write_results
from d2gp.tasks import make_task

KS = (0, 10, 20, 50, 100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["spc", "mri", "sr"])
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.99, 0.97, 0.95])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="task settings (JSON values)")
    parser.add_argument("--limit", type=int, default=48, help="validation images per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/pnp_stability")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    rows, results = [], []
    for name in args.tasks:
        for scale in args.scales:
            task = make_task(name, denoiser_scale=scale, **settings)
            images = task.images("val", limit=args.limit)
            denoiser = task.denoiser()
            for role in ("student", "teacher"):
                run = evaluate_solver(role, getattr(task, role), images, denoiser, getattr(task, f"{role}_step_size"),
                                      max(KS), progress=False)
                values = [float(run.psnr[k].mean()) for k in KS]
                rows.append([name, scale, role, *(f"{v:.2f}" for v in values)])
                results.append({"task": name, "scale": scale, "role": role, "psnr": dict(zip(KS, values)),
                                "settings": task.config.to_dict()})
                print(rows[-1], flush=True)
    header = ["task", "c", "role", *(f"k={k}" for k in KS)]
    print(markdown_table(header, rows))
    write_results(args.out, header, rows, {"args": vars(args), "split": "val", "results": results})


if __name__ == "__main__":
    main()

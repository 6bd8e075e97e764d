"""Quality benchmark: D2GP vs Supervised vs the student baseline vs the teacher, over training seeds.

For each task and seed, trains a D2GP and a Supervised NPO with the same settings
(``d2gp.apps.PROFILES[profile]`` plus the overrides below), then evaluates both with
``d2gp.apps.evaluate_runs`` on the test split: PSNR at K and at 2K. Each cell of the table is
the mean ± std over seeds of the per-seed mean test PSNR (the baseline's step is tuned on the
validation split; baseline and teacher do not depend on the training seed).
Training runs live in ``--runs`` (resumable; finished runs are reused).

    python benchmarks/quality.py --tasks spc --seeds 0 1 2 --out benchmarks/results/quality
"""

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from d2gp.apps import PROFILES, ensure_trained, evaluate_runs, profile_settings
from d2gp.evaluation import format_mean_std as cell
from d2gp.reports import markdown_table, write_results
from d2gp.training import TrainConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["spc", "mri", "sr"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--profile", default="quick", choices=list(PROFILES))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig overrides, JSON values (e.g. lambda_imitation=100 npo='{\"use_iterate\": true}')")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="runs/quality")
    parser.add_argument("--out", default="benchmarks/results/quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}

    rows, results = [], {}
    for task in args.tasks:
        per_method: dict[str, dict[str, list]] = {}
        for seed in args.seeds:
            base = TrainConfig(task=task, seed=seed, **{**profile_settings(args.profile, task), **overrides})
            run_dirs = [ensure_trained(replace(base, method=method), Path(args.runs) / task / f"{method}-seed{seed}")
                        for method in ("d2gp", "supervised")]
            seed_out = Path(args.out) / task / f"seed{seed}"  # per-seed table, curves, examples, logs, configs
            evaluation = evaluate_runs(run_dirs, out=seed_out)
            for run_dir in run_dirs:
                method = run_dir.name.split("-seed")[0]
                shutil.copyfile(run_dir / "log.csv", seed_out / f"log-{method}.csv")
                shutil.copyfile(run_dir / "config.json", seed_out / f"config-{method}.json")
            K = evaluation["results"]["iterations"]
            for method in evaluation["results"]["methods"]:
                entry = per_method.setdefault(method["label"], {"K": [], "2K": []})
                entry["K"].append(method["psnr"][K][0])
                entry["2K"].append(method["psnr"][2 * K][0])
        results[task] = per_method
        for label, values in per_method.items():
            rows.append([task, label, cell(values["K"]), cell(values["2K"]), len(values["K"])])
        print(markdown_table(["task", "method", "PSNR at K", "PSNR at 2K", "seeds"], rows), flush=True)
    header = ["task", "method", "PSNR at K (dB)", "PSNR at 2K (dB)", "seeds"]
    write_results(args.out, header, rows, {"args": vars(args), "profile": {t: profile_settings(args.profile, t) for t in args.tasks},
                                           "overrides": overrides, "results": results})


if __name__ == "__main__":
    main()

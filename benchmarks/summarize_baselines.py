"""Collect benchmarks/results/reconstruct-<task>/results.json into one table (the README's).

    python benchmarks/summarize_baselines.py
"""

import json
from pathlib import Path

from d2gp.reports import markdown_table, write_table

RESULTS = Path(__file__).parent / "results"


def cell(run, k):
    mean, std = run["psnr"][str(k)]
    return f"{mean:.2f} ± {std:.2f}"


def main():
    rows = []
    for task in ("spc", "mri", "sr"):
        path = RESULTS / f"reconstruct-{task}" / "results.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        config = json.loads((path.parent / "config.json").read_text())
        runs = {run["label"]: run for run in results["runs"]}
        student, teacher = runs["student"], runs["teacher"]
        rows.append([task, results["dataset"], results["images"],
                     cell(student, 0), cell(student, 20), cell(student, 100),
                     cell(teacher, 20), cell(teacher, 100),
                     f"{teacher['psnr']['20'][0] - student['psnr']['20'][0]:.2f}",
                     config["environment"]["date"][:10]])
    header = ["task", "data", "test images", "student Aᵀy (k=0)", "student K=20", "student K=100",
              "teacher K=20", "teacher K=100", "gap at K=20 (dB)", "date"]
    print(markdown_table(header, rows))
    write_table(header, rows, RESULTS / "baselines")


if __name__ == "__main__":
    main()

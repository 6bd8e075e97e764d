"""Our `d2gp benchmark` table next to the paper's Table I (../shared/MISSION.md), PSNR at K in dB.

Reads ``DIR/results.json`` written by ``d2gp benchmark`` and writes ``DIR/vs_paper.md`` and
``.csv``: one row per method of ours (mean ± std over test images, pooled over seeds), with the
paper's number for the row it corresponds to. The paper gives one polynomial row and one row per
learned linear kind without saying which coefficients or loss: its number stands beside each of
our variants. It has no teacher row.

    python benchmarks/vs_paper.py benchmarks/results/benchmark_quick
"""

import argparse
import json
from pathlib import Path

from d2gp.checkpoints import write_json
from d2gp.reports import environment, markdown_table, write_table

#: The paper's Table I: PSNR (dB) on SPC, MRI, SR (its data, its pretrained DnCNN, K = 20).
PAPER = {"baseline": (22.36, 25.77, 11.14), "newton": (22.94, 28.16, 11.75), "poly": (22.01, 28.07, 11.81),
         "scalar": (23.36, 27.88, 11.62), "convolutional": (21.30, 28.63, 17.55), "pointwise": (21.28, 27.59, 11.19),
         "full": (26.19, 28.15, 22.02), "supervised": (33.79, 28.87, 25.26), "d2gp": (34.55, 29.39, 25.88)}
TASKS = ("spc", "mri", "sr")


def paper_row(method: str) -> str | None:
    """The paper's row for one of our methods (``poly-l2`` → ``poly``, ``scalar-objective`` → ``scalar``)."""
    for key in (method, method.split("-")[0]):
        if key in PAPER:
            return key
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a `d2gp benchmark` output folder")
    args = parser.parse_args()
    folder = Path(args.dir)
    results = json.loads((folder / "results.json").read_text())
    tasks = [t for t in TASKS if t in results["tasks"]]
    K = next(iter(results["tasks"].values()))["config"]["iterations"]
    labels, ours = {}, {}
    for task in tasks:
        for m in results["tasks"][task]["methods"]:
            labels[m["method"]] = m["label"]
            mean, std = m["psnr"][str(K)]
            ours[task, m["method"]] = f"{mean:.2f} ± {std:.2f}"
    header = ["method"] + [f"{t.upper()} {who}" for t in tasks for who in ("ours", "paper")]
    rows = []
    for method, label in labels.items():
        key = paper_row(method)
        rows.append([label] + [cell for t in tasks for cell in
                               (ours.get((t, method), "—"), f"{PAPER[key][TASKS.index(t)]:.2f}" if key else "—")])
    write_table(header, rows, folder / "vs_paper")
    write_json({"environment": environment(), "source": str(folder / "results.json"), "iterations": K, "paper": PAPER},
               folder / "vs_paper.json")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()

"""One table of gains over the tuned baseline at K / 2K / 5K from several ``d2gp evaluate`` folders
(their ``results.json``), e.g. the three tasks of ``benchmarks/cpu_profile.sh``::

    python benchmarks/summarize_gains.py benchmarks/results/cpu_profile/{spc,mri,sr} \\
        --out benchmarks/results/cpu_profile/gains.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from d2gp.apps import horizon_label
from d2gp.checkpoints import CheckpointError, atomic_write_text, read_json
from d2gp.reports import gain_rows, markdown_table


def gains_table(folders: list[Path]) -> str:
    """The Markdown table: per folder (task, host), one row per method with its PSNR and gain at each horizon."""
    rows, multiples = [], None  # the horizons as multiples of K (1, 2, 5): one header for every folder
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise SystemExit(f"{path}: not found (is {folder} a `d2gp evaluate` output folder?)")
        try:
            results = read_json(path, "evaluation results")
        except CheckpointError as error:  # corrupt, or not a JSON object
            raise SystemExit(str(error)) from None
        ks = results["horizons"]
        these = [k // ks[0] for k in ks]
        if multiples not in (None, these):
            raise SystemExit(f"{path}: horizons {ks} are not the multiples {multiples} of K of the folders before it")
        multiples = these
        host = f"{results['algorithm']}{', restart' if results.get('restart') else ''}"
        rows += gain_rows(results, results["task"], f"{host}, {results['images']} {results['split']} images")
    labels = [horizon_label(m) for m in multiples]
    header = ["task", "host, images", "method", *(f"PSNR {h} (dB)" for h in labels), *(f"gain {h} (dB)" for h in labels)]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="`d2gp evaluate` output folders")
    parser.add_argument("--out", type=Path, help="write the table here too (Markdown)")
    args = parser.parse_args()
    table = gains_table(args.folders)
    print(table)
    if args.out:
        atomic_write_text("Gains over the tuned baseline (method − baseline, mean over the images):\n\n"
                          f"{table}\n", args.out)


if __name__ == "__main__":
    main()

"""The README's main job, timed: wall-clock time and peak memory of ``d2gp demo`` from scratch.

Runs ``d2gp demo`` (the quick profile on SPC unless told otherwise) in a child process into a
fresh output folder, measures its wall-clock time and its peak resident memory (the largest of
the process and its children, ``getrusage``), and commits what the demo printed beside them:
``time.json`` (seconds, peak GB, command, machine, date, load average before the start),
``table.md/csv``, ``results.json``, the figures and both training logs.

    python benchmarks/main_job.py --out benchmarks/results/demo-spc

The README quotes the time and memory from here, and only from here.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from d2gp.reports import environment

KEEP = ["table.md", "table.csv", "results.json", "examples.png", "psnr_curves.png"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/demo-spc")
    parser.add_argument("demo_args", nargs=argparse.REMAINDER, help="extra arguments for d2gp demo (after --)")
    args = parser.parse_args()
    extra = [a for a in args.demo_args if a != "--"]
    d2gp = shutil.which("d2gp") or str(Path(sys.executable).with_name("d2gp"))
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="d2gp-main-job-") as scratch:
        command = [d2gp, "demo", "--out", scratch, *extra]
        load = os.getloadavg()
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB on Linux
        out.mkdir(parents=True, exist_ok=True)
        evaluation = Path(scratch) / "evaluation"
        for name in KEEP:
            if (evaluation / name).is_file():
                shutil.copy(evaluation / name, out / name)
        for method in ("d2gp", "supervised"):
            if (Path(scratch) / method / "log.csv").is_file():
                shutil.copy(Path(scratch) / method / "log.csv", out / f"log-{method}.csv")
            if (Path(scratch) / method / "config.json").is_file():
                shutil.copy(Path(scratch) / method / "config.json", out / f"config-{method}.json")
    record = {"seconds": round(seconds, 1), "minutes": round(seconds / 60, 2), "peak_memory_gb": round(peak_kb / 1e6, 2),
              "demo_command": " ".join(["d2gp", "demo", *extra]), "load_average_before": load,
              "environment": environment()}
    (out / "time.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"d2gp demo {' '.join(extra)}: {seconds / 60:.1f} min, peak memory {peak_kb / 1e6:.2f} GB → {out / 'time.json'}")


if __name__ == "__main__":
    main()

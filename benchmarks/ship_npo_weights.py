"""Ship trained NPOs in the package: ``d2gp reconstruct --preconditioner d2gp|supervised``.

Copies ``RUNS/TASK/METHOD-seedSEED/best.pt`` (the NPO with the best validation PSNR of a
``benchmarks/quality.py`` run) to ``src/d2gp/weights/npo_TASK_METHOD.pt`` and writes
``npo_TASK_METHOD.json`` beside it: the run's configuration, its training log and where it
came from. Refuses a run whose task settings are not the task's defaults (the shipped weights
must fit ``make_task(TASK)``).

    python benchmarks/ship_npo_weights.py --runs runs/quality --seed 0
"""

import argparse
import json
import shutil
from pathlib import Path

from d2gp.checkpoints import atomic_write_text
from d2gp.tasks import make_task
from d2gp.training import load_npo, shipped_npo_path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=["spc", "mri", "sr"])
    parser.add_argument("--methods", nargs="+", default=["d2gp", "supervised"])
    args = parser.parse_args()
    for task_name in args.tasks:
        task = make_task(task_name)
        for method in args.methods:
            run_dir = Path(args.runs) / task_name / f"{method}-seed{args.seed}"
            config = json.loads((run_dir / "config.json").read_text())
            if config["task"] != task.config.to_dict():
                raise SystemExit(f"{run_dir} was not trained on the default {task_name} task: not shipping it")
            _, meta = load_npo(run_dir / "best.pt", task)  # refuses foreign or corrupt files
            target = shipped_npo_path(task_name, method)
            shutil.copyfile(run_dir / "best.pt", target)
            sidecar = {"source": str(run_dir), "val_psnr": meta.get("val_psnr"), "epoch": meta.get("epoch"),
                       "config": config, "log": (run_dir / "log.csv").read_text(),
                       "summary": json.loads((run_dir / "summary.json").read_text())}
            atomic_write_text(json.dumps(sidecar, indent=2) + "\n", target.with_suffix(".json"))
            print(f"{target}: {method} NPO for {task_name} from {run_dir} (val PSNR {meta.get('val_psnr'):.2f} dB)")


if __name__ == "__main__":
    main()

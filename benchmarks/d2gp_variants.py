"""What makes distillation pay off: D2GP training variants, compared on the validation split.

Each variant is the quick-profile D2GP run of ``--task`` (seed ``--seed``) with a few
:class:`~d2gp.training.TrainConfig` fields changed: the NPO's inputs (the iterate too), where
the teacher gradient is taken (at the student's iterates or along the teacher's trajectory),
the loss weights and the NPO architecture (the paper-like 7×7 / GELU / 4× expansion blocks
against our 3×3 / ReLU / 2× default). All variants are evaluated together with
``d2gp.apps.evaluate_runs`` on the **validation** split (never the test split: this is where
choices are made), PSNR at K and at 2K, plus the training time.

The ``d2gp`` and ``supervised`` reference runs are the seed's runs of ``benchmarks/quality.py``
(same directory layout, reused when finished).

    python benchmarks/d2gp_variants.py --task spc --variants use-iterate teacher-trajectory \
        --out benchmarks/results/d2gp_variants_spc
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from d2gp.apps import ensure_trained, evaluate_runs, profile_settings
from d2gp.reports import markdown_table, write_results
from d2gp.training import TrainConfig

#: name → TrainConfig changes from the quick-profile D2GP run.
VARIANTS = {
    "d2gp": {},
    "supervised": {"method": "supervised"},
    "use-iterate": {"npo": {"use_iterate": True}},
    "teacher-trajectory": {"teacher_gradient": "teacher"},
    "gradient-only": {"lambda_imitation": 0.0, "lambda_supervised": 0.0},
    "no-gradient": {"lambda_gradient": 0.0},
    "heavy-gradient": {"lambda_gradient": 10.0},
    "paper-blocks": {"npo": {"kernel_size": 7, "activation": "gelu", "expansion": 4}},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="spc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--limit", type=int, default=200, help="validation images to evaluate on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="runs", help="runs/quality/TASK holds the references, runs/variants/TASK the rest")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(dict.fromkeys(["d2gp", "supervised", *args.variants]))

    base = TrainConfig(task=args.task, seed=args.seed, **profile_settings("quick", args.task))
    run_dirs = []
    for name in names:
        config = replace(base, **VARIANTS[name])
        if name in ("d2gp", "supervised"):
            run_dir = Path(args.runs) / "quality" / args.task / f"{name}-seed{args.seed}"
        else:
            run_dir = Path(args.runs) / "variants" / args.task / f"{name}-seed{args.seed}"
        run_dirs.append(ensure_trained(config, run_dir))
    out = Path(args.out or f"benchmarks/results/d2gp_variants_{args.task}")
    evaluation = evaluate_runs(run_dirs, split="val", limit=args.limit, out=out / "evaluation")
    results = evaluation["results"]
    K = results["iterations"]
    methods = results["methods"]  # baseline, then one per run directory in order, then the teacher
    rows = []
    for name, run_dir, m in zip(names, run_dirs, methods[1:-1]):
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append([name, json.dumps(VARIANTS[name]), f"{m['psnr'][K][0]:.2f}", f"{m['psnr'][2 * K][0]:.2f}",
                     f"{summary['seconds_per_epoch'] * summary['epochs'] / 60:.1f}"])
    for m in (methods[0], methods[-1]):
        rows.append([m["label"], "", f"{m['psnr'][K][0]:.2f}", f"{m['psnr'][2 * K][0]:.2f}", ""])
    header = ["variant", "changes", f"val PSNR K={K} (dB)", f"val PSNR 2K={2 * K} (dB)", "training (min)"]
    print(markdown_table(header, rows))
    write_results(out, header, rows, {"args": vars(args), "base": base.to_json_dict(),
                                      "variants": {n: VARIANTS[n] for n in names}, "evaluation": results})


if __name__ == "__main__":
    main()

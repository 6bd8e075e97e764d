"""What makes distillation pay off: training variants, compared on the validation split.

Each variant is the ``--profile`` D2GP run of ``--task`` (seed ``--seed``, plus the ``--set``
overrides) with a few :class:`~d2gp.training.TrainConfig` fields changed: the NPO's inputs (the
iterate too), where the teacher gradient is taken (at the student's iterates or along the
teacher's trajectory), the loss weights, the NPO architecture (the paper-like 7×7 / GELU / 4×
expansion blocks against our 3×3 / ReLU / 2× default), and how many final iterates the loss
rewards (``tail``: x_K only, or the last 10 or 20 — does the method then hold past K?), and a
truncated unroll (does the cheaper CPU step cost PSNR?). All
variants are evaluated together with ``d2gp.apps.evaluate_runs`` on the **validation** split
(never the test split: this is where choices are made), PSNR at K and at the ``--horizons``
multiples of K, optionally also with the solver's ``--safeguard``, plus the training time.

    python benchmarks/d2gp_variants.py --task spc --variants use-iterate teacher-trajectory \
        --out benchmarks/results/d2gp_variants_spc
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from d2gp.apps import PROFILES, ensure_trained, evaluate_runs, profile_settings
from d2gp.reports import markdown_table, write_results
from d2gp.training import TrainConfig

#: name → TrainConfig changes from the base D2GP run.
VARIANTS = {
    "d2gp": {},
    "supervised": {"method": "supervised"},
    "use-iterate": {"npo": {"use_iterate": True}},
    "teacher-trajectory": {"teacher_gradient": "teacher"},
    "gradient-only": {"lambda_imitation": 0.0, "lambda_supervised": 0.0},
    "no-gradient": {"lambda_gradient": 0.0},
    "heavy-gradient": {"lambda_gradient": 10.0},
    "paper-blocks": {"npo": {"kernel_size": 7, "activation": "gelu", "expansion": 4}},
    "tail-1": {"tail": 1},
    "tail-10": {"tail": 10},
    "tail-20": {"tail": 20},
    "supervised-tail-1": {"method": "supervised", "tail": 1},
    "supervised-tail-10": {"method": "supervised", "tail": 10},
    "supervised-tail-20": {"method": "supervised", "tail": 20},
    # backpropagate through the last 5 of the K iterations only (a cheaper CPU step: 4x at batch 32,
    # benchmarks/results/training_speed/u-net-default/; the loss then rewards those 5 iterates, not 10)
    "truncated-5": {"unroll": "truncated", "truncate": 5},
    "truncated-3": {"unroll": "truncated", "truncate": 3},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="spc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default="quick", choices=list(PROFILES))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig overrides of the base run, JSON values (e.g. updates=400 schedule='\"cosine\"')")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--references", nargs="*", default=["d2gp", "supervised"], choices=list(VARIANTS),
                        help="variants always included (default: the base D2GP and Supervised runs)")
    parser.add_argument("--horizons", nargs="+", type=int, default=[1, 2, 5],
                        help="multiples of K at which PSNR is reported (default 1 2 5)")
    parser.add_argument("--safeguard", type=float, default=None, help="also evaluate each run with this safeguard ρ")
    parser.add_argument("--limit", type=int, default=200, help="validation images to evaluate on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", default="runs", help="runs/quality/TASK holds the references of the quick profile, "
                                                       "runs/variants/TASK the rest")
    parser.add_argument("--out", default=None)
    parser.add_argument("--train-only", action="store_true",
                        help="train (or resume) the runs and stop: several such calls can share the cores, "
                             "and a final call without it evaluates them all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(dict.fromkeys([*args.references, *args.variants]))
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}

    base = TrainConfig(task=args.task, seed=args.seed, **{**profile_settings(args.profile, args.task), **overrides})
    reference_layout = args.profile == "quick" and not overrides
    run_dirs = []
    for name in names:
        config = replace(base, **VARIANTS[name])
        if name in ("d2gp", "supervised") and reference_layout:
            run_dir = Path(args.runs) / "quality" / args.task / f"{name}-seed{args.seed}"
        else:
            run_dir = Path(args.runs) / "variants" / args.task / f"{name}-seed{args.seed}"
        run_dirs.append(ensure_trained(config, run_dir, device=args.device))
    if args.train_only:
        return
    out = Path(args.out or f"benchmarks/results/d2gp_variants_{args.task}")
    evaluation = evaluate_runs(run_dirs, split="val", limit=args.limit, out=out / "evaluation", device=args.device,
                               safeguard=args.safeguard, horizons=args.horizons)
    results = evaluation["results"]
    horizons = results["horizons"]
    methods = results["methods"]  # baseline, then per run directory one (or two, with the safeguard), then the teacher
    per_run = 2 if args.safeguard is not None else 1
    rows = []
    for i, (name, run_dir) in enumerate(zip(names, run_dirs)):
        summary = json.loads((run_dir / "summary.json").read_text())
        for m in methods[1 + per_run * i: 1 + per_run * (i + 1)]:
            label = name if m["safeguard"] is None else f"{name}, safeguard ρ={m['safeguard']:g}"
            rows.append([label, json.dumps(VARIANTS[name]), *(f"{m['psnr'][k][0]:.2f}" for k in horizons),
                         f"{summary['training_seconds'] / 60:.1f}", summary["updates"]])
    for m in (methods[0], methods[-1]):
        rows.append([m["label"], "", *(f"{m['psnr'][k][0]:.2f}" for k in horizons), "", ""])
    header = ["variant", "changes", *(f"val PSNR k={k} (dB)" for k in horizons), "training (min)", "updates"]
    print(markdown_table(header, rows))
    write_results(out, header, rows, {"args": vars(args), "base": base.to_json_dict(),
                                      "variants": {n: VARIANTS[n] for n in names}, "evaluation": results})


if __name__ == "__main__":
    main()

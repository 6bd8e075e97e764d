"""Does distillation teach anything? The loss ablation of D2GP (issue 11, item 4).

The same NPO, trained on the same task with the same budget and seeds, under every subset of the
three loss terms — L_g (1 − cos between P∇f_s and the teacher's gradient), L_i (imitation of the
teacher's output), L_s (supervised, against the ground truth) — and, for the runs with L_g, with
the teacher's gradient taken at the student's iterate (``student``, the default) or along the
teacher's own trajectory (``teacher``). By default on the ill-conditioned {0,1} single-pixel
camera, refining the tuned Newton preconditioner (``--base newton``; ``--base none``: from the
identity).

For every trained NPO, on the first ``--limit`` test images with plain PnP-FISTA: PSNR at K, 2K,
5K; the untrained start (the tuned base, or plain FISTA at γ = 1/L) and the teacher beside them.
And what of the teacher's gradient the student can predict: the mean over k < K of
cos(P g_k, ∇f_t(z_k)) against cos(g_k, ∇f_t(z_k)), and the gradient loss's first and last logged
values during training (from ``log.csv``; runs without L_g do not compute it).

Writes ``table.md``, ``table.csv``, ``results.json`` (with every run's configuration) and
``ablation.png`` to ``--out``.

    python benchmarks/loss_ablation.py --task spc-binary --base newton --seeds 0 --out benchmarks/results/loss_ablation
"""

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from d2gp.analysis import teacher_alignment  # noqa: E402
from d2gp.apps import HORIZONS, add_budget_arguments, ensure_trained  # noqa: E402
from d2gp.evaluation import evaluate_solver, mean_std  # noqa: E402
from d2gp.reports import write_results  # noqa: E402
from d2gp.solver import pnp_fista  # noqa: E402
from d2gp.tasks import make_task  # noqa: E402
from d2gp.tasks.base import measure  # noqa: E402
from d2gp.training import TrainConfig, load_npo, saved_train_config, untrained_start  # noqa: E402

#: The loss terms of each variant (g: gradient, i: imitation, s: supervised) and where the teacher's
#: gradient is taken.
VARIANTS = {
    "g": ("g", "student"), "i": ("i", "student"), "s": ("s", "student"),
    "g+i": ("gi", "student"), "g+s": ("gs", "student"), "i+s": ("is", "student"), "g+i+s": ("gis", "student"),
    "g (teacher's trajectory)": ("g", "teacher"), "g+i+s (teacher's trajectory)": ("gis", "teacher"),
}
WEIGHTS = {"g": ("lambda_gradient", 1.0), "i": ("lambda_imitation", 300.0), "s": ("lambda_supervised", 300.0)}


def variant_config(terms: str, teacher_gradient: str, args, seed: int) -> TrainConfig:
    weights = {field: (value if key in terms else 0.0) for key, (field, value) in WEIGHTS.items()}
    return TrainConfig(task=args.task, task_settings=dict(args.task_settings), method="d2gp", base=None if args.base == "none" else args.base, seed=seed,
                       teacher_gradient=teacher_gradient, updates=args.updates, batch_size=args.batch_size,
                       train_images=args.train_images, val_images=args.val_images, val_every=args.val_every,
                       warmup=args.warmup, iterations=args.iterations, npo=dict(args.npo), **weights)


def logged_gradient_loss(run_dir: Path) -> tuple[float | None, float | None]:
    rows = list(csv.DictReader((run_dir / "log.csv").open()))
    values = [float(r["gradient"]) for r in rows if r.get("gradient") not in (None, "")]
    return (values[0], values[-1]) if values else (None, None)


def mean_alignment(task, P, images, denoiser, step, K) -> tuple[float, float]:
    y_s, y_t = measure(task.student, images, seed=0), measure(task.teacher, images, seed=0)
    with torch.no_grad():
        _, trace = pnp_fista(task.student, y_s, denoiser, step, K, P, trace=True)
    records = teacher_alignment(task, trace, y_t)
    return (sum(r["cos_preconditioned_teacher"] for r in records) / len(records),
            sum(r["cos_gradient_teacher"] for r in records) / len(records))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="spc-binary")
    parser.add_argument("--base", default="newton", help="the classical preconditioner refined, or none")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_budget_arguments(parser)
    parser.add_argument("--limit", type=int, default=100, help="test images")
    parser.add_argument("--alignment-images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="runs/loss_ablation")
    parser.add_argument("--out", default="benchmarks/results/loss_ablation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = make_task(args.task, device="cpu", **args.task_settings)
    denoiser = task.denoiser()
    K = args.iterations
    horizons = [h * K for h in HORIZONS]
    test = task.images("test", limit=args.limit)
    probe = test[: args.alignment_images]
    entries = []
    for name in args.variants:
        terms, where = VARIANTS[name]
        for seed in args.seeds:
            config = variant_config(terms, where, args, seed)
            slug = name.replace(" (teacher's trajectory)", "-teacher").replace("+", "")
            run_dir = ensure_trained(config, Path(args.runs) / args.task / f"{slug}-seed{seed}", device="cpu")
            P, _ = load_npo(run_dir / "best.pt", task)
            run = evaluate_solver(name, task.student, test, denoiser, task.student_step_size, horizons[-1],
                                  preconditioner=P, progress=False)
            first, last = logged_gradient_loss(run_dir)
            entries.append({"variant": name, "seed": seed, "run_dir": str(run_dir), "train": saved_train_config(run_dir),
                            "psnr": {k: float(run.psnr[k].mean()) for k in horizons},
                            "cos": mean_alignment(task, P, probe, denoiser, task.student_step_size, K),
                            "gradient_loss": [first, last]})
    # The untrained start (the tuned base, or the identity at 1/L) and the teacher.
    start = untrained_start(variant_config("s", "student", args, args.seeds[0]), task, entries[0]["run_dir"])
    rows_ref = []
    for label, physics, step, P in ((f"start: {args.base} (untrained)", task.student, task.student_step_size, start),
                                    ("teacher (upper bound)", task.teacher, task.teacher_step_size, None)):
        run = evaluate_solver(label, physics, test, denoiser, step, horizons[-1], preconditioner=P, progress=False)
        cos = mean_alignment(task, P, probe, denoiser, step, K) if physics is task.student else (None, None)
        rows_ref.append({"variant": label, "psnr": {k: float(run.psnr[k].mean()) for k in horizons}, "cos": cos})

    header = ["loss terms", "seeds", *(f"PSNR {h}K={h * K} (dB)" for h in HORIZONS), "gain over the start at K (dB)",
              "cos(P g, ∇f_t)", "cos(g, ∇f_t)", "L_g first → last logged"]
    start_psnr = rows_ref[0]["psnr"][K]
    rows, summary = [], []
    for name in args.variants:
        mine = [e for e in entries if e["variant"] == name]
        psnr = {k: mean_std([e["psnr"][k] for e in mine]) for k in horizons}
        cos_p = sum(e["cos"][0] for e in mine) / len(mine)
        cos_g = sum(e["cos"][1] for e in mine) / len(mine)
        losses = [e["gradient_loss"] for e in mine if e["gradient_loss"][0] is not None]
        logged = (f"{sum(l[0] for l in losses) / len(losses):.3f} → {sum(l[1] for l in losses) / len(losses):.3f}"
                  if losses else "—")
        rows.append([name, len(mine), *(f"{psnr[k][0]:.2f} ± {psnr[k][1]:.2f}" for k in horizons),
                     f"{psnr[K][0] - start_psnr:+.2f}", f"{cos_p:.3f}", f"{cos_g:.3f}", logged])
        summary.append({"variant": name, "psnr": psnr, "gain_at_K": psnr[K][0] - start_psnr, "cos_preconditioned": cos_p,
                        "cos_gradient": cos_g})
    for ref in rows_ref:
        rows.append([ref["variant"], "—", *(f"{ref['psnr'][k]:.2f}" for k in horizons), "—",
                     *(f"{c:.3f}" if c is not None else "—" for c in ref["cos"]), "—"])
    out = Path(args.out)
    write_results(out, header, rows, {"args": vars(args), "runs": entries, "references": rows_ref, "summary": summary},
                  device=task.device)
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [s["variant"] for s in summary]
    ax.bar(range(len(names)), [s["psnr"][K][0] for s in summary], yerr=[s["psnr"][K][1] for s in summary], capsize=3)
    ax.axhline(start_psnr, color="k", ls="--", label=rows_ref[0]["variant"])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    low = min([start_psnr, *(s["psnr"][K][0] for s in summary)])
    ax.set_ylim(low - 0.5, max(s["psnr"][K][0] for s in summary) + 0.5)
    ax.set_ylabel(f"test PSNR at K = {K} (dB)")
    ax.set_title(f"{args.task}: D2GP loss ablation ({'on ' + args.base if args.base != 'none' else 'from the identity'}, "
                 f"{args.updates} updates, {len(args.seeds)} seed(s))")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()

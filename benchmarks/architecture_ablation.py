"""Which network can learn a preconditioner? The architecture ablation of the NPO (issue 11, item 3).

The default NPO is local (five 3×3 depthwise ConvNeXt blocks see about 15 pixels), while the
ill-conditioning of a {0,1} single-pixel camera lives in the image mean and Newton on MRI is a
Fourier multiplier: global operations. Every architecture here starts as the identity (its output
layers are zero) and is trained with the same method, loss, budget and seeds:

* ``convnext``: the default NPO;
* ``+global``: with the global-pooling path (mean of the last features → linear → constant);
* ``+fourier``: with a learned per-iteration Fourier multiplier on the image's frequency grid;
* ``unet``: the same blocks on a U-Net-shaped trunk over 3 resolutions (receptive field ×4);
* ``unet+global+fourier``: all three.

On a refined route (``--base newton``) each network learns the correction on top of the tuned
Newton preconditioner; from the identity (``--base none``) it must learn the whole preconditioner.
For every trained network, on the first ``--limit`` test images with plain PnP-FISTA: PSNR at K,
2K, 5K (mean ± std over seeds), its parameter count and its training seconds per update; the
untrained start and the teacher beside them.

Writes ``table.md``, ``table.csv``, ``results.json`` (with every run's configuration) and
``architectures.png`` (PSNR at K against parameters) to ``--out``.

    python benchmarks/architecture_ablation.py --task spc-binary --base newton --seeds 0 --out benchmarks/results/architecture_ablation/spc-binary-newton
"""

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from d2gp.apps import HORIZONS, add_budget_arguments, ensure_trained  # noqa: E402
from d2gp.evaluation import evaluate_solver, mean_std  # noqa: E402
from d2gp.reports import write_results  # noqa: E402
from d2gp.tasks import make_task  # noqa: E402
from d2gp.training import TrainConfig, build_preconditioner, load_npo, saved_train_config, tune_base, untrained_start  # noqa: E402


def architectures(image_size: int) -> dict[str, dict]:
    """The NPO settings of each architecture (the Fourier multiplier on the task's frequency grid)."""
    fourier = {"spectral_size": image_size}
    return {"convnext": {}, "+global": {"global_path": True}, "+fourier": fourier, "unet": {"levels": 3},
            "unet+global+fourier": {"levels": 3, "global_path": True, **fourier}}


def route(base: str) -> str:
    return f"on {base}" if base != "none" else "from the identity"


def plot(summary: list[dict], references: list[dict], K: int, title: str, path: Path) -> None:
    """PSNR at K (left) and at 5K (right) against the learned parameters, the references as lines."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, horizon in zip(axes, (K, HORIZONS[-1] * K)):
        key = str(horizon) if str(horizon) in summary[0]["psnr"] else horizon
        floor = min(ref["psnr"][key] for ref in references) - 12  # a collapse shows at the floor, with its value
        for i, s in enumerate(summary):
            mean, std = s["psnr"][key]
            if mean < floor:
                ax.plot(s["parameters"], floor + 0.5, "v", color=f"C{i}", label=s["architecture"])
                ax.annotate(f"{mean:.1f}", (s["parameters"], floor + 0.5), textcoords="offset points", xytext=(6, -3),
                            fontsize=7, color=f"C{i}")
            else:
                ax.errorbar(s["parameters"], mean, yerr=std, fmt="o", capsize=3, color=f"C{i}", label=s["architecture"])
        for j, ref in enumerate(references):
            ax.axhline(ref["psnr"][key], color="k", ls=("--", ":", "-.")[j % 3], lw=1, label=ref["architecture"])
        ax.set_ylim(bottom=max(ax.get_ylim()[0], floor))
        ax.set_xscale("log")
        ax.set_xlabel("learned parameters")
        ax.set_ylabel(f"test PSNR at k = {horizon} (dB)")
        ax.set_title(f"k = {horizon}" + (" (= K, as trained)" if horizon == K else " (past K)"), fontsize=9)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seconds_per_update(run_dir: Path) -> float:
    rows = list(csv.DictReader((run_dir / "log.csv").open()))
    return sum(float(r["seconds"]) for r in rows) / max(1, int(rows[-1]["update"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="spc-binary")
    parser.add_argument("--base", default="newton", help="the classical preconditioner refined, or none")
    parser.add_argument("--method", default="d2gp", choices=["d2gp", "supervised"])
    parser.add_argument("--architectures", nargs="+", default=None, help="names (default: all)")
    add_budget_arguments(parser)
    parser.add_argument("--compare", default="newton",
                        help="from the identity (--base none), also evaluate this tuned classical preconditioner "
                             "(what a global path could learn), or none")
    parser.add_argument("--limit", type=int, default=100, help="test images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="runs/architecture_ablation")
    parser.add_argument("--out", default="benchmarks/results/architecture_ablation")
    parser.add_argument("--replot", action="store_true", help="only redraw architectures.png from --out's results.json")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        was = argparse.Namespace(**saved["args"])
        plot(saved["summary"], saved["references"], was.iterations,
             f"{was.task}: NPO architectures ({was.method}, {route(was.base)}, {was.updates} updates, "
             f"{len(was.seeds)} seed(s))", Path(args.out) / "architectures.png")
        return
    torch.set_num_threads(args.threads)

    task = make_task(args.task, device="cpu", **args.task_settings)
    denoiser = task.denoiser()
    K = args.iterations
    horizons = [h * K for h in HORIZONS]
    test = task.images("test", limit=args.limit)
    choices = architectures(task.image_shape[-1])
    names = args.architectures or list(choices)
    unknown = sorted(set(names) - set(choices))
    if unknown:
        parser.error(f"unknown architectures {unknown}; choose from {list(choices)}")

    def config(name: str, seed: int) -> TrainConfig:
        return TrainConfig(task=args.task, task_settings=dict(args.task_settings), method=args.method,
                           base=None if args.base == "none" else args.base, seed=seed, updates=args.updates,
                           batch_size=args.batch_size, train_images=args.train_images, val_images=args.val_images,
                           val_every=args.val_every, warmup=args.warmup, iterations=K,
                           npo={**args.npo, **choices[name]})

    entries = []
    for name in names:
        for seed in args.seeds:
            run_dir = ensure_trained(config(name, seed), Path(args.runs) / f"{args.task}-{args.base}" / f"{name}-seed{seed}",
                                     device="cpu")
            P, _ = load_npo(run_dir / "best.pt", task)
            learned = getattr(P, "learned", P)
            run = evaluate_solver(name, task.student, test, denoiser, task.student_step_size, horizons[-1],
                                  preconditioner=P, progress=False)
            entries.append({"architecture": name, "seed": seed, "run_dir": str(run_dir), "train": saved_train_config(run_dir),
                            "parameters": learned.num_parameters(), "seconds_per_update": seconds_per_update(run_dir),
                            "psnr": {k: float(run.psnr[k].mean()) for k in horizons}})
    # The untrained start (the tuned base, or the identity at 1/L) and the teacher.
    start = untrained_start(config(names[0], args.seeds[0]), task, entries[0]["run_dir"])
    others = [(f"start: {args.base} (untrained)", task.student, task.student_step_size, start)]
    if args.base == "none" and args.compare != "none":
        classical = dataclasses.replace(config(names[0], args.seeds[0]), base=args.compare)
        validation = task.images("val", limit=args.val_images)
        others.append((f"tuned {args.compare} (classical)", task.student, task.student_step_size,
                       build_preconditioner(classical, task, tune_base(classical, task, denoiser, validation)).eval()))
    references = []
    for label, physics, step, P in (*others, ("teacher (upper bound)", task.teacher, task.teacher_step_size, None)):
        run = evaluate_solver(label, physics, test, denoiser, step, horizons[-1], preconditioner=P, progress=False)
        references.append({"architecture": label, "psnr": {k: float(run.psnr[k].mean()) for k in horizons}})

    start_psnr = references[0]["psnr"][K]
    header = ["architecture", "NPO settings", "parameters", "s / update", "seeds",
              *(f"PSNR {h}K={h * K} (dB)" for h in HORIZONS), "gain over the start at K (dB)"]
    rows, summary = [], []
    for name in names:
        mine = [e for e in entries if e["architecture"] == name]
        psnr = {k: mean_std([e["psnr"][k] for e in mine]) for k in horizons}
        seconds = sum(e["seconds_per_update"] for e in mine) / len(mine)
        rows.append([name, json.dumps(choices[name]), mine[0]["parameters"], f"{seconds:.2f}", len(mine),
                     *(f"{psnr[k][0]:.2f} ± {psnr[k][1]:.2f}" for k in horizons), f"{psnr[K][0] - start_psnr:+.2f}"])
        summary.append({"architecture": name, "settings": choices[name], "parameters": mine[0]["parameters"],
                        "seconds_per_update": seconds, "psnr": psnr, "gain_at_K": psnr[K][0] - start_psnr})
    for ref in references:
        rows.append([ref["architecture"], "—", "—", "—", "—", *(f"{ref['psnr'][k]:.2f}" for k in horizons), "—"])
    out = Path(args.out)
    write_results(out, header, rows, {"args": vars(args), "runs": entries, "references": references, "summary": summary},
                  device=task.device)

    plot(summary, references, K, f"{args.task}: NPO architectures ({args.method}, {route(args.base)}, "
         f"{args.updates} updates, {len(args.seeds)} seed(s))", out / "architectures.png")
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()

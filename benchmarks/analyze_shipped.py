"""`d2gp analyze` on the shipped D2GP and Supervised NPOs of every task, with the quick benchmark's
tuned linear preconditioners and the convergence of its methods to 5K (the paper's Figs. 3 and 4).

    python benchmarks/analyze_shipped.py                      # all three tasks, ~15 min at 1 thread
    python benchmarks/analyze_shipped.py --tasks spc --out /tmp/analyze

Rerun it whenever better NPOs ship (``src/d2gp/weights/npo_TASK_{d2gp,supervised}.pt``): it reads
nothing else but the benchmark folder's tuning records and retrains nothing. Writes, under ``--out``:

* ``table.md``/``.csv``/``results.json``: condition numbers on range(A_sᵀ), per task and analysed
  iteration k, of the student A_sᵀA_s, the teacher A_tᵀA_t (on its own range), the benchmark's best
  linear preconditioner P·A_sᵀA_s and the two NPOs' J_k·A_sᵀA_s (symmetrised; see ``d2gp.analysis``);
* ``jacobian.md``/``.csv``: what each NPO's J_k is (κ, distance to I, best scaled identity, symmetry,
  diagonal share, agreement with finite differences);
* ``alignment.md``/``.csv``: how each NPO moves the student's gradient toward the teacher's (mean over
  k of the cosines with the teacher's gradient, share of P(g) outside range(A_sᵀ));
* ``convergence.md``/``.csv``: PSNR at K, 2K and 5K of every method rerun from the benchmark;
* ``TASK/``: the whole ``d2gp analyze`` output (``spectra.png``, ``convergence.png``, per NPO
  ``jacobian.png`` and ``nonlinearity.png``, JSON and Markdown summaries).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from d2gp.analysis import analyze
from d2gp.reports import write_results, write_table
from d2gp.tasks import make_task

#: J_k at the first, middle and last trained iteration (K = 20) of one test image's trajectory;
#: convergence on the first 4 test images to 5K = 100 iterations. Sized for ~15 min on 2 CPU cores.
SETTINGS = dict(at=[0, 10, 19], images=1, convergence_images=4, horizon=5)
SOURCES = ("d2gp", "supervised")


def _mean(values):
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["spc", "mri", "sr"])
    parser.add_argument("--benchmark", default="benchmarks/results/benchmark_quick",
                        help="the `d2gp benchmark` output whose tuned preconditioners and methods are used")
    parser.add_argument("--out", default="benchmarks/results/analyze")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    rows, jacobian_rows, alignment_rows, convergence_rows, per_task = [], [], [], [], {}
    began, cpu_began = time.perf_counter(), time.process_time()
    for name in args.tasks:
        task = make_task(name)
        started = time.perf_counter()
        result = analyze(list(SOURCES), task, out / name, benchmark=args.benchmark, **SETTINGS)
        sources = result["sources"]
        linear = result.get("linear")
        for k in SETTINGS["at"]:
            row = [name, k, f"{result['spectra']['student']['condition']:.4g}",
                   f"{result['spectra']['teacher']['condition']:.4g}"]
            if linear:
                spectrum = linear["spectrum"].get(k, next(iter(linear["spectrum"].values())))
                row.append(f"{spectrum['condition']:.4g} ({linear['method']})")
            else:
                row.append("—")
            row += [f"{sources[s]['per_k'][k]['spectrum']['condition']:.4g}" for s in SOURCES]
            rows.append(row)
            for s in SOURCES:
                J = sources[s]["per_k"][k]["jacobian"]
                jacobian_rows.append([name, sources[s]["label"], k, f"{J['condition']:.3g}",
                                      f"{J['distance_to_identity']:.3g}", f"{J['best_scale']:.3g}",
                                      f"{J['distance_to_scaled_identity']:.3g}", f"{J['asymmetry']:.3g}",
                                      f"{J['symmetric_min']:.3g}", f"{J['diagonal_energy']:.3g}",
                                      f"{sources[s]['per_k'][k]['fd']['median']:.1e}"])
        alignment = {}
        for s in SOURCES:
            trajectory = sources[s]["alignment"]
            alignment[s] = {"cos_gradient_teacher": _mean([a["cos_gradient_teacher"] for a in trajectory]),
                            "cos_preconditioned_teacher": _mean([a["cos_preconditioned_teacher"] for a in trajectory]),
                            "outside_range": _mean([a["outside_range"] for a in trajectory])}
            alignment_rows.append([name, sources[s]["label"], f"{alignment[s]['cos_gradient_teacher']:.4f}",
                                   f"{alignment[s]['cos_preconditioned_teacher']:.4f}",
                                   f"{alignment[s]['outside_range']:.2e}"])
        curves = json.loads((out / name / "convergence.json").read_text())
        K = curves["iterations"]
        for label, curve in curves["curves"].items():
            convergence_rows.append([name, label, *[f"{curve['psnr'][k]:.2f}" for k in (K, 2 * K, curves["horizon"])]])
        per_task[name] = {"rank": result["rank"], "jacobian_method": result["jacobian_method"],
                          "spectrum_method": result["spectrum_method"], "linear": linear and linear["label"],
                          "alignment_mean_over_k": alignment, "seconds": time.perf_counter() - started,
                          "convergence_skipped": [s["method"] for s in result["convergence"]["skipped"]],
                          "convergence_images": result["convergence"]["images"]}

    header = ["task", "k", "student A_sᵀA_s", "teacher A_tᵀA_t", "best linear P·A_sᵀA_s (method)",
              "D2GP J_k·A_sᵀA_s", "Supervised J_k·A_sᵀA_s"]
    write_results(out, header, rows, {"settings": SETTINGS, "benchmark": args.benchmark, "tasks": per_task,
                                      "seconds": time.perf_counter() - began,
                                      "cpu_seconds": time.process_time() - cpu_began})
    write_table(["task", "NPO", "k", "κ(J_k)", "‖J_k − I‖_F/√n", "c* (best c·I)", "‖J − c*I‖/‖J‖", "asymmetry",
                 "λ_min((J+Jᵀ)/2)", "diagonal share of ‖J‖²", "FD vs autograd"], jacobian_rows, out / "jacobian")
    write_table(["task", "NPO", "cos(g_k, ∇f_t(z_k))", "cos(P(g_k), ∇f_t(z_k))", "share of ‖P(g_k)‖² outside range(A_sᵀ)"],
                alignment_rows, out / "alignment")
    horizon = SETTINGS["horizon"]
    write_table(["task", "method", "PSNR K (dB)", "PSNR 2K (dB)", f"PSNR {horizon}K (dB)"], convergence_rows,
                out / "convergence")
    for table in ("table", "jacobian", "alignment", "convergence"):
        print((out / f"{table}.md").read_text())
    print(f"wrote {out}/ in {(time.perf_counter() - began) / 60:.1f} min ({(time.process_time() - cpu_began) / 60:.1f} "
          f"CPU min)")


if __name__ == "__main__":
    main()

"""Seconds per training update and peak memory: today's step against the old ones, in one run.

One update = measure a batch with the student, the teacher's targets, the student's PnP-FISTA
with the NPO unrolled over K iterations, the D2GP loss, backward, Adam step — exactly
``d2gp.training._loss`` as ``d2gp train`` runs it. Each configuration runs in its own process
(so that its peak resident memory is its own), on the SPC task (K = 20, 32×32), by default with
a batch of 32.

* ``naive``: the paper's 20-layer 64-feature DnCNN, a 7×7/GELU/expansion-4 ConvNeXt NPO in
  NCHW, the teacher re-run every update, full backpropagation;
* ``before``: the default step as it was before this benchmark's last change — the shipped
  7×32 DnCNN and the 3×3/ReLU/×2 NPO, but both in NCHW (the NPO's ``channels_last`` flag then
  converted only its one-channel input, which left every convolution NCHW), the ConvNeXt
  blocks unfused (LayerNorm, Linear, ReLU, Linear, layer scale) and the teacher re-run every
  update;
* ``default``: today's step — :data:`d2gp.training.DEFAULT_NPO` (the U-Net-shaped trunk,
  ``levels=3``: blocks 2–4 at half and quarter resolution, since the architecture ablation),
  channels-last weights, fused blocks, the teacher's targets computed once per image
  (:class:`~d2gp.training.TeacherTargets`; that one-off cost, per image, is reported apart), in
  the precision ``d2gp train`` picks on this machine (:func:`d2gp.device.use_bf16`: bfloat16
  autocast on CPUs with AMX, float32 elsewhere; the table's precision column says which);
* ``default, float32``: the default step in float32 whatever the CPU (the default before
  bfloat16 became the choice on AMX CPUs; the same as ``default`` elsewhere);
* variants of the default: ``supervised`` (no teacher at all), per-iteration checkpointing,
  truncated backpropagation (last 5), bfloat16 autocast forced on, the plain trunk (all
  blocks at full resolution: the default NPO before the architecture ablation, and the shipped
  NPOs' trunk), and the float32 default through ``torch.compile`` (``d2gp train --compile``;
  its compilation, cold — inductor's cache in a new folder —, is in the first update's time).
  ``naive`` and ``before`` are float32.

Each configuration's floating-point work per update is counted
(``torch.utils.flop_counter.FlopCounterMode``: the convolutions and matrix products, forward
and backward), and divided by its time gives the rate the machine sustained.

Other CPUs from this one: oneDNN (the convolutions) and ATen (the elementwise kernels) take caps on
the instructions they use, which the child processes inherit and ``results.json`` records
(``environment.isa_caps``) — e.g. a CPU without AMX (AVX-512 with bf16 instructions, like AMD's
Zen 4) or an AVX2-only one (AMD's Zen 2/3, most laptops)::

    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/training_speed.py ...
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/training_speed.py ...

(the instructions only: the clock, caches and memory stay this machine's).

It also times the no-grad inference of the preconditioned student at K = 20 (images/s) and
writes the top operators of ``torch.profiler`` for the default step (``profile.md``).

    python benchmarks/training_speed.py --threads 2 --out benchmarks/results/training_speed
"""

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "naive": dict(denoiser=(20, 64), npo=dict(kernel_size=7, activation="gelu", expansion=4), layout="nchw",
                  fused=False, cache=False, autocast=False),
    "before": dict(layout="nchw", fused=False, cache=False, npo={}, autocast=False),
    "default": dict(),
    "default, float32": dict(autocast=False),
    "supervised": dict(method="supervised"),
    "default + checkpointing": dict(unroll="checkpoint"),
    "default + truncated (last 5)": dict(unroll="truncated"),
    "default + bf16 autocast": dict(autocast=True),
    "default, plain trunk": dict(npo={}),
    "default, float32 + torch.compile": dict(autocast=False, compile=True),
}


def measure(name: str, threads: int, steps: int, batch: int, profile: bool) -> dict:
    """Run in a child process: time ``steps`` updates (after one warm-up) of configuration ``name``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from d2gp import training
    from d2gp.denoisers import build_dncnn
    from d2gp.device import use_bf16
    from d2gp.evaluation import evaluate_solver
    from d2gp.preconditioners.npo import ConvNeXtBlock
    from d2gp.tasks import make_task

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = {"denoiser": None, "npo": dict(training.DEFAULT_NPO), "layout": "cl", "fused": True, "cache": True,
            "method": "d2gp", "unroll": "full", "autocast": None, "compile": False, **CONFIGS[name]}
    if not spec["fused"]:
        ConvNeXtBlock.forward = ConvNeXtBlock.reference_forward
    task = make_task("spc", device="cpu")
    denoiser = task.denoiser() if spec["denoiser"] is None else build_dncnn(1, *spec["denoiser"]).eval()
    npo_settings = dict(spec["npo"])
    if spec["layout"] == "nchw":
        denoiser = denoiser.to(memory_format=torch.contiguous_format)
        npo_settings["channels_last"] = False
    denoiser.requires_grad_(False)
    config = training.TrainConfig(batch_size=batch, autocast=spec["autocast"], unroll=spec["unroll"],
                                  method=spec["method"], npo=npo_settings)
    npo = training.build_preconditioner(config, task)
    with torch.no_grad():  # a non-trivial NPO: a zero head would leave most gradients zero
        npo.head.weight.normal_(0, 1e-2)
    optimizer = torch.optim.Adam(npo.parameters(), lr=1e-4)
    images = task.images("train", limit=batch * (steps + 1))
    cache_seconds = None
    teacher = None
    if spec["cache"] and config.weights.needs_teacher:
        began = time.perf_counter()
        teacher = training.TeacherTargets(task, denoiser, images, config.iterations)
        cache_seconds = (time.perf_counter() - began) / len(images)

    unrolled = functools.partial(training.unrolled_loss, config, task, npo, denoiser)
    if spec["compile"]:  # as train(compile=True) does on a CPU
        unrolled = torch.compile(unrolled, dynamic=False)

    def update(step, unrolled=unrolled):
        index = torch.arange(step * batch, (step + 1) * batch)
        loss, _ = training._loss(config, task, npo, denoiser, images[index], seed=step,
                                 teacher=teacher[index] if teacher is not None else None, unrolled=unrolled)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times, first = [], []
    for step in range(steps + 1):
        began = time.perf_counter()
        update(step)
        (times if step else first).append(time.perf_counter() - began)
    with FlopCounterMode(display=False) as counter:  # eager: the same work, counted
        update(0, unrolled=None)
    table = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            update(0)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    npo.eval()
    val = task.images("val", limit=256)
    run = evaluate_solver("inference", task.student, val, denoiser, task.student_step_size, 20, preconditioner=npo,
                          batch_size=64, progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"name": name, "precision": "bfloat16" if use_bf16(config.autocast, task.device) else "float32",
            "seconds_per_step": statistics.median(times), "step_times": times, "first_step_seconds": first[0],
            "gflop_per_step": counter.get_total_flops() / 1e9, "peak_rss_mb": peak_mb,
            "teacher_cache_seconds_per_image": cache_seconds, "inference_images_per_second": len(val) / run.seconds,
            "npo_parameters": npo.num_parameters(), "denoiser_parameters": sum(p.numel() for p in denoiser.parameters()),
            "profile": table}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed updates per configuration (after a warm-up)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/training_speed")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                        help="configurations to run (default all); speed-ups are against 'before' when it runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(args.child, args.threads, args.steps, args.batch, profile=args.child == "default")
        print(json.dumps(result))
        return

    from pathlib import Path

    from d2gp.checkpoints import atomic_write_text
    from d2gp.reports import markdown_table, write_results

    results = []
    for name in args.configs:
        command = [sys.executable, __file__, "--child", name, "--threads", str(args.threads), "--steps",
                   str(args.steps), "--batch", str(args.batch)]
        # A fresh inductor cache per child: a compiled configuration compiles cold, as a first --compile run does.
        with tempfile.TemporaryDirectory(prefix="d2gp-inductor-") as cache:
            output = subprocess.run(command, capture_output=True, text=True, check=True,
                                    env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(f"{name}: {results[-1]['seconds_per_step']:.2f} s/update", flush=True)
    reference = next((r for r in results if r["name"] == "before"), results[0])
    header = ["configuration", "precision", "s / update", f"speed-up vs {reference['name']}", "first update (s)",
              "GFLOP / update", "GFLOP/s", "peak RSS (MB)", "teacher targets (ms/image, once)",
              "inference images/s (K=20)", "NPO params", "DnCNN params"]
    rows = [[r["name"], r["precision"], f"{r['seconds_per_step']:.2f}", f"{reference['seconds_per_step'] / r['seconds_per_step']:.1f}×",
             f"{r['first_step_seconds']:.1f}", f"{r['gflop_per_step']:.0f}", f"{r['gflop_per_step'] / r['seconds_per_step']:.0f}",
             f"{r['peak_rss_mb']:.0f}",
             f"{1000 * r['teacher_cache_seconds_per_image']:.0f}" if r["teacher_cache_seconds_per_image"] else "—",
             f"{r['inference_images_per_second']:.0f}", r["npo_parameters"], r["denoiser_parameters"]] for r in results]
    print(markdown_table(header, rows))
    write_results(args.out, header, rows, {"args": vars(args), "results": results})
    profiled = next((r for r in results if r.get("profile")), None)
    if profiled:
        atomic_write_text(f"Top operators of one `{profiled['name']}` update (batch {args.batch}, {args.threads} "
                          f"threads), torch.profiler:\n\n```\n{profiled['profile']}\n```\n", Path(args.out) / "profile.md")


if __name__ == "__main__":
    main()

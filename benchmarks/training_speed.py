"""Seconds per D2GP training step and peak memory: the default configuration against a naive one.

One step = measure a batch with both operators, teacher PnP-FISTA (no grad), student PnP-FISTA
with the NPO unrolled over K iterations, the D2GP loss, backward, Adam step — exactly
``d2gp.training._loss`` as ``d2gp train`` runs it. Each configuration runs in its own process
(so that its peak resident memory is its own), on the SPC task: batch 32, K = 20, 32×32.

* naive: the paper's 20-layer 64-feature DnCNN, a 7×7/GELU/expansion-4 ConvNeXt NPO without
  channels-last, float32, full backpropagation;
* default: the shipped 7-layer 32-feature DnCNN, the default 3×3/ReLU/expansion-2 NPO,
  channels-last, float32, full backpropagation;
* variants of the default: bfloat16 autocast; per-iteration checkpointing; truncated (last 5).

Also the inference throughput (images/s) of the preconditioned student at K = 20.

    python benchmarks/training_speed.py --threads 2 --out benchmarks/results/training_speed
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "naive": dict(denoiser=(20, 64), npo=dict(kernel_size=7, activation="gelu", expansion=4, channels_last=False),
                  autocast=False, unroll="full"),
    "default": dict(denoiser=None, npo={}, autocast=False, unroll="full"),
    "default + bf16 autocast": dict(denoiser=None, npo={}, autocast=True, unroll="full"),
    "default + checkpointing": dict(denoiser=None, npo={}, autocast=False, unroll="checkpoint"),
    "default + truncated (last 5)": dict(denoiser=None, npo={}, autocast=False, unroll="truncated"),
}


def measure(name: str, threads: int, steps: int, batch: int) -> dict:
    """Run in a child process: time ``steps`` training steps (after one warm-up) of configuration ``name``."""
    import torch

    from d2gp import training
    from d2gp.denoisers import build_dncnn
    from d2gp.evaluation import evaluate_solver
    from d2gp.preconditioners import NPO
    from d2gp.tasks import make_task

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = CONFIGS[name]
    task = make_task("spc")
    denoiser = task.denoiser() if spec["denoiser"] is None else build_dncnn(1, *spec["denoiser"]).eval()
    denoiser.requires_grad_(False)
    task.denoiser = lambda: denoiser
    config = training.TrainConfig(batch_size=batch, autocast=spec["autocast"], unroll=spec["unroll"], npo=spec["npo"])
    npo = NPO(channels=1, **spec["npo"])
    with torch.no_grad():  # a non-trivial NPO: a zero head would leave most gradients zero
        npo.head.weight.normal_(0, 1e-2)
    optimizer = torch.optim.Adam(npo.parameters(), lr=1e-4)
    images = task.images("train", limit=batch * (steps + 1))
    times = []
    for step in range(steps + 1):
        x = images[step * batch:(step + 1) * batch]
        began = time.perf_counter()
        loss, _ = training._loss(config, task, npo, denoiser, x, seed=step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - began)
    npo.eval()
    val = task.images("val", limit=256)
    run = evaluate_solver("inference", task.student, val, denoiser, task.student_step_size, 20, preconditioner=npo,
                          batch_size=64, progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"name": name, "seconds_per_step": statistics.median(times), "step_times": times, "peak_rss_mb": peak_mb,
            "inference_images_per_second": len(val) / run.seconds, "npo_parameters": npo.num_parameters(),
            "denoiser_parameters": sum(p.numel() for p in denoiser.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after a warm-up)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/training_speed")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                        help="configurations to run (default all; the first is the reference of the speed-up)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.threads, args.steps, args.batch)))
        return

    from d2gp.reports import markdown_table, write_results

    results = []
    for name in args.configs:
        command = [sys.executable, __file__, "--child", name, "--threads", str(args.threads), "--steps",
                   str(args.steps), "--batch", str(args.batch)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(f"{name}: {results[-1]['seconds_per_step']:.2f} s/step", flush=True)
    naive = results[0]["seconds_per_step"]
    header = ["configuration", "s / step", "speed-up vs naive", "peak RSS (MB)", "inference images/s (K=20)",
              "NPO params", "DnCNN params"]
    rows = [[r["name"], f"{r['seconds_per_step']:.2f}", f"{naive / r['seconds_per_step']:.1f}×", f"{r['peak_rss_mb']:.0f}",
             f"{r['inference_images_per_second']:.0f}", r["npo_parameters"], r["denoiser_parameters"]] for r in results]
    print(markdown_table(header, rows))
    write_results(args.out, header, rows, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()

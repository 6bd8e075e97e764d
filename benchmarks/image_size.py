"""One training update by image size: seconds and peak memory, full unrolling against checkpointing.

One D2GP update (K = 20, the default NPO, the shipped DnCNN, the teacher's targets cached) on
MRI at 64², 128² and 320² (fastMRI-sized), batch 1 by default, with ``--unroll full`` (autograd
keeps every iteration's activations) and ``--unroll checkpoint`` (recomputes each iteration in
the backward pass). Each configuration runs in its own process, so its peak resident memory is
its own. The images are smooth random fields, not data: an update's cost does not depend on the
content, and the fast operators (FFT masks) are those of the task at that size.

    python benchmarks/image_size.py --sizes 64 128 320 --threads 2 --out benchmarks/results/image_size
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(task_name: str, size: int, unroll: str, batch: int, steps: int, threads: int) -> dict:
    """In a child process: median seconds of ``steps`` updates (after one warm-up) and the peak RSS."""
    import torch

    from d2gp import training
    from d2gp.tasks import make_task

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    task = make_task(task_name, device="cpu", image_size=size)
    denoiser = task.denoiser().requires_grad_(False)
    config = training.TrainConfig(task=task_name, batch_size=batch, unroll=unroll)
    npo = training.build_preconditioner(config, task)
    with torch.no_grad():  # a non-trivial NPO: a zero head would leave most gradients zero
        npo.head.weight.normal_(0, 1e-2)
    optimizer = torch.optim.Adam(npo.parameters(), lr=1e-4)
    C = task.image_shape[0]
    noise = torch.rand(batch * (steps + 1), C, size + 8, size + 8)
    images = torch.nn.functional.avg_pool2d(noise, 9, stride=1)  # smooth fields in [0, 1]
    teacher = training.TeacherTargets(task, denoiser, images, config.iterations)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for step in range(steps + 1):
        index = torch.arange(step * batch, (step + 1) * batch)
        began = time.perf_counter()
        loss, _ = training._loss(config, task, npo, denoiser, images[index], seed=step, teacher=teacher[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - began)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"task": task_name, "size": size, "unroll": unroll, "batch": batch, "seconds_per_update": statistics.median(times),
            "update_times": times, "peak_rss_mb": peak, "rss_before_updates_mb": base_rss}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mri")
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 320])
    parser.add_argument("--unrolls", nargs="+", default=["full", "checkpoint"], choices=["full", "checkpoint"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed updates per configuration (after a warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/image_size")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, unroll = args.child.split(":")
        print(json.dumps(measure(args.task, int(size), unroll, args.batch, args.steps, args.threads)))
        return

    from d2gp.reports import write_results

    rows, results = [], []
    for size in args.sizes:
        for unroll in args.unrolls:
            child = subprocess.run([sys.executable, __file__, "--child", f"{size}:{unroll}", "--task", args.task,
                                    "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                record = {"task": args.task, "size": size, "unroll": unroll, "error": child.stderr.strip().splitlines()[-1]}
                rows.append([f"{size}×{size}", unroll, "—", "—", record["error"][:80]])
            else:
                record = json.loads(child.stdout.strip().splitlines()[-1])
                rows.append([f"{size}×{size}", unroll, f"{record['seconds_per_update']:.2f}", f"{record['peak_rss_mb']:.0f}", ""])
            results.append(record)
            print(rows[-1], flush=True)
    header = ["image", "unroll", f"seconds per update (batch {args.batch}, K = 20)", "peak memory (MB, process RSS)", "note"]
    out = write_results(Path(args.out), header, rows, {"args": vars(args), "results": results})
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()

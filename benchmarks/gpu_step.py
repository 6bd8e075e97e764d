"""One D2GP training update on a GPU: eager against compiled (CUDA graphs), and how busy the GPU is.

The update is exactly ``d2gp train``'s (:func:`d2gp.training._loss` with the teacher's cached
targets, backward, Adam step) on the SPC task, batch 64, K = 20, 32×32 by default. Eager PyTorch
launches thousands of small kernels per update (20 iterations × denoiser + NPO + the fast
Hadamard transform, forward and backward), so the GPU idles between them; ``compile`` runs the
unrolled loss through ``torch.compile(mode="reduce-overhead")``, which captures it in CUDA
graphs; ``graph`` records the unrolled loss and its backward pass once with
:class:`d2gp.graphs.GraphedLoss` and replays them (``d2gp train --cuda-graph``: no compilation).
For each mode: the median seconds per update after warm-up (compilation excluded and
reported apart), images per second, and the fraction of the wall time the GPU is busy (kernel
time summed by ``torch.profiler`` over a few updates, divided by their wall time).

On a CPU it runs too (``--device cpu``; ``--modes eager`` unless you want to wait for the C++
compilation of inductor), which is how it is tested here.

    python benchmarks/gpu_step.py --device cuda --out benchmarks/results/gpu_step
"""

import argparse
import statistics
import time

import torch

from d2gp import training
from d2gp.device import describe_device, precision, resolve_device, synchronize
from d2gp.graphs import GraphedLoss
from d2gp.reports import markdown_table, write_results
from d2gp.tasks import make_task


def _busy_fraction(update, device, steps: int) -> float | None:
    """Summed device-kernel time over wall time for ``steps`` updates (None on a CPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            began = time.perf_counter()
            for step in range(steps):
                update(step)
            synchronize(device)
            wall = time.perf_counter() - began
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    except Exception as error:  # noqa: BLE001 - the timing stands without it
        print(f"the profiler failed ({error}): no busy fraction")
        return None
    return kernel_us / 1e6 / wall if kernel_us > 0 else None  # none seen: the profiler missed the kernels


def measure(mode: str, device: torch.device, batch: int, steps: int, method: str, task_name: str) -> dict:
    torch.manual_seed(0)
    task = make_task(task_name, device=device)
    denoiser = task.denoiser().requires_grad_(False)
    config = training.TrainConfig(task=task_name, batch_size=batch, method=method)
    npo = training.build_preconditioner(config, task)
    with torch.no_grad():  # a non-trivial NPO
        npo.head.weight.normal_(0, 1e-2)
    optimizer = torch.optim.Adam(npo.parameters(), lr=1e-4)
    images = task.images("train", limit=batch * 4).to(device)
    teacher = training.TeacherTargets(task, denoiser, images, config.iterations) if method == "d2gp" else None
    training.training_step_size(config, task)  # the power iteration, as train() does: not inside the graph
    unrolled = training.functools.partial(training.unrolled_loss, config, task, npo, denoiser)
    graphs = mode == "compile" and device.type == "cuda"
    if mode == "compile":
        unrolled = torch.compile(unrolled, mode="reduce-overhead" if graphs else None, dynamic=False)
    if mode == "graph":  # the loss computes its gradients: no zeroing or backward below
        unrolled = GraphedLoss(unrolled, list(npo.parameters()), capture=device.type == "cuda")

    def update(step):
        index = torch.arange((step % 4) * batch, (step % 4 + 1) * batch, device=device)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, _ = training._loss(config, task, npo, denoiser, images[index], seed=step,
                                 teacher=teacher[index] if teacher is not None else None, unrolled=unrolled)
        if mode != "graph":
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()

    synchronize(device)
    began = time.perf_counter()
    for step in range(3):  # warm-up: compilation, CUDA graph capture, allocator
        update(step)
    synchronize(device)
    warmup = time.perf_counter() - began
    times = []
    for step in range(steps):
        synchronize(device)
        began = time.perf_counter()
        update(step)
        synchronize(device)
        times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    return {"mode": mode, "seconds_per_update": seconds, "images_per_second": batch / seconds,
            "warmup_seconds": warmup, "busy_fraction": _busy_fraction(update, device, min(steps, 5)),
            "update_times": times,
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--task", default="spc")
    parser.add_argument("--method", default="d2gp", choices=["d2gp", "supervised"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed updates per mode (after 3 of warm-up)")
    parser.add_argument("--modes", nargs="+", default=["eager", "graph", "compile"], choices=["eager", "graph", "compile"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--out", default="benchmarks/results/gpu_step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision("training", device)
    results = [measure(mode, device, args.batch, args.steps, args.method, args.task) for mode in args.modes]
    reference = results[0]["seconds_per_update"]
    header = ["mode", "ms / update", f"speed-up vs {results[0]['mode']}", "images / s", "GPU busy",
              "warm-up (s)", "peak GPU memory (MB)"]
    rows = [[r["mode"], f"{1000 * r['seconds_per_update']:.1f}", f"{reference / r['seconds_per_update']:.2f}×",
             f"{r['images_per_second']:.0f}", f"{r['busy_fraction']:.0%}" if r["busy_fraction"] is not None else "—",
             f"{r['warmup_seconds']:.1f}", f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] else "—"] for r in results]
    print(f"{describe_device(device)}: {args.method} update, {args.task}, batch {args.batch}, K = 20")
    print(markdown_table(header, rows))
    write_results(args.out, header, rows, {"args": vars(args), "results": results}, device=device)


if __name__ == "__main__":
    main()

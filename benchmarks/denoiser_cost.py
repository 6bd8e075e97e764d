"""Cost of one denoiser call: the paper's 20×64 DnCNN against the 7×32 one d2gp ships.

Measures the median wall time of a forward pass (inference) and of a forward+backward pass
(as in unrolled training) on a batch of 32 images, for each task's image shape.

    python benchmarks/denoiser_cost.py --threads 2 --out benchmarks/results/denoiser_cost
"""

import argparse
import statistics
import time

import torch

from d2gp.denoisers import build_dncnn
from d2gp.reports import markdown_table, write_results

SHAPES = {"spc": (1, 32, 32), "mri": (1, 64, 64), "sr": (3, 64, 64)}
ARCHITECTURES = {"paper 20×64": (20, 64), "d2gp 7×32": (7, 32)}


def median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/denoiser_cost")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, results = [], []
    for task, shape in SHAPES.items():
        x = torch.rand(args.batch, *shape)
        base = None
        for label, (depth, features) in ARCHITECTURES.items():
            model = build_dncnn(shape[0], depth, features)
            params = sum(p.numel() for p in model.parameters())
            with torch.no_grad():
                forward = median_seconds(lambda: model(x), args.repeats)
            xg = x.clone().requires_grad_(True)
            both = median_seconds(lambda: model(xg).sum().backward(), args.repeats)
            base = base or forward
            rows.append([task, label, params, f"{1e3 * forward:.1f}", f"{1e3 * both:.1f}", f"{base / forward:.1f}×"])
            results.append({"task": task, "architecture": label, "parameters": params,
                            "forward_ms": 1e3 * forward, "forward_backward_ms": 1e3 * both})
    header = ["task", "DnCNN", "parameters", f"forward, batch {args.batch} (ms)", "forward+backward (ms)",
              "speed-up vs paper"]
    print(markdown_table(header, rows))
    write_results(args.out, header, rows, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()

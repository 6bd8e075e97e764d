"""Result tables: Markdown for people, CSV for programs (written atomically)."""

from __future__ import annotations

import csv
import datetime
import io
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

from d2gp.checkpoints import atomic_write_text, write_json

__all__ = ["markdown_table", "write_table", "write_results", "environment", "cpu_model", "gain_rows"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def gain_rows(results: dict, *leading: Any) -> list[list]:
    """One row per method of an evaluation's results (``d2gp evaluate``'s ``results.json``,
    :func:`d2gp.apps.evaluate_runs`): the ``leading`` cells, the method, its mean PSNR at each
    horizon, then its gain over the tuned baseline (the first method; "—" on its own row)."""
    def mean_at(method: dict, k: int) -> float:  # iteration keys are ints in memory, strings read back from JSON
        return (method["psnr"][k] if k in method["psnr"] else method["psnr"][str(k)])[0]

    horizons = results["horizons"]
    psnr = {m["label"]: [mean_at(m, k) for k in horizons] for m in results["methods"]}
    baseline = psnr[results["methods"][0]["label"]]
    return [[*leading, label, *(f"{v:.2f}" for v in values),
             *(("—" if i == 0 else f"{v - b:+.2f}") for v, b in zip(values, baseline))]
            for i, (label, values) in enumerate(psnr.items())]


def write_table(header: Sequence[str], rows: Sequence[Sequence[Any]], stem: str | os.PathLike) -> None:
    """Write ``stem.md`` and ``stem.csv``."""
    stem = Path(stem)
    atomic_write_text(markdown_table(header, rows) + "\n", stem.with_suffix(".md"))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(buffer.getvalue(), stem.with_suffix(".csv"))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


#: Environment variables that cap the CPU instructions PyTorch's kernels use: a result measured
#: under them stands for a CPU without the instructions above the cap (oneDNN's convolutions,
#: ATen's vectorised kernels), so :func:`environment` records them.
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def environment(device=None) -> dict:
    """What produced a result: command line, date, machine, thread count, library versions, any
    instruction-set cap (:data:`ISA_CAPS`) and, when given, the ``device`` it computed on (in
    words: the GPU's name or the CPU's)."""
    import deepinv
    import torch

    from d2gp.device import describe_device

    program = Path(sys.argv[0]).name
    program = "d2gp" if program in ("d2gp", "__main__.py") else f"python {sys.argv[0]}"
    return {
        "command": " ".join([program, *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}",
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "deepinv": str(deepinv.__version__),
        **({"isa_caps": caps} if (caps := {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)}) else {}),
        **({"device": describe_device(device)} if device is not None else {}),
    }


def write_results(out: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]], results: dict,
                  device=None) -> Path:
    """Print nothing; write ``out/table.md``, ``out/table.csv`` and ``out/results.json`` (with
    :func:`environment`, recording ``device`` when given)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_table(header, rows, out / "table")
    write_json({"environment": environment(device), **results}, out / "results.json")
    return out

"""Every figure d2gp writes (PNG, matplotlib's Agg backend: no screen needed)."""

from __future__ import annotations

import math
import os
import textwrap
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["image_grid", "psnr_curves", "examples_figure"]


def _to_display(image: torch.Tensor):
    image = image.detach().float().clamp(0, 1).cpu()
    if image.shape[0] == 1:
        return image[0].numpy(), "gray"
    return image.permute(1, 2, 0).numpy(), None


def image_grid(rows: Mapping[str, torch.Tensor], path: str | os.PathLike, captions: Mapping[str, Sequence[str]] | None = None,
               title: str | None = None) -> None:
    """One row per entry of ``rows`` (label → ``(N, C, H, W)`` images), N columns, saved as PNG.

    :param captions: optional per-image captions (e.g. PSNR) for some rows.
    """
    labels = list(rows)
    columns = min(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(labels), columns, figsize=(1.6 * columns + 1.2, 1.7 * len(labels)), squeeze=False)
    for r, label in enumerate(labels):
        for c in range(columns):
            ax = axes[r][c]
            data, cmap = _to_display(rows[label][c])
            ax.imshow(data, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if captions and label in captions:
                ax.set_title(captions[label][c], fontsize=7)
            if c == 0:
                ax.set_ylabel(textwrap.fill(label, 20), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()) if title else None)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def psnr_curves(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str | None = None,
                train_iterations: int | None = None, span: float = 15.0) -> None:
    """PSNR against iteration k (k = 0 is the initial estimate), one line per method.

    The y axis shows at most ``span`` dB below the highest value (a diverging method would
    otherwise flatten every other curve); the axis label says when it is clipped.
    """
    many = len(curves) > 6
    fig, ax = plt.subplots(figsize=(8.5 if many else 5, 4.2 if many else 3.4))
    for i, (label, values) in enumerate(curves.items()):
        ax.plot(range(len(values)), values, label=label, lw=1.5, ls="-" if i < 10 else "--")
    if train_iterations is not None:
        ax.axvline(train_iterations, color="grey", ls=":", lw=1)
    finite = [v for values in curves.values() for v in values if math.isfinite(v)]
    clipped = bool(finite) and max(finite) - min(finite) > span
    if clipped:
        ax.set_ylim(max(finite) - span, max(finite) + 0.05 * span)
    ax.set_xlabel("iteration k")
    ax.set_ylabel(f"PSNR (dB){', clipped' if clipped else ''}")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def examples_figure(images: torch.Tensor, runs: Sequence, k: int, path: str | os.PathLike, title: str) -> None:
    """Ground truth and each run's reconstructions (``SolverRun.examples``, kept at iteration ``k``),
    captioned with their PSNR."""
    indices = runs[0].example_indices
    for run in runs:
        if run.examples_at != k:
            raise ValueError(f"{run.label}: its examples were kept at iteration {run.examples_at}, not {k}")
    grid = {"ground truth": images[indices], **{run.label: run.examples for run in runs}}
    captions = {run.label: [f"{float(run.psnr[k][i]):.1f} dB" for i in indices] for run in runs}
    image_grid(grid, path, captions, title=title)
